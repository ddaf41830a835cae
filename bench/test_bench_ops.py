"""Op-level micro-benchmarks of the STCA gather/scatter (pytest-benchmark).

    pytest bench/test_bench_ops.py --benchmark-only [--benchmark-json bench/results/ops_<machine>.json]

Kept out of ``pytest tests/`` (the pass/fail suite): these measure, they do
not assert. One case per (backend, op, direction) for every registered
backend that runs on this device, plus a device copy of the same bytes
(``copy``) to read the numbers against; ``extra_info`` holds the bytes moved
(same accounting as ``bench/stca.py``). Shapes: ViT-B/16 at 224 px, T=8,
B=32 (bf16) on GPU; B=1 (fp32) on CPU. The Triton backend is left out on CPU:
its interpreter is a correctness tool, its timings mean nothing.
"""

from __future__ import annotations

import pytest
import torch

import stdd_kernels
from stdd_kernels.geometry import make_geometry

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH, FRAMES, GRID, WIDTH, SCALES = (32 if GPU else 1), 8, 14, 768, (1, 2)


def _backends():
    names = []
    for name, backend in sorted(stdd_kernels.registered_backends().items()):
        if name == "triton" and not GPU:
            continue
        if backend.supports(DEVICE, DTYPE) is None:
            names.append(name)
    return names


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def tensors():
    rows, tokens = BATCH * FRAMES, 1 + GRID * GRID
    geometry = make_geometry(
        num_tokens=tokens, channels=WIDTH, rows=rows, num_frames=FRAMES, window=(2, 2), mask_ratio=0.5,
        scales=SCALES, channel_fold=32, mixing="continual", tensor_name="x",
    )
    kept = 1 + geometry.num_kept
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(DEVICE, DTYPE)  # noqa: E731
    phase = stdd_kernels.mask_phase(BATCH, FRAMES, mode="train", generator=generator, device=DEVICE)
    size = torch.tensor([], dtype=DTYPE).element_size()
    S = len(SCALES)
    return dict(
        x=rand(rows, tokens, WIDTH), full=rand(rows, tokens, WIDTH), residual=rand(rows, tokens, WIDTH),
        mixed=rand(S, rows, kept, WIDTH), d_mixed=rand(S, rows, kept, WIDTH), d_out=rand(rows, tokens, WIDTH),
        phase=phase,
        bytes={
            ("mix_gather", "fwd"): (rows * kept * WIDTH * (1 + S)) * size,
            ("mix_gather", "bwd"): (S * rows * kept * WIDTH + rows * tokens * WIDTH) * size,
            ("pad_scatter", "fwd"): (rows * (tokens - kept) * WIDTH + S * rows * kept * WIDTH
                                     + 2 * rows * tokens * WIDTH) * size,
            ("pad_scatter", "bwd"): (2 * rows * tokens * WIDTH + S * rows * kept * WIDTH) * size,
        },
    )


def _case(t, backend, op, direction):
    settings = dict(window=(2, 2), mask_ratio=0.5, phase=t["phase"], backend=backend, validate=False)
    if op == "mix_gather":
        run = lambda x: stdd_kernels.mix_gather(  # noqa: E731
            x, FRAMES, scales=SCALES, channel_fold=32, mixing="continual", **settings
        )
        if direction == "fwd":
            return lambda: run(t["x"])
        leaf = t["x"].clone().requires_grad_(True)
        out = run(leaf)
        return lambda: torch.autograd.grad(out, leaf, t["d_mixed"], retain_graph=True)
    run = lambda f, m, r: stdd_kernels.pad_scatter(f, m, FRAMES, residual=r, **settings)  # noqa: E731
    if direction == "fwd":
        return lambda: run(t["full"], t["mixed"], t["residual"])
    leaves = [t[k].clone().requires_grad_(True) for k in ("full", "mixed", "residual")]
    out = run(*leaves)
    return lambda: torch.autograd.grad(out, leaves, t["d_out"], retain_graph=True)


OPS = [("mix_gather", "fwd"), ("mix_gather", "bwd"), ("pad_scatter", "fwd"), ("pad_scatter", "bwd")]


@pytest.mark.parametrize("op, direction", OPS, ids=[f"{o}-{d}" for o, d in OPS])
@pytest.mark.parametrize("backend", _backends())
def test_op(benchmark, tensors, backend, op, direction):
    fn = _case(tensors, backend, op, direction)
    benchmark.extra_info.update(bytes=tensors["bytes"][(op, direction)], device=str(DEVICE), dtype=str(DTYPE))

    def timed():
        fn()
        _sync()

    benchmark(timed)


@pytest.mark.parametrize("op, direction", OPS, ids=[f"{o}-{d}" for o, d in OPS])
def test_copy(benchmark, tensors, op, direction):
    """``dst.copy_(src)`` moving the same bytes as the op (half read, half written)."""
    nbytes = tensors["bytes"][(op, direction)]
    src = torch.empty(nbytes // (2 * torch.tensor([], dtype=DTYPE).element_size()), dtype=DTYPE, device=DEVICE)
    src.normal_()
    dst = torch.empty_like(src)
    benchmark.extra_info.update(bytes=nbytes, device=str(DEVICE), dtype=str(DTYPE))

    def timed():
        dst.copy_(src)
        _sync()

    benchmark(timed)
