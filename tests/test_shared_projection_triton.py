"""Triton shared-projection kernels (docs/stca.md, section 6) against the reference, forward and backward.

``mix_factors`` and ``project_mixed`` (stdd_kernels/triton_mix_project.py) are checked
against :func:`stdd_kernels.reference.mix_factors` / ``project_mixed`` and their autograd,
the public op ``stdd_kernels.mix_project(..., backend="triton")`` against the reference
backend for every differentiable input (x, qkv, the LayerNorm's weight and bias, the
in-projection's weight and bias) with the same upstream gradients.

On a CPU-only machine the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py); a few combined cases cover T = 1, 2, 3, 4, B = 1, 2, D not a
power of two, P = 2, 4, 6, windows (2, 2) / (2, 1), mask ratios 0, 0.25, 0.4 (floor),
0.5, 0.75, scales (1, 2), (1, 2, 3), (2,), every mixing rule, an outlier channel 30x
the others (mostly a borrowed one, so that the clip edges' zeros drop it: ``sd_m << sd_x``). Every
kernel output and internal buffer is NaN-filled before the kernel runs and checked.

float64: within 1e-12 of the largest element. Low precision (float32, float16, bfloat16)
follows flash-attention's rule: the kernel's error against the float64 reference is at
most twice that of the reference computed in the same precision (for the public op, over
several upstream gradients: see check_mix_project_low_precision). Triton's interpreter
gets bfloat16 ``tl.dot`` wrong, so project_mixed's bfloat16 forward runs on a GPU only
(``cuda`` tests; here it is compiled for sm_90 and checked to be tensor-core dots).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined (see reload_kernels)

import pytest
import torch.nn.functional as F

import stdd_kernels
from stdd_kernels import reference
from stdd_kernels.geometry import make_geometry
from triton_helpers import GraphRecorder, hopper_script, run_hopper_script

triton_backend = importlib.import_module("stdd_kernels.triton_backend")
triton_backend.reload_kernels()  # in case stdd_kernels was imported before the variable was set
kernels = importlib.import_module("stdd_kernels.triton_mix_project")

DEVICE = "cpu" if kernels.interpreting() else "cuda"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
bf16_dot_on_gpu_only = pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 tl.dot wrongly; compiled and run on GPUs only"
)
EPS = 1e-5


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
    outlier: int = 1  # the channel 30x the others

    def __str__(self):
        return self.name


CASES = [
    Case("T1-B1-P2-D24", 1, 1, 2, 24, (2, 2), 0.5, (1, 2), 4, "continual", "train"),
    Case("T2-B2-P4-D36-w21-s123", 2, 2, 4, 36, (2, 1), 0.5, (1, 2, 3), 3, "continual", "shuffle"),
    Case("T3-B1-P6-D40-separate-r025-s2", 1, 3, 6, 40, (2, 2), 0.25, (2,), 5, "separate", "train", outlier=30),
    Case("T4-B1-P4-D26-official-s123-floor", 1, 4, 4, 26, (2, 2), 0.4, (1, 2, 3), 2, "official", "shuffle", "floor"),
    Case("T3-B2-P4-D24-r075", 2, 3, 4, 24, (2, 2), 0.75, (1, 2), 4, "continual", "eval"),
    Case("T2-B1-P6-D20-w21-none-r0", 1, 2, 6, 20, (2, 1), 0.0, (1, 2), 4, "none", "eval"),
    Case("T3-B1-P4-D24-official-r0", 1, 3, 4, 24, (2, 2), 0.0, (1, 2), 4, "official", "shuffle"),
    Case("T2-B2-P4-D40-w21-official-s2", 2, 2, 4, 40, (2, 1), 0.5, (2,), 5, "official", "train"),
]


def geometry_of(case: Case):
    return make_geometry(
        num_tokens=1 + case.grid**2, channels=case.channels, rows=case.clips * case.frames,
        num_frames=case.frames, window=case.window, mask_ratio=case.mask_ratio, scales=case.scales,
        channel_fold=case.channel_fold, mixing=case.mixing, tensor_name="x", mask_rounding=case.mask_rounding,
    )


def phases_of(case: Case, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mode = "eval" if case.phases == "eval" else "train"
    return stdd_kernels.mask_phase(
        case.clips, case.frames, window=case.window, mode=mode, generator=generator if mode == "train" else None,
        shuffle=case.phases == "shuffle", device=DEVICE,
    )


def randn(*shape, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(DEVICE, dtype)


def tokens_of(case: Case, dtype=torch.float64, seed=1):
    x = randn(case.clips * case.frames, 1 + case.grid**2, case.channels, seed=seed)
    x[..., case.outlier] *= 30
    return x.to(dtype)


def ln_weight_of(case: Case, dtype=torch.float64, seed=2):
    return (1 + 0.3 * randn(case.channels, seed=seed)).to(dtype)


def nan_like(shape, dtype):
    return torch.full(tuple(shape), float("nan"), dtype=dtype, device=DEVICE)


def assert_fully_written(tensor: torch.Tensor, what: str):
    missing = torch.isnan(tensor)
    assert not missing.any(), f"{what}: {int(missing.sum())} of {tensor.numel()} elements never written"


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """Internal buffers NaN-filled: an element read before the kernels wrote it shows in the results."""
    monkeypatch.setattr(
        kernels, "scratch_buffer",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def assert_close_f64(got, want, what):
    """float64: every element within 1e-12 of the tensor's largest (and 1e-12 relative)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * max(scale, 1e-300), msg=lambda m: f"{what}: {m}")


def assert_within_twice_torch_error(kernel_out, torch_low, exact, what):
    """flash-attention's rule: max |kernel - exact| <= 2 max |torch_low - exact|."""
    kernel_error = (kernel_out.double() - exact).abs().max().item()
    torch_error = (torch_low.double() - exact).abs().max().item()
    assert kernel_error <= 2 * torch_error, (
        f"{what}: kernel error {kernel_error:.3g} > 2x the reference's own {kernel_out.dtype} error {torch_error:.3g}"
    )


def factor_upstream(case: Case, geometry, factor_dtype, mean_dtype, seed):
    """Upstream gradients of (gain, coefficients, mixed_mean)."""
    rows, num_mixed = case.clips * case.frames, 1 + geometry.num_kept
    shape = (len(case.scales), rows, num_mixed)
    return (
        randn(*shape, dtype=factor_dtype, seed=seed),
        randn(*shape, geometry.borrowed_channels + 2, dtype=factor_dtype, seed=seed + 1),
        randn(rows, num_mixed, case.channels, dtype=mean_dtype, seed=seed + 2),
    )


def reference_factors_and_grads(x, weight, phase, geometry, upstream):
    leaves = [x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)]
    outputs = reference.mix_factors(*leaves, phase, geometry, EPS)
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs], grads


def projection_inputs(case: Case, geometry, qkv_dtype=torch.float64, factor_dtype=torch.float64, seed=20):
    rows, tokens, width = case.clips * case.frames, 1 + case.grid**2, 3 * case.channels
    num_mixed, scales = 1 + geometry.num_kept, len(case.scales)
    qkv = randn(rows, tokens, width, dtype=qkv_dtype, seed=seed)
    gain = (1 + 0.5 * randn(scales, rows, num_mixed, seed=seed + 1)).to(factor_dtype)
    coefficients = randn(scales, rows, num_mixed, geometry.borrowed_channels + 2, dtype=factor_dtype, seed=seed + 2)
    basis = randn(width, geometry.borrowed_channels + 2, dtype=factor_dtype, seed=seed + 3, scale=0.3)
    return qkv, gain, coefficients, basis


def reference_projection_and_grads(inputs, phase, geometry, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = reference.project_mixed(*leaves, phase, geometry)
    return out.detach(), torch.autograd.grad(out, leaves, upstream)


# ---------------------------------------------------------------------------
# Launchers against the reference, float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_factors_forward_and_backward_match_reference(case, poisoned_scratch):
    geometry = geometry_of(case)
    x, weight, phase = tokens_of(case), ln_weight_of(case), phases_of(case, seed=3)
    upstream = factor_upstream(case, geometry, torch.float64, torch.float64, seed=4)
    expected, (expected_dx, expected_dw) = reference_factors_and_grads(x, weight, phase, geometry, upstream)

    poison = tuple(nan_like(t.shape, t.dtype) for t in expected)
    got = kernels.mix_factors_forward(x, weight, phase, geometry, EPS, out=poison)
    for name, tensor, want in zip(("gain", "coefficients", "mixed_mean"), got, expected):
        assert_fully_written(tensor, f"mix_factors {name}")
        assert_close_f64(tensor, want, f"mix_factors {name}")

    dx, dw = kernels.mix_factors_backward(*upstream, x, weight, phase, geometry, EPS, out=nan_like(x.shape, x.dtype))
    assert_fully_written(dx, "mix_factors backward d_x")
    assert_close_f64(dx, expected_dx, "d_x")
    assert_close_f64(dw, expected_dw, "d_ln_weight")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_mix_factors_backward_with_absent_gradients(case, poisoned_scratch):
    """Each upstream gradient may be None (zero): the kernels skip it."""
    geometry = geometry_of(case)
    x, weight, phase = tokens_of(case, seed=5), ln_weight_of(case, seed=6), phases_of(case, seed=7)
    upstream = factor_upstream(case, geometry, torch.float64, torch.float64, seed=8)
    for present in ((0,), (1,), (2,), ()):
        given = [g if i in present else None for i, g in enumerate(upstream)]
        zeros = [g if i in present else torch.zeros_like(g) for i, g in enumerate(upstream)]
        _, (expected_dx, expected_dw) = reference_factors_and_grads(x, weight, phase, geometry, zeros)
        dx, dw = kernels.mix_factors_backward(*given, x, weight, phase, geometry, EPS)
        assert_close_f64(dx, expected_dx, f"d_x with gradients {present}")
        assert_close_f64(dw, expected_dw, f"d_ln_weight with gradients {present}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_project_mixed_forward_and_backward_match_reference(case):
    geometry = geometry_of(case)
    phase = phases_of(case, seed=9)
    inputs = projection_inputs(case, geometry)
    upstream = randn(len(case.scales), case.clips * case.frames, 1 + geometry.num_kept, 3 * case.channels, seed=10)
    expected, expected_grads = reference_projection_and_grads(inputs, phase, geometry, upstream)

    out = kernels.project_mixed_forward(*inputs, phase, geometry, out=nan_like(expected.shape, expected.dtype))
    assert_fully_written(out, "project_mixed")
    assert_close_f64(out, expected, "project_mixed")

    qkv, gain = inputs[:2]
    grads = kernels.project_mixed_backward(
        upstream, *inputs, phase, geometry, out=(nan_like(qkv.shape, qkv.dtype), nan_like(gain.shape, gain.dtype))
    )
    for name, grad, want in zip(("qkv", "gain", "coefficients", "basis"), grads, expected_grads):
        assert_fully_written(grad, f"project_mixed backward d_{name}")
        assert_close_f64(grad, want, f"d_{name}")


def test_noncontiguous_inputs_and_gradients(poisoned_scratch):
    """Channel-strided x and qkv, transposed factors and basis, an int32 column-major phase,
    expanded (stride-0) and permuted upstream gradients."""
    case = CASES[1]
    geometry = geometry_of(case)
    rows, D = case.clips * case.frames, case.channels
    x = tokens_of(case).permute(2, 0, 1).contiguous().permute(1, 2, 0)  # channel stride B*T*(1+N)
    weight = (randn(2 * D, seed=11) + 1)[::2]  # stride 2
    phase = phases_of(case, seed=12).to(torch.int32).t().contiguous().t()
    assert not (x.is_contiguous() or weight.is_contiguous() or phase.is_contiguous())
    upstream = [g.transpose(-1, -2).contiguous().transpose(-1, -2) for g in
                factor_upstream(case, geometry, torch.float64, torch.float64, seed=13)]
    upstream[0] = torch.ones(1, 1, 1, dtype=torch.float64, device=DEVICE).expand_as(upstream[0])
    expected, (expected_dx, expected_dw) = reference_factors_and_grads(x, weight, phase, geometry, upstream)
    for name, got, want in zip(("gain", "coefficients", "mixed_mean"),
                               kernels.mix_factors_forward(x, weight, phase, geometry, EPS), expected):
        assert_close_f64(got, want, name)
    dx, dw = kernels.mix_factors_backward(*upstream, x, weight, phase, geometry, EPS)
    assert_close_f64(dx, expected_dx, "d_x")
    assert_close_f64(dw, expected_dw, "d_ln_weight")

    qkv, gain, coefficients, basis = projection_inputs(case, geometry, seed=14)
    qkv = qkv.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    gain = gain.transpose(0, 1).contiguous().transpose(0, 1)
    coefficients = coefficients.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    basis = basis.t().contiguous().t()
    inputs = (qkv, gain, coefficients, basis)
    assert not any(t.is_contiguous() for t in inputs)
    shape = (len(case.scales), rows, 1 + geometry.num_kept, 3 * D)
    upstream = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=DEVICE).expand(shape)
    expected, expected_grads = reference_projection_and_grads(inputs, phase, geometry, upstream)
    assert_close_f64(kernels.project_mixed_forward(*inputs, phase, geometry), expected, "project_mixed")
    for name, got, want in zip(("qkv", "gain", "coefficients", "basis"),
                               kernels.project_mixed_backward(upstream, *inputs, phase, geometry), expected_grads):
        assert_close_f64(got, want, f"d_{name}")


def test_wide_index_path_matches_reference(monkeypatch):
    """Tensors past 2**31 elements switch the kernels to int64 offsets; force that path here."""
    monkeypatch.setattr(kernels, "needs_wide_index", lambda *tensors: True)
    case = CASES[3]
    geometry = geometry_of(case)
    x, weight, phase = tokens_of(case, seed=15), ln_weight_of(case, seed=16), phases_of(case, seed=17)
    upstream = factor_upstream(case, geometry, torch.float64, torch.float64, seed=18)
    expected, expected_grads = reference_factors_and_grads(x, weight, phase, geometry, upstream)
    for got, want in zip(kernels.mix_factors_forward(x, weight, phase, geometry, EPS), expected):
        assert_close_f64(got, want, "mix_factors")
    for got, want in zip(kernels.mix_factors_backward(*upstream, x, weight, phase, geometry, EPS), expected_grads):
        assert_close_f64(got, want, "mix_factors backward")
    inputs = projection_inputs(case, geometry, seed=19)
    grad_out = randn(len(case.scales), x.shape[0], 1 + geometry.num_kept, 3 * case.channels, seed=20)
    expected, expected_grads = reference_projection_and_grads(inputs, phase, geometry, grad_out)
    assert_close_f64(kernels.project_mixed_forward(*inputs, phase, geometry), expected, "project_mixed")
    for got, want in zip(kernels.project_mixed_backward(grad_out, *inputs, phase, geometry), expected_grads):
        assert_close_f64(got, want, "project_mixed backward")


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=str)  # K = 2 and 4; continual and official
def test_out_of_range_phase_is_reduced_mod_K(case, poisoned_scratch):
    """validate=False skips the phase range check: a phase outside [0, K), negative ones too,
    gives the result of its residue mod K, in every kernel and through the public op."""
    geometry = geometry_of(case)
    K = case.window[0] * case.window[1]
    phase = phases_of(case, seed=21)
    shifts = torch.randint(-40, 40, phase.shape, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    shifts.view(-1)[0] = -1  # at least one negative
    wild = phase + K * shifts
    assert int(wild.min()) < 0 and torch.equal(wild % K, phase)
    x, weight = tokens_of(case, seed=23), ln_weight_of(case, seed=24)
    upstream = factor_upstream(case, geometry, torch.float64, torch.float64, seed=25)
    expected, expected_grads = reference_factors_and_grads(x, weight, phase, geometry, upstream)
    for got, want in zip(kernels.mix_factors_forward(x, weight, wild, geometry, EPS), expected):
        assert_close_f64(got, want, "mix_factors")
    for got, want in zip(kernels.mix_factors_backward(*upstream, x, weight, wild, geometry, EPS), expected_grads):
        assert_close_f64(got, want, "mix_factors backward")
    inputs = projection_inputs(case, geometry, seed=26)
    grad_out = randn(len(case.scales), x.shape[0], 1 + geometry.num_kept, 3 * case.channels, seed=27)
    expected, expected_grads = reference_projection_and_grads(inputs, phase, geometry, grad_out)
    assert_close_f64(kernels.project_mixed_forward(*inputs, wild, geometry), expected, "project_mixed")
    for got, want in zip(kernels.project_mixed_backward(grad_out, *inputs, wild, geometry), expected_grads):
        assert_close_f64(got, want, "project_mixed backward")

    weights = layer_weights(case)
    with pytest.raises(ValueError, match=r"phase values must be in \[0, K\)"):
        mix_project(case, x, full_path_qkv(x, weights), weights, wild, "triton")
    got = mix_project(case, x, full_path_qkv(x, weights), weights, wild, "triton", validate=False)
    want = mix_project(case, x, full_path_qkv(x, weights), weights, phase, "reference")
    for a, b in zip(got, want):
        assert_close_f64(a, b, "mix_project, unchecked phase")


# ---------------------------------------------------------------------------
# The public op: mix_project(..., backend="triton") against the reference backend
# ---------------------------------------------------------------------------


def layer_weights(case: Case, dtype=torch.float64, seed=30):
    """(ln_weight, ln_bias, in_proj_weight, in_proj_bias) of a LayerNorm + packed projection."""
    D = case.channels
    return (
        (1 + 0.3 * randn(D, seed=seed)).to(dtype),
        randn(D, dtype=dtype, seed=seed + 1, scale=0.2),
        randn(3 * D, D, dtype=dtype, seed=seed + 2, scale=D**-0.5),
        randn(3 * D, dtype=dtype, seed=seed + 3, scale=0.2),
    )


def full_path_qkv(x, weights, dtype=None):
    """The full path's qkv; with ``dtype`` computed in the weights' dtype and rounded to it
    (as under autocast, where the LayerNorm runs in float32)."""
    ln_weight, ln_bias, in_proj_weight, in_proj_bias = weights
    tokens = x if dtype is None else x.to(in_proj_weight.dtype)
    qkv = F.linear(F.layer_norm(tokens, x.shape[-1:], ln_weight, ln_bias, EPS), in_proj_weight, in_proj_bias)
    return qkv if dtype is None else qkv.to(dtype)


def mix_project(case: Case, x, qkv, weights, phase, backend, validate=True):
    ln_weight, ln_bias, in_proj_weight, in_proj_bias = weights
    return stdd_kernels.mix_project(
        x, qkv, case.frames, ln_weight=ln_weight, ln_bias=ln_bias, ln_eps=EPS, in_proj_weight=in_proj_weight,
        in_proj_bias=in_proj_bias, scales=case.scales, channel_fold=case.channel_fold, window=case.window,
        mask_ratio=case.mask_ratio, mask_rounding=case.mask_rounding, phase=phase, mixing=case.mixing,
        backend=backend, validate=validate,
    )


def mix_project_with_grads(case, x, weights, phase, backend, qkv_dtype=None, upstream_seed=40):
    """Outputs of mix_project and the gradients of (x, qkv, ln_weight, ln_bias, in_proj_weight,
    in_proj_bias) for fixed random upstream gradients; qkv is the full path's projection of x
    (a leaf, as the model's full path hands it over)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, full_path_qkv(x, weights, qkv_dtype), *weights)]
    qkv_mixed, mixed_mean = mix_project(case, leaves[0], leaves[1], leaves[2:], phase, backend)
    upstream = (randn(*qkv_mixed.shape, dtype=qkv_mixed.dtype, seed=upstream_seed),
                randn(*mixed_mean.shape, dtype=mixed_mean.dtype, seed=upstream_seed + 1))
    grads = torch.autograd.grad((qkv_mixed, mixed_mean), leaves, upstream)
    return [qkv_mixed.detach(), mixed_mean.detach(), *grads]


PUBLIC_NAMES = ("qkv_mixed", "mixed_mean", "d_x", "d_qkv", "d_ln_weight", "d_ln_bias", "d_in_proj_weight",
                "d_in_proj_bias")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_project_matches_reference_backend_and_the_projection_of_the_mixed_tokens(case):
    x, weights, phase = tokens_of(case, seed=31), layer_weights(case), phases_of(case, seed=32)
    got = mix_project_with_grads(case, x, weights, phase, "triton")
    expected = mix_project_with_grads(case, x, weights, phase, "reference")
    for name, a, b in zip(PUBLIC_NAMES, got, expected):
        assert_close_f64(a, b, name)
    # ... which is what projecting the mixed tokens gives (section 6's identity).
    mixed = reference.mix_gather(x, phase, geometry_of(case))
    assert_close_f64(got[0], full_path_qkv(mixed, weights), "qkv_mixed vs the projected mixed tokens")
    assert_close_f64(got[1], mixed.mean(0), "mixed_mean")


# ---------------------------------------------------------------------------
# Low precision: at most twice the reference's own error
# ---------------------------------------------------------------------------

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION_CASES = [CASES[1], CASES[3]]  # three scales, continual / official, the outlier on a borrowed channel


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_mix_factors_low_precision(dtype, case, poisoned_scratch):
    geometry = geometry_of(case)
    factor = reference.factor_dtype(dtype)
    x, weight, phase = tokens_of(case, dtype, seed=50), ln_weight_of(case, factor, seed=51), phases_of(case, seed=52)
    upstream = factor_upstream(case, geometry, factor, dtype, seed=53)
    low, low_grads = reference_factors_and_grads(x, weight, phase, geometry, upstream)
    exact, exact_grads = reference_factors_and_grads(
        x.double(), weight.double(), phase, geometry, [g.double() for g in upstream]
    )
    poison = tuple(nan_like(t.shape, t.dtype) for t in low)
    got = kernels.mix_factors_forward(x, weight, phase, geometry, EPS, out=poison)
    for name, tensor, torch_low, want in zip(("gain", "coefficients", "mixed_mean"), got, low, exact):
        assert tensor.dtype == torch_low.dtype
        assert_fully_written(tensor, f"{name} {dtype}")
        assert_within_twice_torch_error(tensor, torch_low, want, f"mix_factors {name} {dtype}")
    dx, dw = kernels.mix_factors_backward(*upstream, x, weight, phase, geometry, EPS, out=nan_like(x.shape, dtype))
    assert_fully_written(dx, f"d_x {dtype}")
    assert dx.dtype == dtype and dw.dtype == factor
    assert_within_twice_torch_error(dx, low_grads[0], exact_grads[0], f"mix_factors d_x {dtype}")
    assert_within_twice_torch_error(dw, low_grads[1], exact_grads[1], f"mix_factors d_ln_weight {dtype}")


@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_project_mixed_low_precision(dtype, case):
    """qkv in the low dtype, factors and basis in float32 (as mix_project hands them over); the
    fp16/bf16 forward runs tensor-core dots on split operands (see _dot_into). The bfloat16
    forward runs on GPUs only (the interpreter's bfloat16 tl.dot); its backward has no dot."""
    geometry = geometry_of(case)
    phase = phases_of(case, seed=60)
    inputs = projection_inputs(case, geometry, qkv_dtype=dtype, factor_dtype=torch.float32, seed=61)
    grad_out = randn(len(case.scales), inputs[0].shape[0], 1 + geometry.num_kept, 3 * case.channels, dtype=dtype,
                     seed=62)
    low, low_grads = reference_projection_and_grads(inputs, phase, geometry, grad_out)
    exact, exact_grads = reference_projection_and_grads(
        [t.double() for t in inputs], phase, geometry, grad_out.double()
    )
    if dtype != torch.bfloat16 or DEVICE != "cpu":
        out = kernels.project_mixed_forward(*inputs, phase, geometry, out=nan_like(low.shape, dtype))
        assert_fully_written(out, f"project_mixed {dtype}")
        assert_within_twice_torch_error(out, low, exact, f"project_mixed {dtype}")
    grads = kernels.project_mixed_backward(grad_out, *inputs, phase, geometry)
    for name, grad, torch_low, want in zip(("qkv", "gain", "coefficients", "basis"), grads, low_grads, exact_grads):
        assert grad.dtype == torch_low.dtype
        assert_within_twice_torch_error(grad, torch_low, want, f"project_mixed d_{name} {dtype}")


def mix_project_draws(case, x, weights, phase, backend, qkv_dtype, draws):
    """``mix_project_with_grads`` for ``draws`` upstream gradients (one forward): a list per draw."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, full_path_qkv(x, weights, qkv_dtype), *weights)]
    qkv_mixed, mixed_mean = mix_project(case, leaves[0], leaves[1], leaves[2:], phase, backend)
    results = []
    for draw in range(draws):
        # Upstream gradients in the outputs' dtypes (qkv's and x's: the low dtype).
        upstream = [randn(*t.shape, dtype=t.dtype, seed=40 + 10 * draw + i)
                    for i, t in enumerate((qkv_mixed, mixed_mean))]
        grads = torch.autograd.grad((qkv_mixed, mixed_mean), leaves, upstream, retain_graph=True)
        results.append([qkv_mixed.detach(), mixed_mean.detach(), *grads])
    return results


def check_mix_project_low_precision(case: Case, dtype, draws=4):
    """The public op on low-precision tokens and projections (weights float32, as under
    autocast): outputs and every gradient within twice the reference backend's error.

    Each error is the largest over the tensor, then the root mean square over ``draws``
    upstream gradients. The weights' gradients are sums over every mixed token whose
    largest elements (an outlier channel's) carry the rounding of the float32 GEMMs both
    backends share (``grad @ basis``, ``grad^T @ coefficients``) as much as their own; in
    one draw the reference's own rounding can cancel that shared error and its error look
    several times smaller than it is (and the kernels' the larger, though they add less of
    their own). Over draws the shared part is common to both and the comparison is of what
    each adds.
    """
    x, phase = tokens_of(case, dtype, seed=70), phases_of(case, seed=71)
    weights = layer_weights(case, torch.float32, seed=72)
    got = mix_project_draws(case, x, weights, phase, "triton", dtype, draws)
    low = mix_project_draws(case, x, weights, phase, "reference", dtype, draws)
    # The same inputs (x, the rounded qkv, the weights) and upstream gradients in float64.
    exact_weights = [w.double() for w in weights]
    exact_qkv = full_path_qkv(x, weights, dtype).double()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x.double(), exact_qkv, *exact_weights)]
    qkv_mixed, mixed_mean = mix_project(case, leaves[0], leaves[1], leaves[2:], phase, "reference")
    errors = {}  # name -> (sum of squared kernel errors, of the reference's)
    for draw in range(draws):
        upstream = [randn(*t.shape, dtype=dtype, seed=40 + 10 * draw + i).double()
                    for i, t in enumerate((qkv_mixed, mixed_mean))]
        exact = [qkv_mixed.detach(), mixed_mean.detach(),
                 *torch.autograd.grad((qkv_mixed, mixed_mean), leaves, upstream, retain_graph=True)]
        for name, a, b, want in zip(PUBLIC_NAMES, got[draw], low[draw], exact):
            assert a.dtype == b.dtype, name
            kernel, reference_error = errors.get(name, (0.0, 0.0))
            errors[name] = (kernel + (a.double() - want).abs().max().item() ** 2,
                            reference_error + (b.double() - want).abs().max().item() ** 2)
    for name, (kernel_error, torch_error) in errors.items():
        assert kernel_error <= 4 * torch_error, (  # squares: twice the root mean square
            f"mix_project {name} {dtype}: kernel error {(kernel_error / draws) ** 0.5:.3g} > 2x the reference's "
            f"own error {(torch_error / draws) ** 0.5:.3g} (root mean square over {draws} upstream gradients)"
        )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_dot_on_gpu_only)], ids=str
)
def test_mix_project_low_precision(dtype):
    check_mix_project_low_precision(CASES[3], dtype)


# ---------------------------------------------------------------------------
# Op registration, torch.compile, double backward, dispatch
# ---------------------------------------------------------------------------


def test_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) impls and autograd registration of the four stdd_triton ops."""
    case = Case("tiny", 1, 3, 2, 8, (2, 2), 0.5, (1, 2), 2, "continual", "train")
    geometry = geometry_of(case)
    phase = phases_of(case, seed=80)
    x = tokens_of(case, torch.float32, seed=81).requires_grad_(True)
    weight = ln_weight_of(case, torch.float32, seed=82).requires_grad_(True)
    settings = (case.frames, 2, 2, geometry.masked, list(case.scales), case.channel_fold, case.mixing)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.stdd_triton.mix_factors.default, (x, weight, phase, EPS, *settings),
                          test_utils=utils)
    upstream = factor_upstream(case, geometry, torch.float32, torch.float32, seed=83)
    for present in (upstream, (None, upstream[1], None)):
        torch.library.opcheck(torch.ops.stdd_triton.mix_factors_backward.default,
                              (*present, x, weight, phase, EPS, *settings), test_utils=utils)
    inputs = [t.requires_grad_(True) for t in projection_inputs(case, geometry, torch.float32, torch.float32)]
    scatter_settings = (case.frames, 2, 2, geometry.masked)
    torch.library.opcheck(torch.ops.stdd_triton.project_mixed.default, (*inputs, phase, *scatter_settings),
                          test_utils=utils)
    grad_out = randn(2, 3, 1 + geometry.num_kept, 3 * case.channels, dtype=torch.float32, seed=84)
    torch.library.opcheck(torch.ops.stdd_triton.project_mixed_backward.default,
                          (grad_out, *inputs, phase, *scatter_settings), test_utils=utils)


def test_double_backward_is_refused_loudly():
    case = CASES[0]
    x, weights, phase = tokens_of(case, seed=90).requires_grad_(True), layer_weights(case), phases_of(case, seed=91)
    qkv_mixed, mixed_mean = mix_project(case, x, full_path_qkv(x, weights), weights, phase, "triton")
    (grad_x,) = torch.autograd.grad(qkv_mixed.square().sum() + mixed_mean.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward of the shared projections is not implemented"):
        grad_x.square().sum().backward()


def test_mix_project_traces_fullgraph():
    """torch.compile(fullgraph=True) over the full path's projection, mix_project (validate=False)
    and something after it: one graph with the stdd_triton ops, the same numbers and gradients."""
    case = CASES[1]
    phase = phases_of(case, seed=100)

    def step(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, backend):
        weights = (ln_weight, ln_bias, in_proj_weight, in_proj_bias)
        qkv_mixed, mixed_mean = mix_project(case, x, full_path_qkv(x, weights), weights, phase, backend,
                                            validate=False)
        return torch.tanh(qkv_mixed).sum() + mixed_mean.square().sum()

    torch._dynamo.reset()
    recorder = GraphRecorder()
    compiled = torch.compile(step, fullgraph=True, backend=recorder)
    inputs = (tokens_of(case, seed=101), *layer_weights(case, seed=102))  # float64: the same numbers to 1e-12

    def loss_and_grads(fn, backend):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        loss = fn(*leaves, backend)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    got = loss_and_grads(compiled, "triton")
    expected = loss_and_grads(step, "reference")
    assert len(recorder.graphs) == 1
    assert "stdd_triton.mix_factors" in recorder.code() and "stdd_triton.project_mixed" in recorder.code()
    for name, a, b in zip(("loss", "d_x", "d_ln_weight", "d_ln_bias", "d_in_proj_weight", "d_in_proj_bias"),
                          got, expected):
        assert_close_f64(a, b, name)


def test_triton_backend_registers_the_shared_projections():
    backend = stdd_kernels.registered_backends()["triton"]
    assert backend.mix_factors is triton_backend.triton_mix_factors
    assert backend.project_mixed is triton_backend.triton_project_mixed


RUN_AFTER_RELOAD = textwrap.dedent(
    r"""
    import sys, torch, triton
    import stdd_kernels
    from stdd_kernels import triton_backend, triton_mix_project
    assert not triton_mix_project.interpreting()
    triton.knobs.runtime.interpret = True
    assert triton_backend.reload_kernels() and triton_mix_project.interpreting()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 17, 24, generator=g, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
               for shape in ((24,), (24,), (72, 24), (72,))]
    phase = stdd_kernels.mask_phase(2, 3, mode="train", generator=g)
    def run(backend):
        qkv = torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (24,), *weights[:2]), *weights[2:])
        out = stdd_kernels.mix_project(x, qkv, 3, ln_weight=weights[0], ln_bias=weights[1], ln_eps=1e-5,
                                       in_proj_weight=weights[2], in_proj_bias=weights[3], channel_fold=4,
                                       phase=phase, backend=backend)
        loss = out[0].square().sum() + out[1].square().sum()
        return [loss, *torch.autograd.grad(loss, [x, *weights])]
    for a, b in zip(run("triton"), run("reference")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())
    print("ok")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reload_kernels matters on CPU-only machines")
def test_kernels_run_in_the_interpreter_after_reload():
    """stdd_kernels imported without TRITON_INTERPRET, then the interpreter switched on and
    reload_kernels(): the shared-projection kernels (their reductions included) run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", RUN_AFTER_RELOAD], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-4000:]


def test_launchers_name_bad_factor_arguments():
    case = CASES[0]
    geometry = geometry_of(case)
    x, phase = tokens_of(case, torch.float32), phases_of(case, seed=110)
    with pytest.raises(ValueError, match="ln_weight must be a torch.float32 tensor"):
        kernels.mix_factors_forward(x, ln_weight_of(case, torch.float64), phase, geometry, EPS)
    qkv, gain, coefficients, basis = projection_inputs(case, geometry, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="gain must be a float32 or float64 tensor"):
        kernels.project_mixed_forward(qkv, gain.half(), coefficients, basis, phase, geometry)
    with pytest.raises(ValueError, match="basis must be a torch.float32 tensor"):
        kernels.project_mixed_forward(qkv, gain, coefficients, basis.double(), phase, geometry)
    with pytest.raises(ValueError, match=r"basis must be a torch.float32 tensor of shape \(72, 14\)"):
        kernels.project_mixed_forward(qkv, gain, coefficients, basis[:, :-1], phase, geometry)


def test_launch_config_rules():
    if kernels.interpreting():  # one program per row / per 2**16 output elements
        assert kernels.factor_launch_config(40, 99) == (128, 1)
        assert kernels.projection_launch_config(120, 18, 40, kernels.DOT_FLOAT32) == (64, 128, 32, 1)
        return
    # ViT-B/16: D = 768 (1024 lanes), 1 + N_keep = 99 mixed tokens per row, 2I + 2 = 50 coefficients.
    assert kernels.factor_launch_config(768, 99) == (4, 4)  # 100 lanes for 99 tokens
    assert kernels.projection_launch_config(2304, 50, 99 * 16, kernels.DOT_BFLOAT16_SPLIT) == (64, 64, 64, 4)
    assert kernels.projection_launch_config(2304, 50, 99 * 16, kernels.DOT_FLOAT32) == (32, 32, 32, 4)
    assert kernels.projection_backward_launch_config(2304, 197, torch.float64)[1] == 128


# ---------------------------------------------------------------------------
# Compiled for Hopper (sm_90) without a GPU
# ---------------------------------------------------------------------------

# A subprocess without TRITON_INTERPRET: the real launchers call the kernels, Triton's runtime
# specializes and compiles them for sm_90 (a stand-in driver names the target; warmup=True
# compiles without launching), as on an H100/H200.
COMPILE_FOR_HOPPER = hopper_script(
    imports="""
    from stdd_kernels import triton_mix_project as kernels
    from stdd_kernels.geometry import make_geometry
    """,
    body=r"""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")

    def resources(ptx):
        # ptxas -v of the kernel's PTX for sm_90a: registers and spill bytes per thread.
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "kernel.ptx")
            with open(path, "w") as handle:
                handle.write(ptx)
            report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                                    capture_output=True, text=True, check=True).stderr
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
        return int(re.search(r"Used (\d+) registers", report).group(1)), spills

    for kernel in (kernels._mix_factors_forward_kernel, kernels._mix_factors_backward_kernel,
                   kernels._mix_factors_backward_scatter_kernel, kernels._project_mixed_forward_kernel,
                   kernels._project_mixed_backward_kernel):
        compile_instead_of_launching(kernel)
    kernels._eps_tensor = lambda eps, dtype, device: torch.full((1,), eps, dtype=dtype)

    for label, dtype, clips, frames, grid, width, settings, which in json.loads(sys.argv[1]):
        wide = label.endswith("wide")  # int64 offsets, as past 2**31 elements
        kernels.needs_wide_index = lambda *tensors, wide=wide: wide
        dtype = getattr(torch, dtype)
        factor = torch.float64 if dtype == torch.float64 else torch.float32
        rows, tokens = clips * frames, 1 + grid * grid
        geometry = make_geometry(num_tokens=tokens, channels=width, rows=rows, num_frames=frames, window=(2, 2),
                                 channel_fold=32, tensor_name="x", **settings)
        x = torch.zeros(rows, tokens, width, dtype=dtype)
        weight = torch.ones(width, dtype=factor)
        phase = stdd_kernels.mask_phase(clips, frames)
        start = len(compiled)
        if "factors" in which:
            gain, coefficients, mean = kernels.mix_factors_forward(x, weight, phase, geometry, 1e-5)
            kernels.mix_factors_backward(gain, coefficients, mean, x, weight, phase, geometry, 1e-5)
        if "project" in which:
            num_mixed, k = 1 + geometry.num_kept, geometry.borrowed_channels + 2
            qkv = torch.zeros(rows, tokens, 3 * width, dtype=dtype)
            gain = torch.zeros(len(geometry.scales), rows, num_mixed, dtype=factor)
            coefficients = torch.zeros(len(geometry.scales), rows, num_mixed, k, dtype=factor)
            basis = torch.zeros(3 * width, k, dtype=factor)
            out = kernels.project_mixed_forward(qkv, gain, coefficients, basis, phase, geometry)
            kernels.project_mixed_backward(out, qkv, gain, coefficients, basis, phase, geometry)
        for kernel, result in compiled[start:]:
            names = list(result.src.signature)
            ptx = result.asm["ptx"]
            registers, spills = resources(ptx)
            print(json.dumps(dict(
                config=label, dtype=str(dtype), kernel=kernel.__name__, cubin="cubin" in result.asm,
                constants={names[path[0]]: value for path, value in result.src.constants.items()
                           if isinstance(value, (int, bool))},
                ops=sorted(set(re.findall(r"\b(?:div|sqrt|mma|wgmma)[.\w]*", ptx))),
                spills=spills, registers=registers,
            )))
    """,
)


def compile_for_hopper(configs) -> list[dict]:
    return run_hopper_script(COMPILE_FOR_HOPPER, configs, timeout=900)


PAPER = dict(mask_ratio=0.5, scales=(1, 2), mixing="continual")
OFFICIAL = dict(mask_ratio=0.4, scales=(1, 2, 3), mixing="official", mask_rounding="floor")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the cuda tests compile and run the kernels")
def test_kernels_compile_for_hopper_as_the_launchers_call_them():
    """ViT-B/16 shapes (D = 768, 2I + 2 = 50) to sm_90 cubin in every dtype: the low-precision
    projections are tensor-core dots, fp32 divisions and roots the IEEE ones, nothing spills."""
    records = compile_for_hopper([
        ("vit-b16", "bfloat16", 2, 8, 14, 768, PAPER, ["factors", "project"]),
        ("vit-b16", "float16", 1, 8, 14, 768, PAPER, ["project"]),
        ("vit-b16", "float32", 1, 8, 14, 768, PAPER, ["factors", "project"]),
        ("vit-b16", "float64", 1, 8, 14, 768, PAPER, ["project"]),
        ("vit-b16-official", "bfloat16", 1, 8, 14, 768, OFFICIAL, ["factors"]),
        ("vit-b16-wide", "bfloat16", 1, 8, 14, 768, OFFICIAL, ["factors", "project"]),
    ])
    assert len(records) == 5 + 2 + 5 + 2 + 3 + 5 and all(r["cubin"] for r in records), records
    assert all(r["constants"]["WIDE_INDEX"] == r["config"].endswith("wide") for r in records
               if "WIDE_INDEX" in r["constants"])
    by = {(r["config"], r["dtype"], r["kernel"]): r for r in records}
    for dtype in ("torch.bfloat16", "torch.float16"):
        forward = by[("vit-b16", dtype, "_project_mixed_forward_kernel")]
        assert forward["constants"]["DOT_MODE"] == (2 if dtype == "torch.bfloat16" else 3)
        assert any(op.startswith(("mma", "wgmma")) for op in forward["ops"]), forward["ops"]
        assert [forward["constants"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")] == [64, 64, 64]
    factors = by[("vit-b16", "torch.float32", "_mix_factors_forward_kernel")]
    assert factors["constants"]["BLOCK_TOKENS"] == 4 and factors["constants"]["BLOCK_CHANNELS"] == 1024
    for key, record in by.items():
        if key[1] in ("torch.float32", "torch.bfloat16") and "mix_factors" in key[2] and "scatter" not in key[2]:
            assert "div.rn.f64" in record["ops"] and "sqrt.rn.f64" in record["ops"], (key, record["ops"])
        assert not any(op.startswith(("div.full", "div.approx", "sqrt.approx")) for op in record["ops"]), key
    assert all(r["spills"] == 0 for r in records), [(r["kernel"], r["dtype"], r["spills"]) for r in records]


# ---------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------

VIT_B16 = Case("vit-b16-B2-T8", 2, 8, 14, 768, (2, 2), 0.5, (1, 2), 32, "continual", "shuffle")
VIT_B16_OFFICIAL = Case("vit-b16-B2-T8-official", 2, 8, 14, 768, (2, 2), 0.4, (1, 2, 3), 32, "official", "shuffle",
                        "floor")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("case", [VIT_B16, VIT_B16_OFFICIAL], ids=str)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cuda_vit_b16_shapes(dtype, case, poisoned_scratch):
    assert DEVICE == "cuda", "CUDA tests need the compiled kernels: unset TRITON_INTERPRET"
    test_mix_factors_low_precision(dtype, case, None)
    test_project_mixed_low_precision(dtype, case)
    check_mix_project_low_precision(case, dtype)


@pytest.mark.cuda
@cuda_only
def test_cuda_odd_shapes():
    """The CPU grid again on the GPU (compiled kernels, GPU launch configs), bf16 included."""
    assert DEVICE == "cuda"
    for case in CASES:
        test_mix_factors_forward_and_backward_match_reference(case, None)
        test_project_mixed_forward_and_backward_match_reference(case)
        test_mix_project_matches_reference_backend_and_the_projection_of_the_mixed_tokens(case)
    for case in LOW_PRECISION_CASES:
        test_project_mixed_low_precision(torch.bfloat16, case)
    test_mix_project_low_precision(torch.bfloat16)
