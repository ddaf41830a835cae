"""Keys with a fixed set of values: checked when the config is loaded, one line naming the key, the value
and the allowed values, before anything is built or written; the allowed values come from each list's
one home. Also the warm-up, which may not be longer than the run."""

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")

from stdd import cli
from stdd.engine.config import VALUE_CHOICES, ConfigError, STDDConfig, load_config
from stdd.model.stca_settings import allowed_values

REPO = Path(__file__).resolve().parents[1]

# Free-form string keys (paths, names, file-or-keyword values); every other string key is a choice.
FREE_FORM = {"run.output_dir", "model.clip_name", "model.pretrained", "text.prompts", "text.cache_dir", "data.root",
             "data.train_annotations", "data.val_annotations", "data.published.dataset"}


def _string_keys(cls=STDDConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _string_keys(kind, f"{prefix}{f.name}.")
        elif kind in (str, typing.Optional[str]):
            yield f"{prefix}{f.name}"


def typo_of(key):
    """A value that is not one of the key's allowed values (a near miss of the first one)."""
    allowed = allowed_values(VALUE_CHOICES[key])
    if isinstance(allowed[0], int):
        return max(allowed) + 1
    return f"{allowed[0]}x"


def assert_names_key_value_and_choices(message, key, value):
    assert "\n" not in message
    assert f"{key}={value!r}" in message, message
    for allowed in allowed_values(VALUE_CHOICES[key]):
        assert str(allowed) in message, message


def test_every_string_key_is_a_choice_or_known_to_be_free_form():
    assert set(_string_keys()) - FREE_FORM <= set(VALUE_CHOICES)
    assert not FREE_FORM & set(VALUE_CHOICES)


def test_the_table_refers_to_each_lists_one_home():
    from stdd.data.annotations import OFFICIAL_SPLITS, ON_MISSING_POLICIES
    from stdd.data.dataset import ON_ERROR_POLICIES
    from stdd.data.loaders import DECODERS
    from stdd.data.sampling import SAMPLING_MODES, SPATIAL_CROPS
    from stdd.data.synthetic import CODEC_SETTINGS
    from stdd.data.transforms import NORMALIZATIONS
    from stdd.engine.distributed import DEVICES
    from stdd.engine.metrics import AGGREGATIONS
    from stdd.engine.optimization import NONFINITE_POLICIES
    from stdd.engine.precision import PRECISIONS
    from stdd.model.alignment import SCORE_MODES
    from stdd.model.stca_settings import ATTENTION_KINDS, backend_names, choice_fields
    from stdd.knowledge.prompts import TEMPLATE_SETS
    from stdd.model.text_encoder import TEXT_FEATURE_SOURCES, TEXT_TOWERS
    from stdd.model.video_encoder import TEMPORAL_KINDS
    from stdd.resources import CLASS_NAME_FORMS, SPLIT_PROTOCOLS
    from stdd_kernels.geometry import MASK_ROUNDINGS, MIXING_MODES

    homes = {"data.published.protocol": SPLIT_PROTOCOLS, "run.device": DEVICES, "run.precision": PRECISIONS, "text.features": TEXT_FEATURE_SOURCES,
             "loss.score": SCORE_MODES, "data.split": OFFICIAL_SPLITS, "data.decoder": DECODERS,
             "data.sampling": SAMPLING_MODES, "data.on_missing": ON_MISSING_POLICIES,
             "data.on_error": ON_ERROR_POLICIES, "data.synthetic.codec": CODEC_SETTINGS,
             "optim.on_nonfinite_loss": NONFINITE_POLICIES, "eval.n_spatial_crops": SPATIAL_CROPS,
             "eval.aggregation": AGGREGATIONS, "model.stca.mixing": MIXING_MODES,
             "model.stca.mask_rounding": MASK_ROUNDINGS, "model.stca.attention": ATTENTION_KINDS,
             "model.stca.backend": backend_names, "model.temporal": TEMPORAL_KINDS,
             "data.normalization": NORMALIZATIONS, "text.templates": TEMPLATE_SETS,
             "text.class_name_form": CLASS_NAME_FORMS, "text.tower": TEXT_TOWERS}
    for key, home in homes.items():
        assert VALUE_CHOICES[key] is home, key  # the list itself, not a copy
    for name, allowed in choice_fields().items():  # every choice field of STCASettings, as declared there
        assert VALUE_CHOICES[f"model.stca.{name}"] is allowed


def test_data_dataset_is_synthetic_published_or_an_annotation_format():
    from stdd.data.annotations import ANNOTATION_FORMATS, ANNOTATION_READERS

    assert allowed_values(VALUE_CHOICES["data.dataset"]) == ("synthetic", "published", *ANNOTATION_FORMATS)
    assert ANNOTATION_FORMATS == tuple(ANNOTATION_READERS)


def test_backends_are_the_ones_the_dispatcher_knows():
    from stdd_kernels import dispatch

    known = set(allowed_values(VALUE_CHOICES["model.stca.backend"]))
    assert known == {"auto"} | set(dispatch.registered_backends()) | set(dispatch.OPTIONAL_BACKEND_MODULES)
    for name in dispatch.OPTIONAL_BACKEND_MODULES:  # known here whether or not it loads on this machine
        assert load_config("demo", [f"model.stca.backend={name}"]).model.stca.backend == name
    assert load_config("demo", ["model.stca.backend=null"]).model.stca.backend is None


@pytest.mark.parametrize("key", sorted(VALUE_CHOICES))
def test_a_typo_in_any_choice_is_refused_at_load(key):
    with pytest.raises(ConfigError) as caught:
        load_config("demo", [f"{key}={typo_of(key)}"])
    assert_names_key_value_and_choices(str(caught.value), key, typo_of(key))


@pytest.mark.parametrize("key", sorted(VALUE_CHOICES))
def test_every_allowed_value_is_accepted(key):
    from omegaconf import OmegaConf

    for value in allowed_values(VALUE_CHOICES[key]):
        assert OmegaConf.select(load_config("demo", [f"{key}={value}"]), key) == value


def test_a_stored_config_with_a_bad_choice_is_refused_for_inference(tmp_path):
    torch = pytest.importorskip("torch")
    from omegaconf import OmegaConf

    from stdd.engine.checkpoint import save_weights
    from stdd.engine.inference import config_for_weights

    from stdd.model.alignment import SCORE_MODES

    stored = OmegaConf.to_container(load_config("demo"))
    stored["loss"]["score"] = "maen"  # what the model computes: read from the checkpoint, so checked there
    stored["data"]["decoder"] = "nvdec"  # a run-time setting: not taken from a checkpoint, so not in the way
    path = save_weights(tmp_path / "final.pt", {"w": torch.zeros(1)}, OmegaConf.create(stored))
    with pytest.raises(ConfigError, match=r"final\.pt \(its stored config\): loss\.score='maen': expected one of"):
        config_for_weights(str(path), None, [])
    with pytest.raises(ConfigError, match=r"eval\.aggregation='median'"):
        config_for_weights(str(path), None, [f"loss.score={SCORE_MODES[0]}", "eval.aggregation=median"])
    cfg, _ = config_for_weights(str(path), None, [f"loss.score={SCORE_MODES[0]}"])
    assert cfg.data.decoder == load_config("demo").data.decoder


# ----------------------------------------------------------------------------- the command lines


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from stdd.engine.checkpoint import save_weights

    return save_weights(tmp_path_factory.mktemp("weights") / "final.pt", {"w": torch.zeros(1)}, load_config("demo"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    from coded_video import index_coded_frames, write_video

    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_video(path, index_coded_frames(8))
    return path


def train_args(tmp_path):
    """A run whose data would fail only once it is read: a choice error must come first, before the run
    directory exists."""
    return ["--config", "demo", "data.dataset=list", f"data.train_annotations={tmp_path / 'absent.txt'}",
            "data.class_names=[a,b]", f"run.output_dir={tmp_path / 'run'}"]


def eval_args(tmp_path, weights):
    """An evaluation whose video would fail only once it is read, with --out-dir not yet there."""
    listing, classes = tmp_path / "test.txt", tmp_path / "classes.txt"
    listing.write_text("absent.mp4 0\n")
    classes.write_text("a\nb\n")
    return ["--checkpoint", weights, "--annotations", listing, "--root", tmp_path, "--classes", classes,
            "--out-dir", tmp_path / "out", "--quiet"]


def one_error_line(captured) -> str:
    """The one ``error: ...`` line that ends stderr (of capsys or of a finished process)."""
    stderr = captured.err if hasattr(captured, "err") else captured.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    return errors[0]


@pytest.mark.parametrize("key", sorted(VALUE_CHOICES))
def test_train_eval_and_predict_refuse_a_typo_before_writing_anything(key, tmp_path, weights, clip, capsys,
                                                                       monkeypatch):
    from stdd import eval as eval_cli
    from stdd import predict, train

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    override = f"{key}={typo_of(key)}"
    assert train.main([*train_args(tmp_path), override]) == cli.EXIT_USAGE
    assert_names_key_value_and_choices(one_error_line(capsys.readouterr()), key, typo_of(key))
    assert not (tmp_path / "run").exists()
    assert eval_cli.main([*map(str, eval_args(tmp_path, weights)), override]) == cli.EXIT_USAGE
    assert_names_key_value_and_choices(one_error_line(capsys.readouterr()), key, typo_of(key))
    assert not (tmp_path / "out").exists()
    assert predict.main([str(clip), "--classes", "a,b", "--checkpoint", str(weights), override]) == cli.EXIT_USAGE
    assert_names_key_value_and_choices(one_error_line(capsys.readouterr()), key, typo_of(key))


def run_cli(module, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_choice_typos_in_real_command_lines(tmp_path, weights, clip):
    trained = run_cli("stdd.train", *train_args(tmp_path), "data.decoder=nvdec")
    assert trained.returncode == cli.EXIT_USAGE, trained.stderr[-3000:]
    assert_names_key_value_and_choices(one_error_line(trained), "data.decoder", "nvdec")
    assert not (tmp_path / "run").exists()
    evaluated = run_cli("stdd.eval", *eval_args(tmp_path, weights), "eval.aggregation=median")
    assert evaluated.returncode == cli.EXIT_USAGE, evaluated.stderr[-3000:]
    assert_names_key_value_and_choices(one_error_line(evaluated), "eval.aggregation", "median")
    assert not (tmp_path / "out").exists()
    predicted = run_cli("stdd.predict", clip, "--classes", "a,b", "--checkpoint", weights, "model.stca.backend=tritn")
    assert predicted.returncode == cli.EXIT_USAGE, predicted.stderr[-3000:]
    assert_names_key_value_and_choices(one_error_line(predicted), "model.stca.backend", "tritn")


@pytest.mark.parametrize("option, value", [("--aggregation", "median"), ("--hmdb-split", "4"), ("--crops", "2"),
                                           ("--format", "hmdb"), ("--device", "gpu")])
def test_eval_options_that_are_choices_are_refused_before_anything_is_written(option, value, tmp_path, weights, capsys,
                                                                              monkeypatch):
    from stdd import eval as eval_cli

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert eval_cli.main([*map(str, eval_args(tmp_path, weights)), option, value]) == cli.EXIT_USAGE
    line = one_error_line(capsys.readouterr())
    assert option in line and value in line and "choose from" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- warm-up


def test_a_warmup_longer_than_the_run_is_refused_naming_both_lengths():
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs=100 is longer than the run \(optim\.epochs=1\)"):
        load_config("demo", ["optim.warmup_epochs=100", "optim.epochs=1"])
    with pytest.raises(ConfigError, match=r"optim\.warmup_epochs=2\.5 .*optim\.epochs=2"):
        load_config("demo", ["optim.warmup_epochs=2.5", "optim.epochs=2"])
    assert load_config("demo", ["optim.warmup_epochs=1", "optim.epochs=1"]).optim.warmup_epochs == 1  # the whole run
    for preset in ("demo", "demo_no_masking", "k400_vitb16", "k400_vitb16_official"):
        load_config(preset)


def test_warmup_longer_than_the_run_stops_the_command_line_before_the_run_directory(tmp_path):
    result = run_cli("stdd.train", *train_args(tmp_path), "optim.warmup_epochs=100", "optim.epochs=1")
    assert result.returncode == cli.EXIT_USAGE, result.stderr[-3000:]
    line = one_error_line(result)
    assert "optim.warmup_epochs=100" in line and "optim.epochs=1" in line
    assert not (tmp_path / "run").exists()
