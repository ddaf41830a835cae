"""Backend choice: argument, STDD_BACKEND, automatic priority, clear errors; the env report."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import stdd_kernels
from stdd_kernels import dispatch, reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def counting_backend():
    """A second real backend (the reference functions, counting calls) registered for one test."""
    calls = []

    def mix(x, phase, geometry):
        calls.append("mix_gather")
        return reference.mix_gather(x, phase, geometry)

    def pad(full, mixed, phase, geometry, residual=None):
        calls.append("pad_scatter")
        return reference.pad_scatter(full, mixed, phase, geometry, residual)

    backend = dispatch.Backend(
        name="counting",
        mix_gather=mix,
        pad_scatter=pad,
        supports=lambda device, dtype: None if dtype == torch.float32 else "float32 only",
        auto_priority={"cpu": 1000},
        description="test backend",
    )
    dispatch.register_backend(backend)
    yield calls
    dispatch._REGISTRY.pop("counting")


def test_reference_always_registered():
    assert "reference" in stdd_kernels.registered_backends()


def test_auto_picks_highest_priority_supporting_backend(counting_backend, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.randn(4, 17, 16)
    mixed = stdd_kernels.mix_gather(x, 4, channel_fold=4)
    stdd_kernels.pad_scatter(x, mixed, 4)
    assert counting_backend == ["mix_gather", "pad_scatter"]
    # float64 is not supported by the test backend: auto falls back to the next one.
    stdd_kernels.mix_gather(x.double(), 4, channel_fold=4)
    assert counting_backend == ["mix_gather", "pad_scatter"]


def test_argument_beats_environment_beats_auto(counting_backend, monkeypatch):
    x = torch.randn(4, 17, 16)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    stdd_kernels.mix_gather(x, 4, channel_fold=4)
    assert counting_backend == []  # env chose reference over the higher-priority backend
    stdd_kernels.mix_gather(x, 4, channel_fold=4, backend="counting")
    assert counting_backend == ["mix_gather"]  # the argument wins over the env
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    stdd_kernels.mix_gather(x, 4, channel_fold=4, backend="auto")
    assert counting_backend == ["mix_gather", "mix_gather"]


def test_named_backend_errors_are_clear(counting_backend, monkeypatch):
    x = torch.randn(4, 17, 16)
    with pytest.raises(ValueError, match="backend='counting' cannot run on cpu / torch.float64: float32 only"):
        stdd_kernels.mix_gather(x.double(), 4, channel_fold=4, backend="counting")
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="STDD_BACKEND='nope' is not available"):
        stdd_kernels.mix_gather(x, 4, channel_fold=4)


def test_release_options_reach_every_backend_in_the_geometry(monkeypatch):
    """mixing="official" and mask_rounding="floor" arrive at a backend as the validated
    geometry (``mixing``, and ``masked`` = floor(0.4 * 4) = 1), on every dispatch route."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    seen = []

    def mix(x, phase, geometry):
        seen.append(geometry)
        return reference.mix_gather(x, phase, geometry)

    def pad(full, mixed, phase, geometry, residual=None):
        seen.append(geometry)
        return reference.pad_scatter(full, mixed, phase, geometry, residual)

    dispatch.register_backend(dispatch.Backend(
        name="recording", mix_gather=mix, pad_scatter=pad, supports=lambda device, dtype: None,
        auto_priority={"cpu": 1000},
    ))
    try:
        x = torch.randn(4, 17, 16)
        settings = dict(mask_ratio=0.4, mask_rounding="floor")
        for backend in (None, "recording"):
            mixed = stdd_kernels.mix_gather(x, 4, channel_fold=4, scales=(1, 2), mixing="official", backend=backend,
                                            **settings)
            assert mixed.shape == (2, 4, 1 + 4 * 3, 16)  # 3 of 4 cells kept per window
            stdd_kernels.pad_scatter(x, mixed, 4, backend=backend, **settings)
        assert [(g.mixing, g.masked) for g in seen] == [("official", 1), ("none", 1)] * 2
    finally:
        dispatch._REGISTRY.pop("recording")


def test_unavailable_backend_reports_why(monkeypatch):
    monkeypatch.setitem(dispatch._UNAVAILABLE, "ghost", "ImportError: built without it")
    with pytest.raises(ValueError, match="failed to load: ImportError: built without it"):
        stdd_kernels.mix_gather(torch.randn(4, 17, 16), 4, channel_fold=4, backend="ghost")


def test_public_names_are_the_functions():
    """No submodule shares a public op's name: importing every submodule leaves the functions in place."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(stdd_kernels.__path__):
        assert info.name not in ("mix_gather", "pad_scatter", "mask_phase"), info.name
        try:
            importlib.import_module(f"stdd_kernels.{info.name}")
        except ImportError:
            pass  # an optional backend that is not built on this machine
    for name in ("mix_gather", "pad_scatter", "mask_phase"):
        assert callable(getattr(stdd_kernels, name)), name
        assert getattr(stdd_kernels, name).__module__ == "stdd_kernels.ops"
    assert type(stdd_kernels) is types.ModuleType  # a plain package, no attribute guard


def test_env_report_runs_and_lists_backends():
    out = subprocess.run(
        [sys.executable, "-m", "stdd_kernels.env", "--json"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120,
    )
    report = json.loads(out.stdout)
    assert report["torch"] == torch.__version__
    assert report["backends"]["reference"]["available"] is True
    for name in dispatch.OPTIONAL_BACKEND_MODULES:
        assert name in report["backends"]
        info = report["backends"][name]
        assert info["available"] or info["reason"]
    text = subprocess.run(
        [sys.executable, "-m", "stdd_kernels.env"], cwd=ROOT, capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout
    assert "STCA backends:" in text and "reference" in text
