"""Training end to end on real (tiny) synthetic videos: kill -9 mid-run, resume, compare bitwise."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd.engine import checkpoint as ckpt
from stdd.engine.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(root: Path, run_dir: Path, epochs: int = 3) -> list[str]:
    """A tiny demo config: 2 motion classes x 4 videos of 16 frames, 32 px, 4-frame clips."""
    return [
        f"data.root={root}",
        "data.synthetic.videos_per_class=4",
        "data.synthetic.val_videos_per_class=2",
        "data.synthetic.size=32",
        "data.synthetic.num_frames=16",
        "data.synthetic.classes=[moving left,moving right]",
        "data.num_frames=4",
        "data.stride=3",
        "data.batch_size=2",
        f"optim.epochs={epochs}",
        "run.tensorboard=false",
        "run.log_every_steps=1",
        f"run.output_dir={run_dir}",
    ]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every run: same float reduction order
    return env


def _train(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stdd.train", "--config", "demo", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, **kwargs)


def _losses(run_dir: Path) -> dict[int, float]:
    """Each step's training loss, from the run's final timeline (``read_metrics``: a resumed run's
    ``resume`` record supersedes what the killed attempt logged after its checkpoint)."""
    records = read_metrics(run_dir, "train")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), "every step is logged once"
    return {r["step"]: r["loss"] for r in records}


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    data = tmp_path / "data"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # Mid-epoch checkpoints after every optimizer step, so the kill lands between two of them.
    extra = ["checkpoint.every_steps=1", "checkpoint.keep_mid_epoch=2"]
    result = _train(tiny_overrides(data, whole) + extra)
    assert result.returncode == 0, result.stderr[-3000:]

    process = subprocess.Popen([sys.executable, "-m", "stdd.train", "--config", "demo",
                                *tiny_overrides(data, killed), *extra],
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and process.poll() is None:
            steps = [ckpt.parse_checkpoint_name(p.name)[1] for p in ckpt.list_checkpoints(killed / "checkpoints")]
            if steps and max(steps) >= 3:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "final.pt").exists()

    resumed = _train(tiny_overrides(data, killed) + extra + ["--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    markers = read_metrics(killed, "resume")
    assert len(markers) == 1 and f"resumed from {markers[0]['path']}" in resumed.stderr

    final_whole = torch.load(whole / "final.pt", weights_only=True)["model"]
    final_resumed = torch.load(killed / "final.pt", weights_only=True)["model"]
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.equal(final_whole[key], final_resumed[key]), key  # bitwise
    # every logged training loss of the resumed run equals the uninterrupted one at that step
    whole_losses, resumed_losses = _losses(whole), _losses(killed)
    assert set(resumed_losses) == set(whole_losses)
    assert all(resumed_losses[s] == whole_losses[s] for s in whole_losses)


def test_fresh_run_refuses_a_directory_with_checkpoints_and_max_steps_stops(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    stopped = _train(tiny_overrides(data, run, epochs=2) + ["run.max_steps=3", "averaging.epochs=all",
                                                            "averaging.include_raw_clip=true"])
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "'stopped_early': True" in stopped.stdout
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names[0] == ckpt.checkpoint_name(0, 0)  # raw weights saved as "epoch 0" for averaging
    assert ckpt.find_latest_checkpoint(run / "checkpoints")[1]["global_step"] == 3
    again = _train(tiny_overrides(data, run, epochs=2))
    assert again.returncode != 0 and "--resume auto" in again.stderr
    finished = _train(tiny_overrides(data, run, epochs=2) + ["averaging.epochs=all", "averaging.include_raw_clip=true",
                                                             "--resume", "auto"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    averaged = torch.load(run / "averaged.pt", weights_only=True)
    assert averaged["averaged_epochs"] == [0, 1, 2]
    states = [ckpt.load_checkpoint(ckpt.checkpoint_for_epoch(run / "checkpoints", e))["model"] for e in (0, 1, 2)]
    key = next(k for k, v in states[0].items() if v.is_floating_point() and v.numel() > 1)
    expected = (states[0][key].double() + states[1][key].double() + states[2][key].double()) / 3
    assert torch.allclose(averaged["model"][key].double(), expected, atol=1e-6)
