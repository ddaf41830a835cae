"""bench/stca.py: its boolean-mask peer computes the STCA block, and its results survive a kill.

The script is loaded from its path (bench/ is not a package). The peer is
checked against ``stdd.model.STCABlock`` on the reference backend for scales
``(1,)``, where the authors' formulation and the spec's agree exactly, so the
benchmark's speed-up over it is measured on the same work, and for several
scales against the block with ``mixing="official"`` (the release's rule).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import stdd_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "stca.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_stca", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("phases", ["eval", "train"])
def test_boolean_mask_block_equals_the_stca_block_for_one_scale(bench, phases):
    pytest.importorskip("open_clip")
    from open_clip.transformer import ResidualAttentionBlock

    from stdd.model import STCABlock, STCASettings

    clips, frames, grid, width = 2, 4, 4, 32
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, 2, ls_init_value=0.5, batch_first=True).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for parameter in block.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(1)
    phase = stdd_kernels.mask_phase(
        clips, frames, mode=phases, generator=generator if phases == "train" else None,
        shuffle=phases == "train",
    )
    x = torch.randn(clips * frames, 1 + grid * grid, width, generator=generator)
    settings = dict(window=(2, 2), mask_ratio=0.5, scales=(1,), channel_fold=8)
    expected = STCABlock(block, STCASettings(**settings, backend="reference"), num_frames=frames).eval()(x, phase)
    peer = bench.BooleanMaskSTCABlock(block, grid=grid, num_frames=frames, **settings).eval()
    got = peer(x.transpose(0, 1).contiguous(), phase).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ... and it is not the plain block: the mixing and masking did something.
    assert (got - block(x)).abs().max() > 1e-3


@pytest.mark.parametrize("scales", [(1, 2), (1, 2, 3)], ids=str)
def test_boolean_mask_block_equals_the_stca_block_with_the_release_rule(bench, scales):
    """The peer applies the release's rule as the release writes it (slice copies that
    overwrite); ``mixing="official"`` reproduces it, clip edges and halved widths included."""
    pytest.importorskip("open_clip")
    from open_clip.transformer import ResidualAttentionBlock

    from stdd.model import STCABlock, STCASettings

    clips, frames, grid, width = 2, 4, 4, 48  # I = 48 // 8 = 6: widths 6, 3, 1
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, 2, ls_init_value=0.5, batch_first=True).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(2)
    phase = stdd_kernels.mask_phase(clips, frames, mode="train", generator=generator, shuffle=True)
    x = torch.randn(clips * frames, 1 + grid * grid, width, generator=generator)
    settings = dict(window=(2, 2), mask_ratio=0.5, scales=scales, channel_fold=8)
    peer = bench.BooleanMaskSTCABlock(block, grid=grid, num_frames=frames, **settings).eval()
    got = peer(x.transpose(0, 1).contiguous(), phase).transpose(0, 1)

    def stca_block(mixing):
        stca = STCASettings(**settings, mixing=mixing, backend="reference")
        return STCABlock(block, stca, num_frames=frames).eval()(x, phase)

    torch.testing.assert_close(got, stca_block("official"), rtol=1e-5, atol=1e-5)
    if scales == (1, 2):  # ... which is not the paper's continual mixing at the clip edges
        continual = stca_block("continual")
        assert (got - continual).abs().max() > 1e-4


def test_copy_ratio_above_one_is_not_a_result(bench):
    assert bench.of_copy(50.0, 100.0) == 0.5
    assert bench.of_copy(122.0, 2.1) is None  # a disturbed copy timing


def test_commit_comes_from_the_environment_without_git(bench, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)  # what bench/provenance.py runs git with
    monkeypatch.setenv(bench.COMMIT_ENV_VAR, "0123abc")
    assert bench.git_commit() == {"commit": "0123abc", "dirty": None, "source": bench.COMMIT_ENV_VAR}
    monkeypatch.delenv(bench.COMMIT_ENV_VAR)
    assert bench.git_commit()["commit"] is None


def test_default_output_is_a_temporary_directory(bench, capsys):
    before = sorted((ROOT / "bench" / "results").iterdir())
    assert bench.main(["--tiny", "--skip-ops", "--skip-stack"]) == 0
    assert sorted((ROOT / "bench" / "results").iterdir()) == before
    written = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: wrote ")]
    path = Path(written[0].split()[2])
    assert path.is_file() and str(path).startswith(tempfile.gettempdir())
    assert json.loads(path.read_text())["status"] == "done"


def test_an_interrupted_run_keeps_every_row_it_printed(tmp_path):
    """SIGINT (what a step timeout sends) after the first row: the JSON holds what was printed.

    The script gets SIGINT's default disposition: a test run started in the background of a non-interactive
    shell (``nohup ... &``) has SIGINT ignored, a child inherits that and Python then never raises
    KeyboardInterrupt, so the script ran to its end. The stack section follows the op rows, so the run is
    still going when the signal comes even if this test is slow to read the first row."""
    out = tmp_path / "stca.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--skip-compiled", "--repeats", "400",
         "--backends", "reference", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    printed = []
    try:
        for line in process.stdout:
            if line.startswith("ops "):
                printed.append(line)
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert printed, "no row was printed"
    assert process.returncode == 130, rest
    record = json.loads(out.read_text())
    assert record["status"] == "interrupted"
    assert 1 <= len(record["ops"]) <= 4 and out.with_suffix(".csv").is_file()
    assert record["ops"][0]["op"] == "mix_gather" and record["ops"][0]["median_ms"] > 0
