"""Run-time settings (stdd.engine.config.RUNTIME_KEYS) belong to the process that runs, not to a checkpoint:
stdd.eval / stdd.predict take them from their own defaults and command line, a resumed run may change them."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")  # a minimal install (the GPU image) has none of these: the module skips
pytest.importorskip("av")
pytest.importorskip("open_clip")

from omegaconf import OmegaConf  # noqa: E402

from stdd.data import generate_synthetic_dataset  # noqa: E402
from stdd.engine.checkpoint import save_weights  # noqa: E402
from stdd.engine.config import RUNTIME_KEYS, SECTIONS, STDDConfig, load_config  # noqa: E402
from stdd.engine.inference import config_for_weights  # noqa: E402
from stdd.engine.resume import compare_configs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["moving left", "moving right"]
TINY = ["data.num_frames=4", "data.stride=3", "eval.n_temporal_views=2", "run.tensorboard=false"]
TINY_BUDGET = "0.01"  # MiB: less than one of the 16-frame 32 x 32 videos below (0.05 MiB decoded)
CACHE_MESSAGE = "exceed the whole decoded-frame cache"


def _leaves(cfg) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    found = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                found[f"{prefix}{key}"] = value

    walk({section: plain[section] for section in SECTIONS}, "")
    return found


def test_run_time_keys_are_leaves_of_the_schema_and_safe_to_change_on_resume():
    leaves = _leaves(OmegaConf.structured(STDDConfig))
    assert set(RUNTIME_KEYS) <= set(leaves) and len(set(RUNTIME_KEYS)) == len(RUNTIME_KEYS)
    stored = load_config("demo")
    changed = load_config("demo", ["data.frame_cache_mb=0", "data.num_workers=2", "run.device=auto",
                                   "text.cache_dir=elsewhere", "data.on_error=fail"])
    check = compare_configs(stored, changed, stored_world_size=1, world_size=1)
    assert not check.refused, check.refused  # none of them changes what is trained
    assert "data.frame_cache_mb 256.0 -> 0.0" in check.warnings


def test_a_checkpoint_gives_inference_its_model_settings_and_not_its_run_time_ones(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stdd.engine.inference")
    trained = load_config("demo", [*TINY, "model.stca.backend=reference", f"text.cache_dir={tmp_path / 'text'}",
                                   "data.on_error=fail", "eval.batch_size=3", "run.precision=fp32"])
    assert trained.data.frame_cache_mb == 256 and trained.data.num_workers == 0  # the demo preset's
    weights = save_weights(tmp_path / "final.pt", {"w": torch.zeros(1)}, trained)
    cfg, _ = config_for_weights(str(weights), None, [])
    defaults, stored, given = _leaves(OmegaConf.structured(STDDConfig)), _leaves(trained), _leaves(cfg)
    assert cfg.data.frame_cache_mb == 0 and cfg.data.num_workers == defaults["data.num_workers"]
    assert {key: given[key] for key in RUNTIME_KEYS} == {key: defaults[key] for key in RUNTIME_KEYS}
    # everything else (the model, STCA, text, data and view settings) is the checkpoint's
    assert {k: v for k, v in given.items() if k not in RUNTIME_KEYS} == {
        k: v for k, v in stored.items() if k not in RUNTIME_KEYS}
    assert "data.frame_cache_mb=256.0" in caplog.text and "model.stca.mask_ratio" not in caplog.text
    # the command line sets them as without a checkpoint
    cfg, _ = config_for_weights(str(weights), None, ["data.frame_cache_mb=8", "data.num_workers=0"])
    assert cfg.data.frame_cache_mb == 8 and cfg.data.num_workers == 0


@pytest.fixture(scope="module")
def cached_checkpoint(tmp_path_factory):
    """Videos, and weights of the demo model whose stored config carries a frame cache smaller than a video."""
    root = tmp_path_factory.mktemp("runtime")
    videos = generate_synthetic_dataset(root / "videos", videos_per_class={"test": 1}, classes=CLASSES,
                                        num_frames=16, height=32, width=32, seed=5)
    cfg = load_config("demo", [*TINY, f"data.frame_cache_mb={TINY_BUDGET}"])
    from stdd.engine.task import build_model, student_state_dict

    torch.manual_seed(0)
    model, _ = build_model(cfg, "cpu", with_teacher=False)
    return videos, save_weights(root / "final.pt", student_state_dict(model), cfg)


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_predict_and_eval_use_a_frame_cache_only_when_their_command_line_asks(cached_checkpoint, tmp_path):
    videos, weights = cached_checkpoint
    clips = sorted((videos.root / "videos" / "test").rglob("*.mp4"))
    assert len(clips) == 2
    # the checkpoint's cache setting stays behind: no cache, so nothing is said about one
    result = _run("stdd.predict", *map(str, clips), "--classes", ",".join(CLASSES), "--checkpoint", str(weights),
                  "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert CACHE_MESSAGE not in result.stderr
    # asked for on the command line: two videos, two views each, too large for the budget: said once
    result = _run("stdd.eval", "--checkpoint", str(weights), "--annotations", str(videos.annotation_files["test"]),
                  "--root", str(videos.root), "--classes", str(videos.classes_file), "--prompts",
                  str(videos.prompts_file), "--num-workers", "0",
                  "--out-dir", str(tmp_path / "out"), "--quiet", f"data.frame_cache_mb={TINY_BUDGET}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(CACHE_MESSAGE) == 1, result.stderr[-3000:]
    assert (tmp_path / "out" / "results.json").is_file()
