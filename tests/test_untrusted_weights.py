"""Weights files from elsewhere: nothing in them runs, a changed byte is caught, and a weights path is
never taken from a checkpoint's stored config without being asked."""

import io
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")

from stdd.engine import checkpoint as ckpt
from stdd.engine.config import ConfigError, load_config
from stdd.model import load_clip
from stdd.serialization import UnreadableFileError, load_torch_file

REPO = Path(__file__).resolve().parents[1]
TINY = "STDD-Tiny-ViT"


def hostile_weights_file(path: Path, marker: Path) -> Path:
    """A torch.save archive whose pickle creates ``marker`` when unpickled without ``weights_only``.

    It first rebuilds a tensor and BUILDs it with a 3-tuple state: the weights-only unpickler calls
    ``Tensor.set_(False, None, None)``, a TypeError (what makes open_clip's loader retry without
    ``weights_only``); the full unpickler accepts the state and goes on to ``exec(...)``.
    """
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    code = f"open({str(marker)!r}, 'w').close()".encode()
    exec_call = b"cbuiltins\nexec\n(" + b"X" + len(code).to_bytes(4, "little") + code + b"tR"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert data.endswith(b".")
                data = data[:-1] + b"(\x89NNtb" + exec_call + b"\x86."  # (tensor, exec(...)) then STOP
            archive.writestr(info, data)
    return path


def test_the_hostile_file_is_hostile(tmp_path):
    # weights_only=True meets a TypeError (on which open_clip's file loader retries without it) ...
    marker = tmp_path / "ran"
    hostile = hostile_weights_file(tmp_path / "hostile.pt", marker)
    with pytest.raises(TypeError):
        torch.load(hostile, weights_only=True)
    assert not marker.exists()
    # ... and a load without weights_only (the retry, under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 or torch < 2.6)
    # runs the code in the file
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_local_clip_weights_are_loaded_by_stdd_and_a_crafted_file_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the explicit weights_only=True still holds
    marker = tmp_path / "ran"
    hostile = hostile_weights_file(tmp_path / "hostile.pt", marker)
    with pytest.raises(ValueError, match=r"hostile\.pt: cannot be loaded as plain weights data, nothing in it was run"):
        load_clip(TINY, str(hostile))
    assert not marker.exists()

    # a plain pickle that runs code when loaded the ordinary way
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    pickled = tmp_path / "pickled.bin"
    torch.save({"visual.conv1.weight": Payload()}, pickled)
    with pytest.raises(ValueError, match=r"pickled\.bin"):
        load_clip(TINY, str(pickled))
    assert not marker.exists()


def test_safetensors_weights_load(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    clip, _ = load_clip(TINY, None, allow_random_init=True)
    path = tmp_path / "tiny.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    loaded, source = load_clip(TINY, str(path))
    assert source.pretrained == str(path)
    for (name, want), (_, got) in zip(clip.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(want, got), name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"tiny\.safetensors: cannot be loaded"):
        load_clip(TINY, str(path))


def test_every_changed_byte_of_a_checkpoint_is_caught_or_harmless(tmp_path):
    state = {"epoch": 1, "step_in_epoch": 0, "global_step": 5, "config": {"note": "kept"},
             "model": {"w": torch.linspace(-1, 1, 200), "n": torch.arange(7)}}
    path = ckpt.save_checkpoint(tmp_path, state)
    original = path.read_bytes()
    reference = ckpt.load_checkpoint(path)
    caught = 0
    for position in range(0, len(original), 2):
        changed = bytearray(original)
        changed[position] ^= 0x04
        path.write_bytes(bytes(changed))
        try:
            loaded = ckpt.load_checkpoint(path)
        except ckpt.CheckpointError as error:
            assert str(path) in str(error)
            caught += 1
            continue
        # not caught: then it changed nothing that is loaded (zip padding, unused header fields)
        assert loaded.keys() == reference.keys() and loaded["config"] == reference["config"], position
        assert all(torch.equal(loaded["model"][k], reference["model"][k]) for k in reference["model"]), position
    assert caught > len(original) // 4  # most bytes carry data or structure


def test_one_flipped_weight_byte_is_named_with_the_archive_member(tmp_path):
    path = ckpt.save_weights(tmp_path / "final.pt", {"w": torch.ones(1000)}, load_config("demo"))
    data = bytearray(path.read_bytes())
    data[data.index(torch.ones(1).numpy().tobytes() * 8) + 4] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"final\.pt: cannot be loaded: corrupt: archive member "
                                                    r"'archive/data/0' does not match its CRC-32"):
        ckpt.load_weights(path)
    with pytest.raises(UnreadableFileError, match="CRC-32"):
        load_torch_file(path)


@pytest.fixture()
def weights_naming_a_file(tmp_path):
    """A weights file whose stored config points model.pretrained at a crafted CLIP weights file."""
    from stdd.engine.task import build_model, student_state_dict

    marker = tmp_path / "ran"
    hostile = hostile_weights_file(tmp_path / "clip.pt", marker)
    model, _ = build_model(load_config("demo"), "cpu", with_teacher=False)
    cfg = load_config("demo", [f"model.pretrained={hostile}", "model.allow_random_init=false"])
    return ckpt.save_weights(tmp_path / "final.pt", student_state_dict(model), cfg), hostile, marker


def test_eval_and_predict_do_not_follow_a_weights_path_stored_in_a_checkpoint(weights_naming_a_file, tmp_path,
                                                                               capsys, monkeypatch):
    from stdd import eval as eval_cli
    from stdd import predict as predict_cli
    from stdd.engine.inference import config_for_weights

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    weights, hostile, marker = weights_naming_a_file
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*clip\.pt.*--trust-checkpoint-pretrained"):
        config_for_weights(str(weights), None, [])
    cfg, state = config_for_weights(str(weights), None, ["model.pretrained=null", "model.allow_random_init=true"])
    assert cfg.model.pretrained is None and state  # a choice made on the command line is followed

    annotations = tmp_path / "list.txt"
    annotations.write_text("a.mp4 0\n")
    (tmp_path / "a.mp4").write_bytes(b"\x00")  # never decoded: the weights are refused first
    common = ["--checkpoint", str(weights), "--annotations", str(annotations), "--root", str(tmp_path),
              "--classes", "ucf101",
              "--out-dir", str(tmp_path / "out"), "--quiet"]
    assert eval_cli.main(common) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --checkpoint") and str(hostile) in error and "--trust-checkpoint-pretrained" in error
    # asked to trust it: the file is read by stdd's own loader, which runs nothing in it
    assert eval_cli.main(common + ["--trust-checkpoint-pretrained"]) == 2
    assert f"{hostile}: cannot be loaded as plain weights data" in capsys.readouterr().err
    assert not marker.exists()

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00")
    assert predict_cli.main([str(video), "--classes", "a,b", "--checkpoint", str(weights)]) == 2
    assert "--trust-checkpoint-pretrained" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"clip\.pt: cannot be loaded as plain weights data"):
        predict_cli.predict([video], classes=["a", "b"], checkpoint=weights, trust_checkpoint_pretrained=True)
    assert not marker.exists()
