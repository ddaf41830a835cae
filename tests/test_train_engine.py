"""Checkpoint I/O, config loading, LR schedule and weight averaging (no model needed)."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")

from stdd.engine import checkpoint as ckpt
from stdd.engine.averaging import ExponentialMovingAverage, average_epoch_checkpoints, parse_epoch_selection
from stdd.engine.config import ConfigError, list_presets, load_config, stca_settings_of
from stdd.engine.schedule import WarmupCosine, build_scheduler, scaled_lr

REPO = Path(__file__).resolve().parents[1]


def _state(epoch, step, value, mid=0):
    return {"epoch": epoch, "step_in_epoch": mid, "global_step": step, "model": {"w": torch.full((4,), float(value))}}


def test_checkpoint_write_killed_midway_leaves_last_good_checkpoint_loadable(tmp_path):
    # A real process writes one checkpoint, then is SIGKILLed halfway through writing the next.
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from stdd import files
        from stdd.engine import checkpoint as ckpt
        ckpt.save_checkpoint({str(tmp_path)!r}, {{"epoch": 1, "step_in_epoch": 0, "global_step": 5,
                              "model": {{"w": torch.ones(1000)}}}})
        def dying_write(payload, handle):
            handle.write(payload[: len(payload) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        files._write_payload = dying_write
        ckpt.save_checkpoint({str(tmp_path)!r}, {{"epoch": 2, "step_in_epoch": 0, "global_step": 10,
                              "model": {{"w": torch.full((1000,), 2.0)}}}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert any(name.endswith(".tmp") for name in leftovers)  # the half-written temp file
    assert not (tmp_path / ckpt.checkpoint_name(2, 10)).exists()
    path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert path.name == ckpt.checkpoint_name(1, 5)
    assert torch.equal(state["model"]["w"], torch.ones(1000))


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(1, 5, 1.0))
    newest = ckpt.save_checkpoint(tmp_path, _state(2, 10, 2.0))
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a disk error after the rename
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        path, state = ckpt.find_latest_checkpoint(tmp_path)
    assert path.name == ckpt.checkpoint_name(1, 5) and state["model"]["w"][0] == 1.0
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded"):
        ckpt.load_checkpoint(newest)
    (tmp_path / "other.pt").write_bytes(b"x")  # files not named like checkpoints are ignored
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_checkpoint_order_and_mid_epoch_pruning(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(0, 0, 0.0))
    ckpt.save_checkpoint(tmp_path, _state(0, 3, 0.5, mid=3))
    ckpt.save_checkpoint(tmp_path, _state(1, 8, 1.0))
    ckpt.save_checkpoint(tmp_path, _state(1, 11, 1.5, mid=3))
    ckpt.save_checkpoint(tmp_path, _state(1, 14, 1.6, mid=6))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == [ckpt.checkpoint_name(0, 0), ckpt.checkpoint_name(0, 3, True), ckpt.checkpoint_name(1, 8),
                     ckpt.checkpoint_name(1, 11, True), ckpt.checkpoint_name(1, 14, True)]
    removed = ckpt.prune_mid_epoch_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in removed] == [names[1], names[3]]
    assert ckpt.checkpoint_for_epoch(tmp_path, 1).name == ckpt.checkpoint_name(1, 8)
    assert ckpt.find_latest_checkpoint(tmp_path)[1]["step_in_epoch"] == 6


def test_rng_state_round_trip_includes_named_generators(tmp_path):
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(7)
    state = ckpt.capture_rng_state({"phase": generator})
    first = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=generator))
    path = ckpt.save_checkpoint(tmp_path, {**_state(0, 1, 0.0, mid=1), "rng": state})
    ckpt.restore_rng_state(ckpt.load_checkpoint(path)["rng"], {"phase": generator})
    second = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=generator))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    with pytest.raises(ckpt.CheckpointError, match="'missing'"):
        ckpt.restore_rng_state(state, {"missing": torch.Generator()})


def test_config_presets_overrides_and_errors(tmp_path):
    assert {"demo", "k400_vitb16"} <= set(list_presets())
    paper = load_config("k400_vitb16")
    assert paper.optim.lr == pytest.approx(3.33e-6) and paper.optim.reference_batch == 32
    assert paper.optim.epochs == 22 and paper.optim.warmup_epochs == 2
    assert list(paper.model.stca.scales) == [1, 2] and paper.model.stca.channel_fold == 32
    assert paper.loss.distillation_weight == 2.0 and paper.run.precision == "bf16"
    assert paper.data.num_frames == 8 and paper.data.stride == 16
    cfg = load_config("demo", ["optim.lr=0.5", "+extra.flag=true"])
    assert cfg.optim.lr == 0.5 and cfg.extra.flag is True
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config("demo", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo", ["optim.lr"])
    with pytest.raises(ConfigError, match="neither a YAML file nor a shipped preset"):
        load_config("no_such_preset")
    user = tmp_path / "mine.yaml"
    user.write_text("base: demo\noptim:\n  epochs: 3\n")
    mine = load_config(user)
    assert mine.optim.epochs == 3 and mine.model == load_config("demo").model
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(broken)


def test_typed_config_rejects_unknown_and_mistyped_keys_with_their_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.stca\.mask_ration"):
        load_config("demo", ["model.stca.mask_ration=0.5"])
    with pytest.raises(ConfigError, match=r"optim\.lr: .*could not be converted"):
        load_config("demo", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"\+model\.stca\.extra.*fixed set of keys"):
        load_config("demo", ["+model.stca.extra=1"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: demo\nmodel:\n  stca:\n    chanel_fold: 4\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: model\.stca\.chanel_fold"):
        load_config(typo)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: data\.batch_size"):
        load_config(wrong_type)
    top_level = tmp_path / "top.yaml"
    top_level.write_text("optm:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: optm"):
        load_config(top_level)
    with pytest.raises(ConfigError, match=r"model\.stca: mask_ratio"):
        stca_settings_of(load_config("demo", ["model.stca.mask_ratio=1.0"]))


def test_model_stca_section_is_the_settings_dataclass_and_presets_keep_their_meaning():
    from dataclasses import fields

    from omegaconf import OmegaConf

    from stdd.engine.config import PRESET_DIR, STCAConfig
    from stdd.model import STCASettings

    assert [f.name for f in fields(STCAConfig)] == ["enabled"] + [f.name for f in fields(STCASettings)]
    assert {f.name: f.default for f in fields(STCAConfig)}.items() > {
        f.name: f.default for f in fields(STCASettings)}.items()
    assert stca_settings_of(load_config("k400_vitb16")) == STCASettings()  # the paper's settings are the defaults
    assert stca_settings_of(load_config("demo", ["model.stca.enabled=false"])) is None

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for preset in ("demo", "k400_vitb16"):
        written = dict(leaves(OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{preset}.yaml"))))
        typed = dict(leaves(OmegaConf.to_container(load_config(preset))))
        for key, value in written.items():  # every value the preset writes is what the typed config holds
            assert typed[key] == (tuple(value) if isinstance(typed[key], tuple) else value), key


def test_warmup_cosine_schedule_and_linear_scaling():
    assert scaled_lr(3.33e-6, 256, 32) == pytest.approx(3.33e-6 * 8)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(1.0, 0, 32)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_steps=2, warmup_start_factor=0.01, end_factor=0.01)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.505) and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone cosine decay after warm-up
    assert WarmupCosine(10, 2, 0.01, 0.01)(6) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 7)).item()))


def test_uniform_average_of_epoch_checkpoints_and_ema(tmp_path):
    for epoch, value in [(0, 0.0), (1, 1.0), (2, 2.0), (3, 6.0)]:
        ckpt.save_checkpoint(tmp_path, {**_state(epoch, epoch * 4, value), "model": {
            "w": torch.full((2,), value), "count": torch.tensor(3)}})
    averaged = average_epoch_checkpoints(tmp_path, [1, 2, 3])
    assert torch.allclose(averaged["w"], torch.full((2,), 3.0)) and averaged["count"].item() == 3
    assert torch.allclose(average_epoch_checkpoints(tmp_path, [0, 1, 2, 3])["w"], torch.full((2,), 2.25))
    with pytest.raises(ckpt.CheckpointError, match="epoch 4"):
        average_epoch_checkpoints(tmp_path, [4])
    assert parse_epoch_selection("all", 3) == [1, 2, 3] and parse_epoch_selection("last:2", 3) == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        parse_epoch_selection([5], 3)

    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = ExponentialMovingAverage(module, decay=0.5)
    for value in (2.0, 4.0):
        with torch.no_grad():
            module.weight.fill_(value)
        ema.update(module)
    assert torch.allclose(ema.averaged_state_dict()["weight"], torch.full((1, 2), 2.5))  # (0*.5+1)*.5+2
    restored = ExponentialMovingAverage(module, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
