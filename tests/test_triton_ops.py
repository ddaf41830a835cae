"""Triton STCA kernels against the reference ops, forward and every gradient.

On a CPU-only machine the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``; set here when neither it nor a GPU is present). The
shape grid the kernels must handle (T=1,2,3,8; B=1,3; D=24,40,64,96; P=4,6,14; windows
(2,2)/(2,1); scales (1,), (1,2), (2,), (1,2,3); random/shuffled/eval phases;
continual/separate/none mixing; mask ratios 0, 0.25, 0.5) is covered by a few
combined cases rather than a cartesian product: the interpreter pays per
kernel launch. Every kernel output is written into a NaN-filled buffer and
checked element by element. Cases marked ``cuda`` run on a GPU only
(``bench/gpu_check.sh``).

fp32/fp64 outputs of pure data movement must be bit-exact; sums over scales
get fp32 rounding tolerance. Low precision follows flash-attention's rule: the
kernel's error against an fp64 reference may be at most twice the error of
PyTorch's own computation in that precision (exact where PyTorch is exact).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined (see reload_kernels)

import pytest

import stdd_kernels
from stdd_kernels import reference
from stdd_kernels.geometry import check_phase_tensor, make_geometry, same_device
from triton_helpers import hopper_script, run_hopper_script

triton_backend = importlib.import_module("stdd_kernels.triton_backend")
triton_backend.reload_kernels()  # in case stdd_kernels was imported before the variable was set
mix_gather_module = importlib.import_module("stdd_kernels.triton_mix_gather")
pad_scatter_module = importlib.import_module("stdd_kernels.triton_pad_scatter")

DEVICE = "cpu" if mix_gather_module.interpreting() else "cuda"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass(frozen=True)
class Case:
    name: str
    clips: int  # B
    frames: int  # T
    grid: int  # P
    channels: int  # D
    window: tuple
    mask_ratio: float
    scales: tuple
    channel_fold: int
    mixing: str
    phases: str  # "eval" | "train" | "shuffle"
    mask_rounding: str = "nearest"

    def __str__(self):
        return self.name


CASES = [
    Case("T1-B1-P4-D24", 1, 1, 4, 24, (2, 2), 0.5, (1,), 4, "continual", "train"),
    Case("T2-B3-P6-D40-w21", 3, 2, 6, 40, (2, 1), 0.5, (1, 2), 5, "continual", "shuffle"),
    Case("T3-B1-P14-D64-separate-m1", 1, 3, 14, 64, (2, 2), 0.25, (2,), 8, "separate", "train"),
    Case("T8-B3-P4-D96-s123", 3, 8, 4, 96, (2, 2), 0.5, (1, 2, 3), 16, "continual", "shuffle"),
    Case("T8-B1-P6-D24-none-ratio0", 1, 8, 6, 24, (2, 1), 0.0, (1, 2), 4, "none", "eval"),
    Case("T3-B3-P6-D96-ratio0", 3, 3, 6, 96, (2, 2), 0.0, (1, 2), 12, "continual", "train"),
    Case("T8-B1-P14-D40-w21-eval-s21", 1, 8, 14, 40, (2, 1), 0.5, (2, 1), 10, "continual", "eval"),
    # The release's rule (docs/stca.md): T = 1, 2, 3, 4, 8, I not divisible by the scales,
    # its floor of the masked-cell count (0.4 of K=4: 1 masked, 3 kept).
    Case("T1-B3-P4-D24-official", 3, 1, 4, 24, (2, 2), 0.5, (1, 2), 4, "official", "shuffle"),
    Case("T2-B1-P6-D40-w21-official-s123", 1, 2, 6, 40, (2, 1), 0.5, (1, 2, 3), 5, "official", "train"),
    Case("T3-B3-P4-D26-official-s3-floor", 3, 3, 4, 26, (2, 2), 0.4, (3,), 2, "official", "shuffle", "floor"),
    Case("T4-B1-P4-D40-official-s2", 1, 4, 4, 40, (2, 2), 0.5, (2,), 4, "official", "eval"),
    Case("T8-B1-P6-D72-official-s13", 1, 8, 6, 72, (2, 2), 0.5, (1, 3), 8, "official", "train"),
    Case("T4-B2-P4-D24-w21-official-s1", 2, 4, 4, 24, (2, 1), 0.5, (1,), 4, "official", "shuffle"),
]


def geometry_of(case: Case, scales=True):
    return make_geometry(
        num_tokens=1 + case.grid**2,
        channels=case.channels,
        rows=case.clips * case.frames,
        num_frames=case.frames,
        window=case.window,
        mask_ratio=case.mask_ratio,
        scales=case.scales if scales else None,
        channel_fold=case.channel_fold,
        mixing=case.mixing,
        tensor_name="x",
        mask_rounding=case.mask_rounding,
    )


def phases_of(case: Case, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mode = "eval" if case.phases == "eval" else "train"
    return stdd_kernels.mask_phase(
        case.clips,
        case.frames,
        window=case.window,
        mode=mode,
        generator=generator if mode == "train" else None,
        shuffle=case.phases == "shuffle",
        device=DEVICE,
    )


def randn(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def nan_like(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_fully_written(tensor: torch.Tensor, what: str):
    missing = torch.isnan(tensor)
    assert not missing.any(), f"{what}: {int(missing.sum())} of {tensor.numel()} elements never written"


def reference_grads(fn, inputs, upstream):
    """Gradients of ``fn(*inputs)`` (reference autograd) for the upstream gradient ``upstream``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


def op_kwargs(case: Case, phase):
    return dict(
        scales=case.scales,
        channel_fold=case.channel_fold,
        window=case.window,
        mask_ratio=case.mask_ratio,
        mask_rounding=case.mask_rounding,
        phase=phase,
        mixing=case.mixing,
    )


# ---------------------------------------------------------------------------
# mix_gather
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_gather_forward_and_gradient_match_reference(case):
    geometry = geometry_of(case)
    rows = case.clips * case.frames
    x = randn(rows, 1 + case.grid**2, case.channels, seed=1)
    phase = phases_of(case, seed=2)
    expected = reference.mix_gather(x, phase, geometry)

    # Launcher into a NaN-filled buffer: every element must be written, bit-exact (pure copies).
    mixed = mix_gather_module.mix_gather_forward(x, phase, geometry, out=nan_like(expected.shape))
    assert_fully_written(mixed, "mix_gather forward")
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)

    upstream = randn(*expected.shape, seed=3)
    _, (expected_dx,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], upstream)
    dx = mix_gather_module.mix_gather_backward(upstream, phase, geometry, out=nan_like(x.shape))
    assert_fully_written(dx, "mix_gather backward")
    torch.testing.assert_close(dx, expected_dx)

    # The public op (validation + dispatch + torch.library op + autograd) gives the same.
    leaf = x.clone().requires_grad_(True)
    out = stdd_kernels.mix_gather(leaf, case.frames, backend="triton", **op_kwargs(case, phase))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(upstream)
    torch.testing.assert_close(leaf.grad, expected_dx)


def test_mix_gather_noncontiguous_input_and_gradient():
    """Channel-strided x, an int32 phase, an expanded (stride-0) upstream gradient and a transposed one."""
    case = CASES[1]
    geometry = geometry_of(case)
    rows, tokens = case.clips * case.frames, 1 + case.grid**2
    x = randn(case.channels, rows, tokens, seed=4).permute(1, 2, 0)  # (B*T, 1+N, D), channel stride B*T*(1+N)
    assert not x.is_contiguous()
    phase = phases_of(case, seed=5).to(torch.int32)  # any integer dtype
    expected = reference.mix_gather(x, phase, geometry)
    torch.testing.assert_close(mix_gather_module.mix_gather_forward(x, phase, geometry), expected, rtol=0, atol=0)

    leaf = x.detach().requires_grad_(True)
    stdd_kernels.mix_gather(leaf, case.frames, backend="triton", **op_kwargs(case, phase)).sum().backward()
    _, (expected_dx,) = reference_grads(
        lambda t: reference.mix_gather(t, phase, geometry), [x], torch.ones_like(expected)
    )
    torch.testing.assert_close(leaf.grad, expected_dx)

    upstream = randn(expected.shape[3], *expected.shape[:3], seed=6).permute(1, 2, 3, 0)
    _, (expected_dx,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], upstream)
    torch.testing.assert_close(mix_gather_module.mix_gather_backward(upstream, phase, geometry), expected_dx)


# ---------------------------------------------------------------------------
# pad_scatter
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pad_scatter_forward_and_gradients_match_reference(case):
    geometry = geometry_of(case, scales=False)
    rows, tokens = case.clips * case.frames, 1 + case.grid**2
    num_scales = len(case.scales)
    full = randn(rows, tokens, case.channels, seed=11)
    mixed = randn(num_scales, rows, 1 + geometry.num_kept, case.channels, seed=12)
    with_residual = CASES.index(case) % 2 == 0
    residual = randn(rows, tokens, case.channels, seed=13) if with_residual else None
    phase = phases_of(case, seed=14)
    expected = reference.pad_scatter(full, mixed, phase, geometry, residual)

    out = pad_scatter_module.pad_scatter_forward(full, mixed, phase, geometry, residual, out=nan_like(full.shape))
    assert_fully_written(out, "pad_scatter forward")
    torch.testing.assert_close(out, expected)

    upstream = randn(*full.shape, seed=15)
    inputs = [full, mixed] + ([residual] if with_residual else [])
    _, expected_grads = reference_grads(
        lambda f, m, *r: reference.pad_scatter(f, m, phase, geometry, *r), inputs, upstream
    )
    grad_full, grad_mixed = pad_scatter_module.pad_scatter_backward(
        upstream, phase, geometry, num_scales, out=(nan_like(full.shape), nan_like(mixed.shape))
    )
    assert_fully_written(grad_full, "pad_scatter backward (grad_full)")
    assert_fully_written(grad_mixed, "pad_scatter backward (grad_mixed)")
    torch.testing.assert_close(grad_full, expected_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_mixed, expected_grads[1])

    leaves = [t.clone().requires_grad_(True) for t in inputs]
    result = stdd_kernels.pad_scatter(
        leaves[0],
        leaves[1],
        case.frames,
        window=case.window,
        mask_ratio=case.mask_ratio,
        mask_rounding=case.mask_rounding,
        phase=phase,
        residual=leaves[2] if with_residual else None,
        backend="triton",
    )
    torch.testing.assert_close(result, expected)
    result.backward(upstream)
    for leaf, expected_grad, name in zip(leaves, expected_grads, ("full", "mixed", "residual")):
        torch.testing.assert_close(leaf.grad, expected_grad, msg=lambda m: f"d_{name}: {m}")


def test_pad_scatter_noncontiguous_inputs_and_gradient():
    case = CASES[3]
    geometry = geometry_of(case, scales=False)
    rows, tokens, D = case.clips * case.frames, 1 + case.grid**2, case.channels
    num_scales = len(case.scales)
    full = randn(D, tokens, rows, seed=21).permute(2, 1, 0)
    mixed = randn(rows, num_scales, 1 + geometry.num_kept, D, seed=22).transpose(0, 1)
    residual = randn(rows, 2 * tokens, D, seed=23)[:, ::2]
    assert not (full.is_contiguous() or mixed.is_contiguous() or residual.is_contiguous())
    phase = phases_of(case, seed=24).t().contiguous().t()  # column-major (B, T) phase
    assert not phase.is_contiguous()
    expected = reference.pad_scatter(full, mixed, phase, geometry, residual)
    torch.testing.assert_close(
        pad_scatter_module.pad_scatter_forward(full, mixed, phase, geometry, residual), expected
    )
    upstream = torch.ones(1, 1, 1, device=DEVICE).expand(rows, tokens, D)  # stride 0, as from .sum()
    _, expected_grads = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, geometry), [full, mixed], upstream
    )
    grad_full, grad_mixed = pad_scatter_module.pad_scatter_backward(upstream, phase, geometry, num_scales)
    torch.testing.assert_close(grad_full, expected_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_mixed, expected_grads[1])


# ---------------------------------------------------------------------------
# Low precision, wide indices, double backward, op registration
# ---------------------------------------------------------------------------


def assert_within_twice_torch_error(kernel_out, torch_low, exact, what):
    """flash-attention's rule: |kernel - exact| <= 2 |torch_low - exact| (max over elements)."""
    kernel_error = (kernel_out.double() - exact).abs().max().item()
    torch_error = (torch_low.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error, (
        f"{what}: kernel error {kernel_error:.3g} > 2x PyTorch's own {kernel_out.dtype} error {torch_error:.3g}"
    )


LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", [CASES[3], CASES[8]], ids=str)  # three scales: the mean is not exact
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_matches_fp64_reference(dtype, case):
    geometry = geometry_of(case)
    scatter_geometry = geometry_of(case, scales=False)
    rows, tokens, D = case.clips * case.frames, 1 + case.grid**2, case.channels
    phase = phases_of(case, seed=31)
    x = randn(rows, tokens, D, dtype=dtype, seed=32)
    upstream = randn(len(case.scales), rows, 1 + geometry.num_kept, D, dtype=dtype, seed=33)

    # mix_gather is pure data movement: exact in any precision; its backward sums scales.
    mixed = mix_gather_module.mix_gather_forward(x, phase, geometry, out=nan_like(upstream.shape, dtype))
    assert_fully_written(mixed, f"mix_gather {dtype}")
    torch.testing.assert_close(mixed, reference.mix_gather(x, phase, geometry), rtol=0, atol=0)
    dx = mix_gather_module.mix_gather_backward(upstream, phase, geometry, out=nan_like(x.shape, dtype))
    assert_fully_written(dx, f"mix_gather backward {dtype}")
    _, (dx_low,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], upstream)
    _, (dx_exact,) = reference_grads(
        lambda t: reference.mix_gather(t, phase, geometry), [x.double()], upstream.double()
    )
    assert_within_twice_torch_error(dx, dx_low, dx_exact, f"mix_gather backward {dtype}")

    full = randn(rows, tokens, D, dtype=dtype, seed=34)
    residual = randn(rows, tokens, D, dtype=dtype, seed=35)
    out = pad_scatter_module.pad_scatter_forward(
        full, mixed, phase, scatter_geometry, residual, out=nan_like(full.shape, dtype)
    )
    assert_fully_written(out, f"pad_scatter {dtype}")
    low = reference.pad_scatter(full, mixed, phase, scatter_geometry, residual)
    exact = reference.pad_scatter(full.double(), mixed.double(), phase, scatter_geometry, residual.double())
    assert_within_twice_torch_error(out, low, exact, f"pad_scatter {dtype}")

    grad_out = randn(rows, tokens, D, dtype=dtype, seed=36)
    grad_full, grad_mixed = pad_scatter_module.pad_scatter_backward(
        grad_out, phase, scatter_geometry, len(case.scales)
    )
    _, (full_low, mixed_low) = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, scatter_geometry), [full, mixed], grad_out
    )
    _, (full_exact, mixed_exact) = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, scatter_geometry),
        [full.double(), mixed.double()],
        grad_out.double(),
    )
    torch.testing.assert_close(grad_full, full_low, rtol=0, atol=0)
    assert_within_twice_torch_error(grad_mixed, mixed_low, mixed_exact, f"pad_scatter d_mixed {dtype}")


def test_wide_index_path_matches_reference(monkeypatch):
    """Tensors past 2**31 elements switch the kernels to int64 offsets; force that path here."""
    for module in (mix_gather_module, pad_scatter_module):
        monkeypatch.setattr(module, "needs_wide_index", lambda *tensors: True)
    case = CASES[1]
    geometry = geometry_of(case)
    rows, tokens = case.clips * case.frames, 1 + case.grid**2
    x = randn(rows, tokens, case.channels, seed=41)
    phase = phases_of(case, seed=42)
    mixed = mix_gather_module.mix_gather_forward(x, phase, geometry)
    torch.testing.assert_close(mixed, reference.mix_gather(x, phase, geometry), rtol=0, atol=0)
    _, (expected_dx,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], mixed)
    torch.testing.assert_close(mix_gather_module.mix_gather_backward(mixed, phase, geometry), expected_dx)
    out = pad_scatter_module.pad_scatter_forward(x, mixed, phase, geometry, x)
    torch.testing.assert_close(out, reference.pad_scatter(x, mixed, phase, geometry, x))
    _, expected_grads = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, geometry), [x, mixed], out
    )
    grads = pad_scatter_module.pad_scatter_backward(out, phase, geometry, len(case.scales))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[8]], ids=str)  # K = 2, 4; continual, official
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_out_of_range_phase_is_reduced_mod_K_in_the_kernels(case, dtype):
    """validate=False skips the phase range check: a phase outside [0, K), negative ones too,
    selects the cells of its residue mod K (as the C++/CUDA kernels do), never memory outside."""
    geometry = geometry_of(case)
    scatter_geometry = geometry_of(case, scales=False)
    K = case.window[0] * case.window[1]
    rows, tokens = case.clips * case.frames, 1 + case.grid**2
    phase = phases_of(case, seed=44)
    shifts = torch.randint(-40, 40, phase.shape, generator=torch.Generator().manual_seed(45)).to(DEVICE)
    shifts.view(-1)[:2] = torch.tensor([-1, 3], device=DEVICE)[: shifts.numel()]  # at least one negative
    wild = (phase + K * shifts).to(dtype)
    assert int(wild.min()) < 0 and torch.equal(wild.to(torch.int64) % K, phase)
    x = randn(rows, tokens, case.channels, seed=46)

    expected = reference.mix_gather(x, phase, geometry)
    mixed = mix_gather_module.mix_gather_forward(x, wild, geometry, out=nan_like(expected.shape))
    torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
    upstream = randn(*expected.shape, seed=47)
    _, (expected_dx,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], upstream)
    dx = mix_gather_module.mix_gather_backward(upstream, wild, geometry, out=nan_like(x.shape))
    torch.testing.assert_close(dx, expected_dx)

    full, residual = randn(rows, tokens, case.channels, seed=48), randn(rows, tokens, case.channels, seed=49)
    out = pad_scatter_module.pad_scatter_forward(full, expected, wild, scatter_geometry, residual,
                                                 out=nan_like(full.shape))
    torch.testing.assert_close(out, reference.pad_scatter(full, expected, phase, scatter_geometry, residual))
    _, expected_grads = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, scatter_geometry), [full, expected], upstream.new_ones(full.shape)
    )
    grads = pad_scatter_module.pad_scatter_backward(full.new_ones(full.shape), wild, scatter_geometry,
                                                    len(case.scales))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)

    # The public op with validate=False reaches the kernels with the raw values.
    with pytest.raises(ValueError, match=r"phase values must be in \[0, K\)"):
        stdd_kernels.mix_gather(x, case.frames, backend="triton", **op_kwargs(case, wild))
    unchecked = stdd_kernels.mix_gather(x, case.frames, backend="triton", validate=False, **op_kwargs(case, wild))
    torch.testing.assert_close(unchecked, expected, rtol=0, atol=0)


def test_double_backward_matches_reference():
    """Gradients of gradients (the ops are linear: each backward op's backward is the forward op)."""
    case = CASES[1]
    rows, tokens, D = case.clips * case.frames, 1 + case.grid**2, case.channels
    phase = phases_of(case, seed=51)
    kwargs = op_kwargs(case, phase)
    geometry = geometry_of(case)

    def second_order(backend):
        x = randn(rows, tokens, D, seed=52).requires_grad_(True)
        full = randn(rows, tokens, D, seed=53).requires_grad_(True)
        residual = randn(rows, tokens, D, seed=54).requires_grad_(True)
        mixed = stdd_kernels.mix_gather(x, case.frames, backend=backend, **kwargs)
        out = stdd_kernels.pad_scatter(
            full, mixed * mixed, case.frames, window=case.window, mask_ratio=case.mask_ratio,
            phase=phase, residual=residual, backend=backend,
        )
        upstream = randn(rows, tokens, D, seed=55).requires_grad_(True)
        first = torch.autograd.grad(out, (x, full, residual), upstream, create_graph=True)
        weights = [randn(*g.shape, seed=56 + i) for i, g in enumerate(first)]
        total = sum((g * w).sum() for g, w in zip(first, weights))
        return torch.autograd.grad(total, (x, upstream), allow_unused=True)

    assert geometry.num_kept > 0
    for got, want in zip(second_order("triton"), second_order("reference")):
        torch.testing.assert_close(got, want)


def test_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) impls, autograd registration of the stdd_triton ops."""
    case = Case("tiny", 1, 3, 2, 8, (2, 2), 0.5, (1, 2), 2, "continual", "train")
    geometry = geometry_of(case)
    rows, tokens = case.clips * case.frames, 1 + case.grid**2
    phase = phases_of(case, seed=61)
    x = randn(rows, tokens, case.channels, seed=62).requires_grad_(True)
    settings = (case.frames, 2, 2, geometry.masked, list(case.scales), case.channel_fold, case.mixing)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.stdd_triton.mix_gather.default, (x, phase, *settings), test_utils=utils)
    mixed = randn(2, rows, 1 + geometry.num_kept, case.channels, seed=63).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.stdd_triton.mix_gather_backward.default, (mixed, phase, tokens, *settings), test_utils=utils
    )
    scatter_settings = (case.frames, 2, 2, geometry.masked)
    for residual in (x, None):
        torch.library.opcheck(
            torch.ops.stdd_triton.pad_scatter.default,
            (x, mixed, phase, residual, *scatter_settings),
            test_utils=utils,
        )
    torch.library.opcheck(
        torch.ops.stdd_triton.pad_scatter_backward.default, (x, phase, 2, *scatter_settings), test_utils=utils
    )


# ---------------------------------------------------------------------------
# A whole stack: 12 tiny STCA blocks, Triton vs reference
# ---------------------------------------------------------------------------


def test_twelve_block_stack_loss_and_every_parameter_gradient_match_reference():
    """stdd.model.STCABlock x 12 (tiny open_clip blocks), training mode with per-layer random
    phases: the loss and the gradient of every parameter and of the input agree."""
    pytest.importorskip("open_clip")
    from open_clip.transformer import ResidualAttentionBlock

    from stdd.model import STCABlock, STCASettings

    layers, batch, frames, grid, width, heads = 12, 2, 3, 4, 32, 2
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([ResidualAttentionBlock(width, heads, ls_init_value=0.5) for _ in range(layers)])
    with torch.no_grad():  # non-trivial biases and norms
        for parameter in blocks.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    blocks = blocks.to(DEVICE)
    generator = torch.Generator().manual_seed(7)
    phases = [
        stdd_kernels.mask_phase(batch, frames, mode="train", generator=generator, shuffle=True, device=DEVICE)
        for _ in range(layers)
    ]
    x = randn(batch * frames, 1 + grid * grid, width, seed=8)
    target = randn(batch * frames, 1 + grid * grid, width, seed=9)

    def loss_and_grads(backend):
        stack = [
            STCABlock(block, STCASettings(channel_fold=8, backend=backend), num_frames=frames).train()
            for block in blocks
        ]
        blocks.zero_grad(set_to_none=True)
        tokens = x.clone().requires_grad_(True)
        out = tokens
        for block, phase in zip(stack, phases):
            out = block(out, phase)
        loss = (out - target).square().mean()
        loss.backward()
        return loss.detach(), tokens.grad, {name: p.grad.clone() for name, p in blocks.named_parameters()}

    loss, dx, grads = loss_and_grads("triton")
    expected_loss, expected_dx, expected_grads = loss_and_grads("reference")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-4, atol=1e-7)
    assert grads.keys() == expected_grads.keys() and len(grads) == layers * 14  # 12 tensors + 2 layer scales
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------
# Dispatch and the compiled (GPU) kernels
# ---------------------------------------------------------------------------


def test_triton_backend_registration_and_support():
    backend = stdd_kernels.registered_backends()["triton"]
    assert backend.auto_priority == {"cuda": 20}  # never chosen automatically on CPU
    assert backend.supports(torch.device(DEVICE), torch.float32) is None
    assert "dtype" in backend.supports(torch.device(DEVICE), torch.int32)
    assert "meta" in backend.supports(torch.device("meta"), torch.float32)
    assert stdd_kernels.resolve_backend(None, torch.device("cpu"), torch.float32).name != "triton"
    assert stdd_kernels.resolve_backend("triton", torch.device(DEVICE), torch.float32) is backend


def test_devices_named_without_an_index():
    """``"cuda"`` means the current CUDA device: a phase on cuda:0 passes a check against "cuda"."""
    assert same_device(torch.device("cpu"), "cpu") and same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("meta"), "cpu")
    phase = torch.zeros(1, 3, dtype=torch.int64, device=DEVICE)
    check_phase_tensor(phase, batch=1, num_frames=3, window=(2, 2), device=DEVICE.split(":")[0])
    with pytest.raises(ValueError, match="phase is on"):
        check_phase_tensor(phase, batch=1, num_frames=3, window=(2, 2), device="meta")
    if torch.cuda.is_available():
        assert same_device(torch.device("cuda", torch.cuda.current_device()), "cuda")
        assert not same_device(torch.device("cpu"), "cuda")


def test_launch_config_rule():
    # The rule's intent: few wasted lanes, whole channel blocks for ViT widths.
    if mix_gather_module.interpreting():
        assert mix_gather_module.launch_config(40, 98) == (128, 64, 1)
        return
    block_tokens, block_channels, num_warps = mix_gather_module.launch_config(768, 98)
    assert block_channels == 256 and 768 % block_channels == 0
    assert (-98 % block_tokens) * 16 <= 98 and num_warps == 4


# Runs in a subprocess without TRITON_INTERPRET: the real launchers (launch_config's block
# sizes, real strides and alignments) call the kernels, and Triton's own runtime
# specializes them (strides of 1 become constants, 16-divisible ints and pointers get
# divisibility hints) and compiles them for sm_90, as on an H100/H200. A stand-in
# driver names the target; warmup=True compiles without launching (no GPU needed).
COMPILE_FOR_HOPPER = hopper_script(
    imports="""
    from stdd_kernels import triton_mix_gather, triton_pad_scatter
    from stdd_kernels.geometry import check_phase_tensor, make_geometry, same_device
    """,
    body=r"""
    for kernel in (triton_mix_gather._mix_gather_forward_kernel, triton_mix_gather._mix_gather_backward_kernel,
                   triton_pad_scatter._pad_scatter_forward_kernel, triton_pad_scatter._pad_scatter_backward_kernel):
        compile_instead_of_launching(kernel)

    # [label, dtype, clips, frames, grid, width, wide index, settings]: from the command line.
    for label, dtype, clips, frames, grid, width, wide, settings in json.loads(sys.argv[1]):
        dtype = getattr(torch, dtype)
        triton_mix_gather.needs_wide_index = triton_pad_scatter.needs_wide_index = (lambda *t, w=wide: w)
        rows, tokens = clips * frames, 1 + grid * grid
        geometry = make_geometry(num_tokens=tokens, channels=width, rows=rows, num_frames=frames, window=(2, 2),
                                 channel_fold=32, tensor_name="x", **settings)
        x = torch.zeros(rows, tokens, width, dtype=dtype)
        phase = stdd_kernels.mask_phase(clips, frames)
        start = len(compiled)
        mixed = triton_mix_gather.mix_gather_forward(x, phase, geometry)
        triton_mix_gather.mix_gather_backward(mixed, phase, geometry)
        triton_pad_scatter.pad_scatter_forward(x, mixed, phase, geometry, residual=x)
        triton_pad_scatter.pad_scatter_forward(x, mixed, phase, geometry)
        triton_pad_scatter.pad_scatter_backward(x, phase, geometry, len(geometry.scales))
        blocks = {"kept": triton_mix_gather.launch_config(width, geometry.num_kept)[:2],
                  "patches": triton_mix_gather.launch_config(width, grid * grid)[:2]}
        for kernel, result in compiled[start:]:
            names = list(result.src.signature)
            print(json.dumps(dict(
                config=label, dtype=str(dtype), kernel=kernel.__name__, cubin="cubin" in result.asm,
                launch_config=blocks["kept" if kernel.__name__ == "_mix_gather_forward_kernel" else "patches"],
                constants={names[path[0]]: value for path, value in result.src.constants.items()
                           if isinstance(value, (int, bool))},
                divisible=[names[path[0]] for path, attrs in result.src.attrs.items()
                           if ["tt.divisibility", 16] in [list(a) for a in attrs]],
                ops=sorted(set(re.findall(r"\b(?:ld|st)\.global[.\w]*|\bdiv[.\w]*", result.asm["ptx"]))),
            )))
    """,
)


def compile_for_hopper(configs) -> list[dict]:
    """Run COMPILE_FOR_HOPPER on ``configs``; one record per compiled kernel."""
    return run_hopper_script(COMPILE_FOR_HOPPER, configs, timeout=600)


PAPER_SETTINGS = dict(mask_ratio=0.5, scales=(1, 2), mixing="continual")
# ViT-B/16 and ViT-L/14 (D=1024) shapes.
HOPPER_CONFIGS = [
    ("vit-b16", "bfloat16", 2, 8, 14, 768, False, PAPER_SETTINGS),
    ("vit-b16", "float16", 2, 8, 14, 768, False, PAPER_SETTINGS),
    ("vit-b16", "float32", 2, 8, 14, 768, False, PAPER_SETTINGS),
    ("vit-b16", "float64", 1, 8, 14, 768, False, PAPER_SETTINGS),
    ("vit-b16-wide", "float32", 1, 8, 14, 768, True, PAPER_SETTINGS),
    ("vit-l14", "bfloat16", 1, 8, 16, 1024, False, PAPER_SETTINGS),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_hopper_as_the_launchers_call_them():
    """The interpreter is lenient; compile what really runs on an H100/H200 to sm_90 cubin."""
    records = compile_for_hopper(HOPPER_CONFIGS)
    assert len(records) == 6 * 5 and all(r["cubin"] for r in records)
    by = {(r["config"], r["dtype"], r["kernel"], r["constants"].get("HAS_RESIDUAL")): r for r in records}
    forward = by[("vit-b16", "torch.bfloat16", "_mix_gather_forward_kernel", None)]
    # The runtime specialization, not a hand-written one: unit strides are constants,
    # the block sizes are launch_config's, 16-divisible strides carry the hint.
    assert forward["constants"]["stride_x_channel"] == 1 and forward["constants"]["stride_phase_frame"] == 1
    for record in records:
        assert [record["constants"]["BLOCK_TOKENS"], record["constants"]["BLOCK_CHANNELS"]] == record["launch_config"]
    assert forward["launch_config"] == [8, 256]  # 98 kept tokens, D = 768: see launch_config
    assert {"x_ptr", "mixed_ptr", "stride_x_row", "stride_mixed_row"} <= set(forward["divisible"])
    assert "st.global.v4.b32" in forward["ops"]  # 16-byte stores of 8 bf16 channels
    # fp32 means over scales are IEEE divisions (the reference's), not div.full.f32.
    for key, record in by.items():
        if key[1] == "torch.float32" and key[2].startswith("_pad_scatter"):
            assert "div.rn.f32" in record["ops"] and not any(
                op.startswith(("div.full", "div.approx")) for op in record["ops"]
            ), (key, record["ops"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_official_mixing_kernels_compile_for_hopper():
    """The release's rule (MIXING=3: its clamped gather and the edge frames' extra readers in
    the backward) and the floor rounding, compiled as the launchers call them."""
    official = dict(mask_ratio=0.5, scales=(1, 2), mixing="official", mask_rounding="floor")
    deep = dict(mask_ratio=0.4, scales=(1, 2, 3), mixing="official", mask_rounding="floor")  # m = 1
    records = compile_for_hopper([
        ("vit-b16-official", "bfloat16", 2, 8, 14, 768, False, official),
        ("vit-b16-official", "float32", 2, 8, 14, 768, False, official),
        ("vit-b16-official-s123-m1", "bfloat16", 1, 8, 14, 768, False, deep),
        ("vit-b16-official-wide", "float16", 1, 8, 14, 768, True, official),
    ])
    assert len(records) == 4 * 5 and all(r["cubin"] for r in records)
    mix = [r for r in records if r["kernel"].startswith("_mix_gather")]
    assert len(mix) == 4 * 2 and all(r["constants"]["MIXING"] == 3 for r in mix)
    assert {r["constants"]["MASKED"] for r in records} == {1, 2}  # floor(0.4 * 4) = 1, floor(0.5 * 4) = 2
    forward = next(r for r in mix if r["config"] == "vit-b16-official" and r["dtype"] == "torch.bfloat16"
                   and r["kernel"] == "_mix_gather_forward_kernel")
    assert forward["launch_config"] == [8, 256] and "st.global.v4.b32" in forward["ops"]
    for record in records:
        assert [record["constants"]["BLOCK_TOKENS"], record["constants"]["BLOCK_CHANNELS"]] == record["launch_config"]


# ---------------------------------------------------------------------------
# GPU only (bench/gpu_check.sh)
# ---------------------------------------------------------------------------

VIT_B16 = Case("vit-b16-B4-T8", 4, 8, 14, 768, (2, 2), 0.5, (1, 2), 32, "continual", "shuffle")
VIT_B16_OFFICIAL = Case("vit-b16-B4-T8-official", 4, 8, 14, 768, (2, 2), 0.5, (1, 2), 32, "official", "shuffle", "floor")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("case", [VIT_B16, VIT_B16_OFFICIAL], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_vit_b16_shapes(dtype, case):
    assert DEVICE == "cuda", "CUDA tests need the compiled kernels: unset TRITON_INTERPRET"
    geometry = geometry_of(case)
    rows, tokens, D = case.clips * case.frames, 1 + case.grid**2, case.channels
    phase = phases_of(case, seed=71)
    x = randn(rows, tokens, D, dtype=dtype, seed=72)
    shape = (2, rows, 1 + geometry.num_kept, D)
    mixed = mix_gather_module.mix_gather_forward(x, phase, geometry, out=nan_like(shape, dtype))
    assert_fully_written(mixed, "mix_gather")
    torch.testing.assert_close(mixed, reference.mix_gather(x, phase, geometry), rtol=0, atol=0)
    upstream = randn(*shape, dtype=dtype, seed=73)
    dx = mix_gather_module.mix_gather_backward(upstream, phase, geometry, out=nan_like(x.shape, dtype))
    assert_fully_written(dx, "mix_gather backward")
    _, (dx_low,) = reference_grads(lambda t: reference.mix_gather(t, phase, geometry), [x], upstream)
    _, (dx_exact,) = reference_grads(
        lambda t: reference.mix_gather(t, phase, geometry), [x.double()], upstream.double()
    )
    assert_within_twice_torch_error(dx, dx_low, dx_exact, "mix_gather backward")
    residual = randn(rows, tokens, D, dtype=dtype, seed=74)
    out = pad_scatter_module.pad_scatter_forward(x, mixed, phase, geometry, residual, out=nan_like(x.shape, dtype))
    assert_fully_written(out, "pad_scatter")
    low = reference.pad_scatter(x, mixed, phase, geometry, residual)
    exact = reference.pad_scatter(x.double(), mixed.double(), phase, geometry, residual.double())
    assert_within_twice_torch_error(out, low, exact, "pad_scatter")
    grad_full, grad_mixed = pad_scatter_module.pad_scatter_backward(
        residual, phase, geometry, 2, out=(nan_like(x.shape, dtype), nan_like(shape, dtype))
    )
    assert_fully_written(grad_full, "pad_scatter d_full")
    assert_fully_written(grad_mixed, "pad_scatter d_mixed")
    _, (full_low, mixed_low) = reference_grads(
        lambda f, m: reference.pad_scatter(f, m, phase, geometry), [x, mixed], residual
    )
    torch.testing.assert_close(grad_full, full_low, rtol=0, atol=0)
    torch.testing.assert_close(grad_mixed, mixed_low, rtol=0, atol=0)  # /2 is exact


@pytest.mark.cuda
@cuda_only
def test_cuda_odd_shapes_fp32():
    """The CPU grid again on the GPU (compiled kernels, GPU launch config)."""
    assert DEVICE == "cuda"
    for case in CASES:
        test_mix_gather_forward_and_gradient_match_reference(case)
        test_pad_scatter_forward_and_gradients_match_reference(case)
