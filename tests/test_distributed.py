"""Two-process DDP (gloo, CPU) through torchrun: replicas stay identical and the run equals a
one-process run on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from test_train_resume import REPO, tiny_overrides


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["event"] == event]


def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    # 8 training videos: 2 ranks x batch 2 = global batch 4 = one process x batch 4; 2 steps.
    common = ["optim.epochs=1", "checkpoint.every_epochs=1"]
    single = subprocess.run(
        [sys.executable, "-m", "stdd.train", "--config", "demo", *tiny_overrides(data, tmp_path / "one", epochs=1),
         *common, "data.batch_size=4"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
         "-m", "stdd.train", "--config", "demo", *tiny_overrides(data, tmp_path / "two", epochs=1),
         *common, "data.batch_size=2"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) x 2" in ddp.stderr  # really distributed, global batch 4

    sync = _records(tmp_path / "two", "sync_check")
    assert sync and sync[-1]["parameters_identical_across_ranks"] is True

    one_losses = {r["step"]: r["loss"] for r in _records(tmp_path / "one", "train")}
    two_losses = {r["step"]: r["loss"] for r in _records(tmp_path / "two", "train")}
    assert sorted(one_losses) == sorted(two_losses) == [1, 2]
    for step in one_losses:  # same clips, phases and crops: only the float summation order differs
        assert abs(one_losses[step] - two_losses[step]) < 1e-5, (step, one_losses[step], two_losses[step])

    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)["model"]
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=0), key
