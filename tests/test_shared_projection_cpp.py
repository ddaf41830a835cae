"""The C++ extension's shared projections (``torch.ops.stdd.mix_factors`` / ``project_mixed``,
docs/stca.md section 6) against the reference.

Every op forward and backward (every differentiable input, the same upstream gradients) on odd
shapes: T = 1, 2, 3, 4, 8, B = 1, D not a power of two, windows (2, 1) and (2, 2), P = 2, 4, 6,
14, mask ratios 0, 0.25, 0.4, 0.5, 0.75 with both roundings, scales (1,), (2,), (1, 2),
(1, 2, 3), every mixing rule, no own channels at all (2I = D), and an outlier channel 30x the
others (borrowed or own). float64 to 1e-12 relative; float32, bfloat16 and float16 against
PyTorch's own error (the fast path's error against the float64 reference at most twice that of
the reference run in the same precision, or below float32's rounding level: see
assert_within_pytorch_error). Also: finite-difference gradcheck, NaN-filled outputs
fully written, out-of-range phases (validate=False) equal to their residues, non-contiguous
inputs, opcheck, torch.compile(fullgraph=True) tracing, double backward refused, argument
errors. CUDA tests are marked ``cuda`` and skip without a GPU. The whole module skips when the
extension is not built.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import stdd_kernels
from stdd_kernels import dispatch, reference
from stdd_kernels.geometry import make_geometry

try:
    from stdd_kernels import extension
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"C++ extension not built: {error}", allow_module_level=True)

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    T: int
    B: int
    D: int
    P: int
    window: tuple
    scales: tuple
    fold: int
    mixing: str = "continual"
    mask_ratio: float = 0.5
    mask_rounding: str = "nearest"
    outlier: int = 1  # the channel scaled 30x: borrowed when < 2I, else own

    @property
    def op_kwargs(self) -> dict:
        return dict(scales=self.scales, channel_fold=self.fold, window=self.window, mask_ratio=self.mask_ratio,
                    mask_rounding=self.mask_rounding, mixing=self.mixing)

    def geometry(self):
        return make_geometry(
            num_tokens=1 + self.P * self.P, channels=self.D, rows=self.B * self.T, num_frames=self.T,
            window=self.window, mask_ratio=self.mask_ratio, scales=self.scales, channel_fold=self.fold,
            mixing=self.mixing, tensor_name="x", mask_rounding=self.mask_rounding,
        )

    def __str__(self) -> str:
        rounding = "" if self.mask_rounding == "nearest" else f"-{self.mask_rounding}"
        return (f"T{self.T}-B{self.B}-D{self.D}-P{self.P}-w{self.window[0]}x{self.window[1]}-"
                f"s{'_'.join(map(str, self.scales))}-F{self.fold}-{self.mixing}-m{self.mask_ratio}{rounding}"
                f"-o{self.outlier}")


CASES = [
    Case(T=1, B=2, D=24, P=4, window=(2, 2), scales=(1, 2), fold=4),  # I=6, no neighbour frame at all
    Case(T=2, B=1, D=40, P=2, window=(2, 1), scales=(1, 2, 3), fold=4, mixing="official",
         mask_ratio=0.75, mask_rounding="floor", outlier=39),  # I=10: 10, 5, 2; own outlier
    Case(T=3, B=1, D=48, P=6, window=(2, 2), scales=(1, 2, 3), fold=4, mask_ratio=0.25),  # I=12, 3 kept per window
    Case(T=3, B=2, D=36, P=4, window=(2, 1), scales=(2,), fold=6, mixing="separate", outlier=20),  # I=6
    Case(T=3, B=1, D=20, P=2, window=(2, 2), scales=(1, 2), fold=4, mixing="official",
         mask_ratio=0.4, mask_rounding="floor"),  # I=5; floor(1.6) = 1 masked
    Case(T=2, B=1, D=24, P=4, window=(2, 2), scales=(1, 2), fold=4, mixing="none", mask_ratio=0.0),  # 2I = 0
    Case(T=4, B=1, D=72, P=6, window=(2, 2), scales=(1, 2), fold=8, mixing="official",
         mask_ratio=0.75),  # I=9, one cell kept per window
    Case(T=3, B=1, D=30, P=4, window=(2, 2), scales=(1,), fold=3, mask_ratio=0.0, outlier=29),  # I=10, all kept
    Case(T=2, B=2, D=24, P=6, window=(2, 1), scales=(1, 2), fold=2),  # I=12: 2I = D, no own channel
    Case(T=8, B=1, D=96, P=14, window=(2, 2), scales=(1, 2), fold=8),  # the ViT-B/16 grid, I=12
]
# Finite differences perturb every element: tiny shapes (still T=3, both windows, two scales).
GRADCHECK_CASES = [
    Case(T=3, B=1, D=8, P=2, window=(2, 2), scales=(1, 2), fold=4),
    Case(T=3, B=1, D=12, P=2, window=(2, 1), scales=(2, 3), fold=3, mixing="official", outlier=11),
]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def make_inputs(case: Case, dtype=torch.float64, seed=0):
    """x (with the outlier channel), qkv its projection, the LayerNorm and projection weights, a phase."""
    generator = torch.Generator().manual_seed(seed)
    rows, tokens, D = case.B * case.T, 1 + case.P * case.P, case.D

    def normal(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    x = normal(rows, tokens, D) + 0.3
    x[..., case.outlier] *= 30
    weights = dict(ln_weight=1 + 0.2 * normal(D), ln_bias=0.1 * normal(D),
                   in_proj_weight=normal(3 * D, D, scale=D ** -0.5), in_proj_bias=0.1 * normal(3 * D))
    qkv = F.linear(F.layer_norm(x, (D,), weights["ln_weight"], weights["ln_bias"], EPS),
                   weights["in_proj_weight"], weights["in_proj_bias"])
    phase = stdd_kernels.mask_phase(case.B, case.T, window=case.window, mode="train", generator=generator,
                                    shuffle=True)
    return x.to(dtype), qkv.to(dtype), weights, phase


def factor_inputs(case: Case, dtype, seed=0):
    x, qkv, weights, phase = make_inputs(case, dtype, seed)
    ln_weight = weights["ln_weight"].to(reference.factor_dtype(dtype))
    return x, qkv, ln_weight, phase


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest magnitude of ``want``."""
    scale = want.abs().max().item() if want.numel() else 0.0
    error = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    return error / scale if scale > 0 else error


def assert_close_f64(got, want, name):
    error = relative_error(got, want)
    assert error <= 1e-12, f"{name}: relative error {error:.3g}"


def error_against(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth.double()).abs().max().item()


FLOAT32_ULP = torch.finfo(torch.float32).eps


def assert_within_pytorch_error(got, low_reference, truth, name, terms=1):
    """The fast path's error against the float64 truth is at most twice the reference's own, or below the float32
    rounding level of the result: 4 ulps of the tensor's largest magnitude, times sqrt(terms) for a sum over
    `terms` mixed tokens (the weights' gradients). Below that level the errors are rounding noise, which the
    reference can undercut by chance: both runs inherit the same error from the float32 GEMM of the upstream
    gradient (grad_coefficients = grad @ basis), and the reference's own float32 sum can cancel part of it in
    an element where an outlier channel makes the terms large."""
    fast, ref = error_against(got, truth), error_against(low_reference, truth)
    floor = 4 * FLOAT32_ULP * terms ** 0.5 * truth.abs().max().item()
    assert fast <= 2 * ref + floor, f"{name}: cpp error {fast:.3g} vs PyTorch's {ref:.3g}"


def factors_and_grads(fn, x, ln_weight, phase, geometry, upstream):
    leaves = [x.detach().clone().requires_grad_(True), ln_weight.detach().clone().requires_grad_(True)]
    outputs = fn(leaves[0], leaves[1], phase, geometry, EPS)
    grads = torch.autograd.grad(outputs, leaves, upstream)
    return [o.detach() for o in outputs], list(grads)


def projection_and_grads(fn, inputs, phase, geometry, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, phase, geometry)
    return out.detach(), list(torch.autograd.grad(out, leaves, upstream))


def factor_upstream(case: Case, x, dtype, seed=1):
    """Upstream gradients of (gain, coefficients, mixed_mean), random, in the outputs' dtypes."""
    generator = torch.Generator().manual_seed(seed)
    geometry = case.geometry()
    S, rows, tokens_out = len(case.scales), x.shape[0], 1 + geometry.num_kept
    factor = reference.factor_dtype(dtype)
    shapes = [((S, rows, tokens_out), factor), ((S, rows, tokens_out, geometry.borrowed_channels + 2), factor),
              ((rows, tokens_out, case.D), dtype)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(d) for shape, d in shapes]


# ---------------------------------------------------------------------------
# mix_factors and project_mixed against the reference, float64.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_factors_float64_matches_reference(case):
    x, _, ln_weight, phase = factor_inputs(case, torch.float64)
    geometry = case.geometry()
    upstream = factor_upstream(case, x, torch.float64)
    want = factors_and_grads(reference.mix_factors, x, ln_weight, phase, geometry, upstream)
    got = factors_and_grads(extension.mix_factors, x, ln_weight, phase, geometry, upstream)
    for name, g, w in zip(("gain", "coefficients", "mixed_mean", "grad x", "grad ln_weight"), got[0] + got[1],
                          want[0] + want[1]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close_f64(g, w, name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_project_mixed_float64_matches_reference(case):
    x, qkv, ln_weight, phase = factor_inputs(case, torch.float64)
    geometry = case.geometry()
    gain, coefficients, _ = reference.mix_factors(x, ln_weight, phase, geometry, EPS)
    generator = torch.Generator().manual_seed(2)
    basis = torch.randn(3 * case.D, geometry.borrowed_channels + 2, generator=generator, dtype=torch.float64)
    upstream = torch.randn(gain.shape + (3 * case.D,), generator=generator, dtype=torch.float64)
    inputs = (qkv, gain, coefficients, basis)
    want = projection_and_grads(reference.project_mixed, inputs, phase, geometry, upstream)
    got = projection_and_grads(extension.project_mixed, inputs, phase, geometry, upstream)
    for name, g, w in zip(("qkv_mixed", "grad qkv", "grad gain", "grad coefficients", "grad basis"),
                          [got[0]] + got[1], [want[0]] + want[1]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close_f64(g, w, name)


def mix_project_and_grads(backend, case, x, qkv, weights, phase, upstream, validate=True):
    """stdd_kernels.mix_project's outputs and the gradients of <outputs, upstream> for x, qkv and every weight."""
    names = ("x", "qkv", "ln_weight", "ln_bias", "in_proj_weight", "in_proj_bias")
    leaves = dict(x=x, qkv=qkv, **weights)
    leaves = {n: leaves[n].detach().clone().requires_grad_(True) for n in names}
    outputs = stdd_kernels.mix_project(
        leaves["x"], leaves["qkv"], case.T, ln_weight=leaves["ln_weight"], ln_bias=leaves["ln_bias"], ln_eps=EPS,
        in_proj_weight=leaves["in_proj_weight"], in_proj_bias=leaves["in_proj_bias"], phase=phase, backend=backend,
        validate=validate, **case.op_kwargs,
    )
    grads = torch.autograd.grad(outputs, list(leaves.values()), upstream)
    return [o.detach() for o in outputs], dict(zip(names, grads))


def mix_project_upstream(case, x, qkv, seed=3):
    generator = torch.Generator().manual_seed(seed)
    tokens_out = 1 + case.geometry().num_kept
    shapes = [((len(case.scales), x.shape[0], tokens_out, qkv.shape[2]), qkv.dtype),
              ((x.shape[0], tokens_out, case.D), x.dtype)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(d) for shape, d in shapes]


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5], CASES[8]], ids=str)
def test_mix_project_float64_matches_reference_and_the_per_path_projection(case):
    x, qkv, weights, phase = make_inputs(case, torch.float64, seed=4)
    upstream = mix_project_upstream(case, x, qkv)
    want_out, want_grads = mix_project_and_grads("reference", case, x, qkv, weights, phase, upstream)
    got_out, got_grads = mix_project_and_grads("cpp", case, x, qkv, weights, phase, upstream)
    for name, g, w in zip(("qkv_mixed", "mixed_mean"), got_out, want_out):
        assert_close_f64(g, w, name)
    for name in want_grads:
        assert_close_f64(got_grads[name], want_grads[name], f"grad {name}")
    # The identity itself: what projecting the mixed tokens gives.
    mixed = stdd_kernels.mix_gather(x, case.T, phase=phase, backend="reference", **case.op_kwargs)
    per_path = F.linear(F.layer_norm(mixed, (case.D,), weights["ln_weight"], weights["ln_bias"], EPS),
                        weights["in_proj_weight"], weights["in_proj_bias"])
    assert relative_error(got_out[0], per_path) <= 1e-12


# ---------------------------------------------------------------------------
# float32, bfloat16, float16: error at most twice PyTorch's.
# ---------------------------------------------------------------------------

LOW_PRECISION_CASES = [CASES[1], CASES[2], CASES[4], CASES[8], CASES[9]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_mix_project_low_precision_error_at_most_twice_pytorchs(case, dtype):
    """Tokens and projections in `dtype` (weights in float32, as under autocast), against the same rounded
    inputs computed in float64."""
    x64, qkv64, weights64, phase = make_inputs(case, torch.float64, seed=5)
    x, qkv = x64.to(dtype), qkv64.to(dtype)
    weights = {n: w.float() for n, w in weights64.items()}
    upstream = mix_project_upstream(case, x, qkv)
    truth = mix_project_and_grads("reference", case, x.double(), qkv.double(), {n: w.double() for n, w in weights.items()},
                                  phase, [u.double() for u in upstream])
    low_reference = mix_project_and_grads("reference", case, x, qkv, weights, phase, upstream)
    low_cpp = mix_project_and_grads("cpp", case, x, qkv, weights, phase, upstream)
    for index, name in enumerate(("qkv_mixed", "mixed_mean")):
        assert low_cpp[0][index].dtype == low_reference[0][index].dtype
        assert_within_pytorch_error(low_cpp[0][index], low_reference[0][index], truth[0][index], name)
    mixed_tokens = low_cpp[0][0][..., 0].numel()
    for name in truth[1]:
        assert low_cpp[1][name].dtype == low_reference[1][name].dtype, name
        terms = 1 if name in ("x", "qkv") else mixed_tokens  # a weight's gradient sums over every mixed token
        assert_within_pytorch_error(low_cpp[1][name], low_reference[1][name], truth[1][name], f"grad {name}", terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[9]], ids=str)
def test_ops_low_precision_error_at_most_twice_pytorchs(case, dtype):
    """Each op on its own, with the same upstream gradients: mix_factors on tokens in `dtype`, project_mixed on a
    projection in `dtype` (factors in float32)."""
    x64, qkv64, weights64, phase = make_inputs(case, torch.float64, seed=6)
    geometry = case.geometry()
    x, qkv, ln_weight = x64.to(dtype), qkv64.to(dtype), weights64["ln_weight"].float()
    upstream = factor_upstream(case, x, dtype)
    truth = factors_and_grads(reference.mix_factors, x.double(), ln_weight.double(), phase, geometry,
                              [u.double() for u in upstream])
    low_reference = factors_and_grads(reference.mix_factors, x, ln_weight, phase, geometry, upstream)
    low_cpp = factors_and_grads(extension.mix_factors, x, ln_weight, phase, geometry, upstream)
    for name, c, r, t in zip(("gain", "coefficients", "mixed_mean", "grad x", "grad ln_weight"),
                             low_cpp[0] + low_cpp[1], low_reference[0] + low_reference[1], truth[0] + truth[1]):
        assert c.dtype == r.dtype, name
        assert_within_pytorch_error(c, r, t, name)

    gain, coefficients = (t.float() for t in truth[0][:2])
    generator = torch.Generator().manual_seed(7)
    basis = torch.randn(3 * case.D, geometry.borrowed_channels + 2, generator=generator)
    grad = torch.randn(gain.shape + (3 * case.D,), generator=generator).to(dtype)
    inputs = (qkv, gain, coefficients, basis)
    truth = projection_and_grads(reference.project_mixed, [t.double() for t in inputs], phase, geometry, grad.double())
    low_reference = projection_and_grads(reference.project_mixed, inputs, phase, geometry, grad)
    low_cpp = projection_and_grads(extension.project_mixed, inputs, phase, geometry, grad)
    for name, c, r, t in zip(("qkv_mixed", "grad qkv", "grad gain", "grad coefficients", "grad basis"),
                             [low_cpp[0]] + low_cpp[1], [low_reference[0]] + low_reference[1], [truth[0]] + truth[1]):
        assert c.dtype == r.dtype, name
        assert_within_pytorch_error(c, r, t, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_project_mixed_factors_in_float64_for_low_precision_qkv(dtype):
    """qkv in a narrower dtype than the factors (float64 tokens): computed in float64, rounded once."""
    case = CASES[2]
    x, qkv, ln_weight, phase = factor_inputs(case, torch.float64, seed=6)
    geometry = case.geometry()
    gain, coefficients, _ = reference.mix_factors(x, ln_weight, phase, geometry, EPS)
    basis = torch.randn(3 * case.D, geometry.borrowed_channels + 2, dtype=torch.float64)
    got = extension.project_mixed(qkv.to(dtype), gain, coefficients, basis, phase, geometry)
    want = reference.project_mixed(qkv.to(dtype), gain, coefficients, basis, phase, geometry)
    assert got.dtype == dtype
    assert torch.equal(got, want)  # the same float64 values, rounded once


# ---------------------------------------------------------------------------
# Finite differences, every output written, phases, strides.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck(case):
    x, qkv, ln_weight, phase = factor_inputs(case, torch.float64, seed=7)
    geometry = case.geometry()

    def factors(x_, w_):
        return extension.mix_factors(x_, w_, phase, geometry, EPS)

    assert torch.autograd.gradcheck(factors, (x.clone().requires_grad_(True), ln_weight.clone().requires_grad_(True)))
    gain, coefficients, _ = factors(x, ln_weight)
    basis = torch.randn(3 * case.D, geometry.borrowed_channels + 2, dtype=torch.float64)

    def project(*inputs):
        return extension.project_mixed(*inputs, phase, geometry)

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (qkv, gain, coefficients, basis))
    assert torch.autograd.gradcheck(project, inputs)


def test_double_backward_is_refused():
    case = GRADCHECK_CASES[0]
    x, qkv, weights, phase = make_inputs(case, torch.float64)
    x = x.requires_grad_(True)
    qkv = qkv.requires_grad_(True)
    kw = dict(ln_weight=weights["ln_weight"], ln_bias=weights["ln_bias"], ln_eps=EPS,
              in_proj_weight=weights["in_proj_weight"], in_proj_bias=weights["in_proj_bias"], phase=phase,
              backend="cpp", **case.op_kwargs)
    qkv_mixed, mixed_mean = stdd_kernels.mix_project(x, qkv, case.T, **kw)
    grad_x, grad_qkv = torch.autograd.grad((qkv_mixed * qkv_mixed).sum() + mixed_mean.sum(), (x, qkv),
                                           create_graph=True)
    for grad, op in ((grad_x, "mix_factors_backward"), (grad_qkv, "project_mixed_backward")):
        with pytest.raises(RuntimeError, match=f"stdd::{op} is not differentiable: double backward"):
            torch.autograd.grad(grad.sum(), (x, qkv), allow_unused=True)


@contextlib.contextmanager
def nan_filled_allocations():
    """torch.empty returns NaN-filled memory (deterministic mode), so an element a kernel skips stays NaN.
    warn_only: project_mixed's GEMM is cuBLAS on CUDA, which deterministic mode would otherwise refuse
    unless CUBLAS_WORKSPACE_CONFIG was set before CUDA started."""
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(64).isnan().all(), "precondition: empty() is NaN-filled"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


def raw_op_args(case: Case):
    geometry = case.geometry()
    return (case.T, list(case.window), geometry.masked), (list(case.scales), case.fold, case.mixing)


def run_raw_ops(case, x, qkv, ln_weight, basis, phase, upstream_factors, upstream_projection):
    """Every op called directly (no autograd): their outputs, by name."""
    (T, window, masked), (scales, fold, mixing) = raw_op_args(case)
    gain, coefficients, mixed_mean = torch.ops.stdd.mix_factors(x, ln_weight, phase, T, window, masked, scales, fold,
                                                                mixing, EPS)
    grad_x, grad_weight = torch.ops.stdd.mix_factors_backward(*upstream_factors, x, ln_weight, phase, T, window,
                                                              masked, scales, fold, mixing, EPS)
    out = torch.ops.stdd.project_mixed(qkv, gain, coefficients, basis, phase, T, window, masked)
    grad_qkv, grad_gain = torch.ops.stdd.project_mixed_backward(upstream_projection, qkv, gain, phase, T, window,
                                                                masked)
    return dict(gain=gain, coefficients=coefficients, mixed_mean=mixed_mean, grad_x=grad_x, grad_ln_weight=grad_weight,
                qkv_mixed=out, grad_qkv=grad_qkv, grad_gain=grad_gain)


def raw_inputs(case, dtype, seed=8):
    x, qkv, ln_weight, phase = factor_inputs(case, dtype, seed)
    geometry = case.geometry()
    factor = reference.factor_dtype(dtype)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(3 * case.D, geometry.borrowed_channels + 2, generator=generator).to(factor)
    upstream_factors = factor_upstream(case, x, dtype, seed)
    upstream_projection = torch.randn(len(case.scales), x.shape[0], 1 + geometry.num_kept, 3 * case.D,
                                      generator=generator).to(dtype)
    return x, qkv, ln_weight, basis, phase, upstream_factors, upstream_projection


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6], CASES[8]], ids=str)
def test_every_output_element_is_written(case, dtype):
    inputs = raw_inputs(case, dtype)
    with nan_filled_allocations():
        outputs = run_raw_ops(case, *inputs)
        # Absent upstream gradients are zeros, not garbage.
        x, _, ln_weight, _, phase = inputs[:5]
        (T, window, masked), (scales, fold, mixing) = raw_op_args(case)
        partial = torch.ops.stdd.mix_factors_backward(None, inputs[5][1], None, x, ln_weight, phase, T, window,
                                                      masked, scales, fold, mixing, EPS)
    for name, tensor in list(outputs.items()) + [("grad_x (grad_coefficients only)", partial[0]),
                                                 ("grad_ln_weight (grad_coefficients only)", partial[1])]:
        assert not tensor.isnan().any(), f"{name}: {int(tensor.isnan().sum())} elements never written"


def test_absent_upstream_gradients_are_zero():
    case = CASES[2]
    x, _, ln_weight, _, phase, (g_gain, g_coefficients, g_mean), _ = raw_inputs(case, torch.float64)
    (T, window, masked), (scales, fold, mixing) = raw_op_args(case)

    def backward(*grads):
        return torch.ops.stdd.mix_factors_backward(*grads, x, ln_weight, phase, T, window, masked, scales, fold,
                                                   mixing, EPS)

    full = backward(g_gain, g_coefficients, g_mean)
    parts = [backward(g_gain, None, None), backward(None, g_coefficients, None), backward(None, None, g_mean)]
    for index in range(2):  # the op is linear in the upstream gradients
        assert_close_f64(sum(p[index] for p in parts), full[index], f"output {index}")
    assert torch.equal(backward(None, None, None)[0], torch.zeros_like(x))


@pytest.mark.parametrize("case", [CASES[2], CASES[4]], ids=str)
def test_out_of_range_phase_equals_its_residue(case):
    """With validate=False a phase outside [0, K), negative too, is reduced mod K, never read out of bounds."""
    x, qkv, weights, phase = make_inputs(case, torch.float64, seed=9)
    K = case.window[0] * case.window[1]
    offsets = torch.tensor([3, -2, 5, -7, 1, -1, 2, -4])[: case.B * case.T].view(case.B, case.T)
    wild = phase + K * offsets
    upstream = mix_project_upstream(case, x, qkv)
    want = mix_project_and_grads("cpp", case, x, qkv, weights, phase, upstream)
    got = mix_project_and_grads("cpp", case, x, qkv, weights, wild, upstream, validate=False)
    for g, w in zip(got[0], want[0]):
        assert torch.equal(g, w)
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


def test_non_contiguous_inputs():
    case = CASES[3]
    x, qkv, ln_weight, basis, phase, _, _ = raw_inputs(case, torch.float32)
    geometry = case.geometry()
    x_strided = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    qkv_strided = torch.stack([qkv, qkv], dim=-1)[..., 0]
    weight_strided = torch.stack([ln_weight, ln_weight], dim=1)[:, 0]
    phase_strided = phase.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (x_strided, qkv_strided, weight_strided, phase_strided))
    want = extension.mix_factors(x, ln_weight, phase, geometry, EPS)
    got = extension.mix_factors(x_strided, weight_strided, phase_strided, geometry, EPS)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    gain, coefficients, _ = want
    basis_strided = basis.t().contiguous().t()
    coefficients_strided = coefficients.transpose(0, 1).contiguous().transpose(0, 1)
    want_out = extension.project_mixed(qkv, gain, coefficients, basis, phase, geometry)
    got_out = extension.project_mixed(qkv_strided, gain, coefficients_strided, basis_strided, phase_strided, geometry)
    assert torch.equal(got_out, want_out)


# ---------------------------------------------------------------------------
# Registration: dispatch, op checks, torch.compile, errors.
# ---------------------------------------------------------------------------


def test_cpp_backend_carries_the_shared_projection_ops():
    backend = stdd_kernels.registered_backends()["cpp"]
    assert backend.mix_factors is extension.mix_factors
    assert backend.project_mixed is extension.project_mixed
    assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float32).name == "cpp"


def test_opcheck_all_ops():
    case = CASES[4]
    x, qkv, ln_weight, basis, phase, upstream_factors, upstream_projection = raw_inputs(case, torch.float64)
    (T, window, masked), (scales, fold, mixing) = raw_op_args(case)
    gain, coefficients, _ = torch.ops.stdd.mix_factors(x, ln_weight, phase, T, window, masked, scales, fold, mixing,
                                                       EPS)
    checks = [
        (torch.ops.stdd.mix_factors.default,
         (x.clone().requires_grad_(True), ln_weight.clone().requires_grad_(True), phase, T, window, masked, scales,
          fold, mixing, EPS)),
        (torch.ops.stdd.project_mixed.default,
         tuple(t.clone().requires_grad_(True) for t in (qkv, gain, coefficients, basis)) + (phase, T, window, masked)),
        # The backward ops are first order only: checked without inputs that require grad.
        (torch.ops.stdd.mix_factors_backward.default,
         (*upstream_factors, x, ln_weight, phase, T, window, masked, scales, fold, mixing, EPS)),
        (torch.ops.stdd.mix_factors_backward.default,
         (None, upstream_factors[1], None, x, ln_weight, phase, T, window, masked, scales, fold, mixing, EPS)),
        (torch.ops.stdd.project_mixed_backward.default, (upstream_projection, qkv, gain, phase, T, window, masked)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_traces_forward_and_backward():
    case = CASES[2]
    x, qkv, ln_weight, basis, phase, _, _ = raw_inputs(case, torch.float32)
    geometry = case.geometry()

    def shared(x_, qkv_, ln_weight_, basis_, phase_):
        gain, coefficients, mixed_mean = extension.mix_factors(x_, ln_weight_, phase_, geometry, EPS)
        qkv_mixed = extension.project_mixed(qkv_, gain, coefficients, basis_, phase_, geometry)
        return qkv_mixed * 2.0, mixed_mean  # stands in for the attention on the mixed paths

    def output_and_grads(fn, inputs, phase_):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        outputs = fn(*leaves, phase_)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        return [o.detach() for o in outputs] + [leaf.grad for leaf in leaves]

    compiled = torch.compile(shared, fullgraph=True, backend="aot_eager", dynamic=True)
    for copies in (1, 2):  # a second batch size runs the same symbolic-shape graph
        inputs = [x.repeat(copies, 1, 1), qkv.repeat(copies, 1, 1), ln_weight, basis]
        phase_b = phase.repeat(copies, 1)
        for got, want in zip(output_and_grads(compiled, inputs, phase_b), output_and_grads(shared, inputs, phase_b)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (dict(ln_weight_dtype=torch.float64), "ln_weight must have the factor dtype of x \\(Float for x of Float\\)"),
        (dict(ln_weight_size=47), "ln_weight must have shape \\(D,\\) = \\(48,\\)"),
        (dict(eps=-1.0), "eps must be a number >= 0"),
        (dict(mixing="sideways"), "mixing must be one of"),
        (dict(num_frames=4), "must be divisible by num_frames=4"),
    ],
)
def test_mix_factors_errors_name_the_argument(mutate, message):
    x = torch.randn(6, 37, 48)
    phase = torch.zeros(2, 3, dtype=torch.int64)
    ln_weight = torch.ones(mutate.get("ln_weight_size", 48), dtype=mutate.get("ln_weight_dtype", torch.float32))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.stdd.mix_factors(x, ln_weight, phase, mutate.get("num_frames", 3), [2, 2], 2, [1, 2], 8,
                                   mutate.get("mixing", "continual"), mutate.get("eps", EPS))


def test_project_mixed_errors_name_the_argument():
    qkv = torch.randn(4, 17, 24)
    phase = torch.zeros(1, 4, dtype=torch.int64)
    gain, coefficients, basis = torch.ones(2, 4, 9), torch.zeros(2, 4, 9, 6), torch.zeros(24, 6)
    op = torch.ops.stdd.project_mixed
    with pytest.raises(RuntimeError, match="gain must have shape \\(S, B\\*T, 1 \\+ N_keep\\) = \\(S, 4, 9\\)"):
        op(qkv, gain[:, :, :8], coefficients, basis, phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="gain must be float32 or float64"):
        op(qkv, gain.half(), coefficients, basis, phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="coefficients must have shape \\(S, B\\*T, 1 \\+ N_keep, 2I \\+ 2\\)"):
        op(qkv, gain, coefficients[:1], basis, phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="coefficients has dtype Double but gain has Float"):
        op(qkv, gain, coefficients.double(), basis, phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="basis must have shape \\(W, 2I \\+ 2\\) = \\(24, 6\\)"):
        op(qkv, gain, coefficients, basis[:, :5], phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="qkv.shape\\[1\\] must be 1 \\+ P\\*P tokens"):
        op(qkv[:, :16], gain, coefficients, basis, phase, 4, [2, 2], 2)
    with pytest.raises(RuntimeError, match="grad_qkv_mixed must have shape \\(S, B\\*T, 1 \\+ N_keep, W\\)"):
        torch.ops.stdd.project_mixed_backward(torch.zeros(2, 4, 9, 12), qkv, gain, phase, 4, [2, 2], 2)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU and a CUDA build of the extension).
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and extension.CUDA_COMPILED),
    reason="needs a CUDA GPU and the extension built with nvcc",
)

CUDA_CASES = CASES + [
    Case(T=8, B=2, D=768, P=14, window=(2, 2), scales=(1, 2), fold=32, outlier=700),  # ViT-B/16, I=24
    Case(T=8, B=1, D=768, P=14, window=(2, 2), scales=(1, 2, 3), fold=32, mixing="official", mask_rounding="floor"),
]


def _relative(got, want):
    return relative_error(got.cpu(), want)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_matches_cpp(case, dtype):
    """Every op on the GPU (NaN-filled outputs) against the CPU kernels: the same arithmetic up to the order of
    the sums (float32 statistics on the GPU, double on the CPU) and of the GEMMs."""
    inputs = raw_inputs(case, dtype, seed=10)
    want = run_raw_ops(case, *inputs)
    on_gpu = [t.cuda() if isinstance(t, torch.Tensor) else [u.cuda() for u in t] for t in inputs]
    with nan_filled_allocations():
        got = run_raw_ops(case, *on_gpu)
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert not got[name].isnan().any(), f"{name}: elements never written"
        assert _relative(got[name], want[name]) <= tolerance, f"{name}: {_relative(got[name], want[name]):.3g}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[2], CASES[8], CUDA_CASES[-2]], ids=str)
def test_cuda_mix_project_gradients_match_cpp(case, dtype):
    x, qkv, weights, phase = make_inputs(case, dtype, seed=11)
    weights = {n: w.float() for n, w in weights.items()}
    upstream = mix_project_upstream(case, x, qkv)
    want = mix_project_and_grads("cpp", case, x, qkv, weights, phase, upstream)
    got = mix_project_and_grads("cuda", case, x.cuda(), qkv.cuda(), {n: w.cuda() for n, w in weights.items()},
                                phase.cuda(), [u.cuda() for u in upstream])
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    for g, w in zip(got[0], want[0]):
        assert _relative(g, w) <= tolerance
    for name in want[1]:
        assert _relative(got[1][name], want[1][name]) <= tolerance, name


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("offset", [1, 2, 4], ids=lambda o: f"{o}-element-off")
def test_cuda_misaligned_and_strided_inputs(offset):
    """Inputs off a 16-byte boundary or strided: the kernels take the width the alignment allows."""
    case = CUDA_CASES[-2]
    inputs = raw_inputs(case, torch.bfloat16, seed=12)
    want = run_raw_ops(case, *inputs)

    def off(t):
        return torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")[offset:].view(t.shape).copy_(t)

    x, qkv, ln_weight, basis, phase, upstream_factors, upstream_projection = inputs
    moved = [off(x.cuda()), off(qkv.cuda()).transpose(0, 1).contiguous().transpose(0, 1), off(ln_weight.cuda()),
             off(basis.cuda()), phase.cuda(), [off(u.cuda()) for u in upstream_factors], off(upstream_projection.cuda())]
    got = run_raw_ops(case, *moved)
    for name in want:
        assert _relative(got[name], want[name]) <= 2e-2, name
