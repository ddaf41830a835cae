"""The C++ extension (backend ``cpp``, ops ``torch.ops.stdd.*``) against the reference.

Forward and every gradient on odd shapes, float32/float64 to (near) bit
equality, bfloat16/float16 flash-attention style (the kernel's error against a
float64 ground truth at most ~2x that of the reference run in the same low
precision), gradcheck/gradgradcheck in float64, non-contiguous inputs, outputs
checked fully written (NaN-filled allocations), the op registrations
(torch.library.opcheck) and torch.compile tracing. CUDA tests are marked
``cuda`` and skip without a GPU. The whole module skips when the extension is
not built (``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

import stdd_kernels
from stdd_kernels import dispatch, reference

try:
    from stdd_kernels import extension
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"C++ extension not built: {error}", allow_module_level=True)


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

    @property
    def op_kwargs(self) -> dict:
        return dict(
            scales=self.scales, channel_fold=self.fold, window=self.window,
            mask_ratio=self.mask_ratio, mask_rounding=self.mask_rounding, mixing=self.mixing,
        )

    @property
    def scatter_kwargs(self) -> dict:
        return dict(window=self.window, mask_ratio=self.mask_ratio, mask_rounding=self.mask_rounding)

    def __str__(self) -> str:
        rounding = "" if self.mask_rounding == "nearest" else f"-{self.mask_rounding}"
        return (f"T{self.T}-B{self.B}-D{self.D}-P{self.P}-w{self.window[0]}x{self.window[1]}-"
                f"s{'_'.join(map(str, self.scales))}-F{self.fold}-{self.mixing}-m{self.mask_ratio}{rounding}")


CASES = [
    Case(T=1, B=1, D=24, P=4, window=(2, 2), scales=(1, 2), fold=4),  # I=6
    Case(T=2, B=3, D=40, P=6, window=(2, 1), scales=(1,), fold=4),  # I=10, K=2
    Case(T=3, B=1, D=64, P=6, window=(2, 2), scales=(1, 2, 4), fold=8),  # I=8
    Case(T=8, B=1, D=96, P=14, window=(2, 2), scales=(1, 2), fold=8),  # ViT-B/16 grid
    Case(T=3, B=3, D=24, P=4, window=(2, 1), scales=(2,), fold=4, mixing="separate"),
    Case(T=8, B=1, D=40, P=6, window=(2, 2), scales=(1, 2, 4), fold=4, mixing="separate"),
    Case(T=2, B=1, D=64, P=4, window=(2, 2), scales=(1, 2), fold=32, mixing="none", mask_ratio=0.0),
    Case(T=3, B=1, D=96, P=6, window=(2, 1), scales=(1, 2), fold=8, mask_ratio=0.0),
    Case(T=8, B=3, D=24, P=14, window=(2, 1), scales=(1,), fold=4),
    Case(T=3, B=1, D=64, P=4, window=(2, 2), scales=(1, 2), fold=8, mask_ratio=0.25),  # m=1, 3 kept
    # The release's rule (docs/stca.md) at T = 1, 2, 3, 4, 8; I not divisible by the scales.
    Case(T=1, B=2, D=24, P=4, window=(2, 2), scales=(1, 2), fold=4, mixing="official"),  # I=6
    Case(T=2, B=3, D=40, P=6, window=(2, 1), scales=(1, 2, 3), fold=4, mixing="official"),  # I=10: 10, 5, 2
    Case(T=3, B=1, D=26, P=4, window=(2, 2), scales=(3,), fold=2, mixing="official",
         mask_ratio=0.4, mask_rounding="floor"),  # I=13: 13, 6, 3; floor(1.6) = 1 masked
    Case(T=4, B=2, D=96, P=6, window=(2, 2), scales=(2,), fold=8, mixing="official"),  # I=12
    Case(T=8, B=1, D=72, P=14, window=(2, 1), scales=(1, 2, 3), fold=8, mixing="official"),  # I=9: 9, 4, 2
    Case(T=8, B=2, D=64, P=4, window=(2, 2), scales=(1, 2), fold=8, mask_ratio=0.4, mask_rounding="floor"),
    Case(T=3, B=2, D=20, P=4, window=(2, 1), scales=(1,), fold=4, mixing="official"),  # I=5
]
# gradcheck perturbs every input element: tiny shapes (still T=3, both windows, S=2).
GRADCHECK_CASES = [
    Case(T=3, B=1, D=8, P=2, window=(2, 2), scales=(1, 2), fold=4),
    Case(T=3, B=2, D=6, P=2, window=(2, 1), scales=(1, 2), fold=3, mixing="separate"),
    Case(T=4, B=1, D=12, P=2, window=(2, 1), scales=(2, 3), fold=3, mixing="official"),  # I=4: 4, 2, 1
]


def make_inputs(case: Case, dtype=torch.float64, seed=0, eval_phase=False):
    generator = torch.Generator().manual_seed(seed)
    rows, tokens = case.B * case.T, 1 + case.P * case.P
    x = torch.randn(rows, tokens, case.D, generator=generator, dtype=torch.float64).to(dtype)
    phase = stdd_kernels.mask_phase(
        case.B, case.T, window=case.window, mode="eval" if eval_phase else "train",
        generator=None if eval_phase else generator, shuffle=not eval_phase,
    )
    return x, phase


def run(backend, x, phase, case, full=None, residual=None):
    mixed = stdd_kernels.mix_gather(x, case.T, phase=phase, backend=backend, **case.op_kwargs)
    if full is None:
        return mixed, None
    pad = stdd_kernels.pad_scatter(full, mixed, case.T, phase=phase, residual=residual, backend=backend,
                                   **case.scatter_kwargs)
    return mixed, pad


def forward_and_grads(backend, case, x, full, residual, phase, grad_mixed, grad_pad):
    """Outputs and the gradients of <mixed, grad_mixed> + <pad, grad_pad> for every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, full) + ((residual,) if residual is not None else ())]
    mixed, pad = run(backend, leaves[0], phase, case, full=leaves[1], residual=leaves[2] if residual is not None else None)
    # pad_scatter takes the mixed path's output; a second, independent mixed tensor
    # would hide nothing, so the gradient flows through both ops as in the block.
    grads = torch.autograd.grad([mixed, pad], leaves, [grad_mixed, grad_pad])
    return mixed.detach(), pad.detach(), grads


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# ---------------------------------------------------------------------------
# Forward and backward against the reference, float64 and float32.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference_exactly(case, dtype):
    x, phase = make_inputs(case, dtype)
    full = torch.randn_like(x)
    residual = torch.randn_like(x)
    for with_residual in (False, True):
        res = residual if with_residual else None
        mixed_ref, pad_ref = run("reference", x, phase, case, full=full, residual=res)
        mixed_cpp, pad_cpp = run("cpp", x, phase, case, full=full, residual=res)
        # A gather is a copy: bit-exact. The scatter averages in the same order and
        # rounds like the unfused reference (mean, then + residual): bit-exact too.
        assert torch.equal(mixed_cpp, mixed_ref)
        assert torch.equal(pad_cpp, pad_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference(case, dtype):
    x, phase = make_inputs(case, dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    full = torch.randn(x.shape, generator=generator, dtype=dtype)
    residual = torch.randn(x.shape, generator=generator, dtype=dtype)
    mixed_shape = (len(case.scales), x.shape[0], 1 + reference.kept_token_index(phase, _geometry(case, x)).shape[1], case.D)
    grad_mixed = torch.randn(mixed_shape, generator=generator, dtype=dtype)
    grad_pad = torch.randn(x.shape, generator=generator, dtype=dtype)
    for res in (None, residual):
        expected = forward_and_grads("reference", case, x, full, res, phase, grad_mixed, grad_pad)
        actual = forward_and_grads("cpp", case, x, full, res, phase, grad_mixed, grad_pad)
        for name, got, want in zip(("x", "full", "residual"), actual[2], expected[2]):
            # Only the order of adding the S scales' contributions may differ.
            torch.testing.assert_close(got, want, msg=lambda m, n=name: f"grad of {n}: {m}")


def _geometry(case: Case, x: torch.Tensor):
    return stdd_kernels.geometry.make_geometry(
        num_tokens=x.shape[1], channels=x.shape[2], rows=x.shape[0], num_frames=case.T,
        window=case.window, mask_ratio=case.mask_ratio, scales=case.scales, channel_fold=case.fold,
        mixing=case.mixing, tensor_name="x", mask_rounding=case.mask_rounding,
    )


def test_default_evaluation_phase_and_int32_phase():
    case = CASES[3]
    x, phase = make_inputs(case, torch.float32, eval_phase=True)
    expected = stdd_kernels.mix_gather(x, case.T, backend="reference", **case.op_kwargs)
    assert torch.equal(stdd_kernels.mix_gather(x, case.T, backend="cpp", **case.op_kwargs), expected)
    phase32 = phase.to(torch.int32)
    assert torch.equal(stdd_kernels.mix_gather(x, case.T, phase=phase32, backend="cpp", **case.op_kwargs), expected)


# ---------------------------------------------------------------------------
# Low precision: flash-attention style bound against a float64 ground truth.
# ---------------------------------------------------------------------------


def _max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double() - truth).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5], CASES[9], CASES[11], CASES[14]], ids=str)
def test_low_precision_error_at_most_twice_pytorchs(case, dtype):
    x, phase = make_inputs(case, dtype, seed=3)
    generator = torch.Generator().manual_seed(4)
    full = torch.randn(x.shape, generator=generator).to(dtype)
    residual = torch.randn(x.shape, generator=generator).to(dtype)
    n_keep = reference.kept_token_index(phase, _geometry(case, x)).shape[1]
    grad_mixed = torch.randn(len(case.scales), x.shape[0], 1 + n_keep, case.D, generator=generator).to(dtype)
    grad_pad = torch.randn(x.shape, generator=generator).to(dtype)
    # Ground truth: the same (rounded) inputs, computed in float64.
    truth = forward_and_grads(
        "reference", case, x.double(), full.double(), residual.double(), phase, grad_mixed.double(), grad_pad.double()
    )
    low_ref = forward_and_grads("reference", case, x, full, residual, phase, grad_mixed, grad_pad)
    low_cpp = forward_and_grads("cpp", case, x, full, residual, phase, grad_mixed, grad_pad)
    assert torch.equal(low_cpp[0], low_ref[0])  # the gather is a copy in any dtype
    named = [("pad", low_cpp[1], low_ref[1], truth[1])] + [
        (f"grad {n}", c, r, t) for n, c, r, t in zip(("x", "full", "residual"), low_cpp[2], low_ref[2], truth[2])
    ]
    for name, cpp_value, ref_value, true_value in named:
        cpp_error = _max_error(cpp_value, true_value)
        ref_error = _max_error(ref_value, true_value)
        assert cpp_error <= 2 * ref_error + 1e-12, f"{name}: cpp error {cpp_error} vs PyTorch's {ref_error}"


# ---------------------------------------------------------------------------
# gradcheck, non-contiguous inputs, fully written outputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_and_gradgradcheck(case):
    x, phase = make_inputs(case, torch.float64, seed=5)
    full = torch.randn_like(x)
    residual = torch.randn_like(x)
    kw = case.op_kwargs

    def mix(x_):
        return stdd_kernels.mix_gather(x_, case.T, phase=phase, backend="cpp", **kw)

    mixed = mix(x).detach()

    def pad(full_, mixed_, residual_):
        return stdd_kernels.pad_scatter(
            full_, mixed_, case.T, phase=phase, residual=residual_, backend="cpp", **case.scatter_kwargs
        )

    inputs = (x.clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(mix, inputs)
    assert torch.autograd.gradgradcheck(mix, inputs)
    inputs = tuple(t.clone().requires_grad_(True) for t in (full, mixed, residual))
    assert torch.autograd.gradcheck(pad, inputs)
    assert torch.autograd.gradgradcheck(pad, inputs)


def test_non_contiguous_inputs():
    case = CASES[4]  # B=3: a transposed phase is really strided
    x, phase = make_inputs(case, torch.float32, seed=6)
    rows, tokens, D = x.shape
    # Channels-first storage, transposed back: same values, non-unit channel stride.
    x_strided = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    full = torch.randn(tokens, rows, D).transpose(0, 1)
    residual = torch.randn(rows, tokens, 2 * D)[:, :, ::2]
    phase_strided = phase.t().contiguous().t()
    assert not (x_strided.is_contiguous() or full.is_contiguous() or residual.is_contiguous())
    assert not phase_strided.is_contiguous()
    mixed_ref, pad_ref = run("reference", x, phase, case, full=full.contiguous(), residual=residual.contiguous())
    mixed_cpp = stdd_kernels.mix_gather(x_strided, case.T, phase=phase_strided, backend="cpp", **case.op_kwargs)
    assert torch.equal(mixed_cpp, mixed_ref)
    mixed_strided = mixed_ref.transpose(1, 2).contiguous().transpose(1, 2)
    pad_cpp = stdd_kernels.pad_scatter(
        full, mixed_strided, case.T, window=case.window, mask_ratio=case.mask_ratio, phase=phase_strided,
        residual=residual, backend="cpp",
    )
    assert torch.equal(pad_cpp, pad_ref)


@contextlib.contextmanager
def nan_filled_allocations():
    """torch.empty returns NaN-filled memory (deterministic mode), so an element a kernel skips stays NaN."""
    old_mode = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(64).isnan().all(), "precondition: empty() is NaN-filled"
        yield
    finally:
        torch.use_deterministic_algorithms(old_mode)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[9], CASES[10], CASES[12], CASES[14]], ids=str)
def test_every_output_element_is_written(case):
    x, phase = make_inputs(case, torch.float32, seed=7)
    full, residual = torch.randn_like(x), torch.randn_like(x)
    grad_pad = torch.randn_like(x)
    with nan_filled_allocations():
        window, masked = list(case.window), _geometry(case, x).masked
        mixed = torch.ops.stdd.mix_gather(x, phase, case.T, window, masked, list(case.scales), case.fold, case.mixing)
        grad_x = torch.ops.stdd.mix_gather_backward(
            mixed, phase, case.T, case.P, window, masked, list(case.scales), case.fold, case.mixing
        )
        pad = torch.ops.stdd.pad_scatter(full, mixed, phase, case.T, window, masked, None)
        pad_res = torch.ops.stdd.pad_scatter(full, mixed, phase, case.T, window, masked, residual)
        grad_full, grad_mixed = torch.ops.stdd.pad_scatter_backward(
            grad_pad, phase, case.T, window, masked, len(case.scales)
        )
    for name, tensor in [("mixed", mixed), ("grad_x", grad_x), ("pad", pad), ("pad+residual", pad_res),
                         ("grad_full", grad_full), ("grad_mixed", grad_mixed)]:
        assert not tensor.isnan().any(), f"{name}: {int(tensor.isnan().sum())} elements never written"


def test_out_of_range_phase_is_reduced_mod_K_not_out_of_bounds():
    """The C++ ops do not sync to check phase values; a bad value must still be memory-safe."""
    case = CASES[0]
    x, phase = make_inputs(case, torch.float32)
    K = case.window[0] * case.window[1]
    wild = phase + K * torch.tensor([[3, -2]])[:, : case.T].expand_as(phase)
    expected = stdd_kernels.mix_gather(x, case.T, phase=phase, backend="reference", **case.op_kwargs)
    got = torch.ops.stdd.mix_gather(x, wild, case.T, list(case.window), 2, list(case.scales), case.fold, case.mixing)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------
# Registration: dispatch, op checks, torch.compile, clear errors.
# ---------------------------------------------------------------------------


def test_cpp_is_the_automatic_cpu_backend():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert dispatch.resolve_backend(None, torch.device("cpu"), dtype).name == "cpp"
    reason = stdd_kernels.registered_backends()["cpp"].supports(torch.device("cuda"), torch.float32)
    assert reason is not None and "cpu" in reason
    if not extension.CUDA_COMPILED:
        assert "without CUDA" in stdd_kernels.unavailable_backends()["cuda"]


def test_opcheck_all_ops():
    case = CASES[9]
    x, phase = make_inputs(case, torch.float64, seed=8)
    window, masked, scales = list(case.window), _geometry(case, x).masked, list(case.scales)
    mixed = torch.ops.stdd.mix_gather(x, phase, case.T, window, masked, scales, case.fold, case.mixing)
    full, residual = torch.randn_like(x), torch.randn_like(x)
    checks = [
        (torch.ops.stdd.mix_gather.default, (x.requires_grad_(True), phase, case.T, window, masked, scales, case.fold, case.mixing)),
        (torch.ops.stdd.mix_gather_backward.default,
         (mixed.requires_grad_(True), phase, case.T, case.P, window, masked, scales, case.fold, case.mixing)),
        (torch.ops.stdd.pad_scatter.default,
         (full.requires_grad_(True), mixed, phase, case.T, window, masked, residual.requires_grad_(True))),
        (torch.ops.stdd.pad_scatter.default, (full, mixed, phase, case.T, window, masked, None)),
        (torch.ops.stdd.pad_scatter_backward.default, (full, phase, case.T, window, masked, len(scales))),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_traces_forward_and_backward():
    case = CASES[2]
    x, phase = make_inputs(case, torch.float32, seed=9)
    geometry = _geometry(case, x)

    def block(x_, full_, residual_, phase_):
        mixed = extension.mix_gather(x_, phase_, geometry)
        mixed = mixed * 2.0  # stands in for the attention on the mixed path
        return extension.pad_scatter(full_, mixed, phase_, geometry, residual_)

    def output_and_grads(fn, inputs, phase_):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves, phase_)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [leaf.grad for leaf in leaves]

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=True)
    for copies in (1, 2):  # a second batch size runs the same symbolic-shape graph
        inputs = [x.repeat(copies, 1, 1)]
        inputs += [torch.randn_like(inputs[0]), torch.randn_like(inputs[0])]
        phase_b = phase.repeat(copies, 1)
        for got, want in zip(output_and_grads(compiled, inputs, phase_b), output_and_grads(block, inputs, phase_b)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (dict(window=[4, 4]), "must tile the 6x6 patch grid"),
        (dict(masked=4), "masked must be in \\[0, K\\)"),
        (dict(scales=[1, 4]), "scale 4 in scales=\\[1, 4\\] does not divide it"),
        (dict(mixing="sideways"), "mixing must be one of"),
        (dict(num_frames=4), "must be divisible by num_frames=4"),
        (dict(phase_shape=(3, 2)), "phase must have shape \\(B, T\\) = \\(2, 3\\)"),
        (dict(x_dtype=torch.int32), "x must be float32, float16, bfloat16 or float64"),
        (dict(channel_fold=64), "leaves I = D // F = 0"),
        (dict(mixing="official", scales=[1, 4]), "scale 4 in scales=\\[1, 4\\] with I = D // channel_fold = 6 has "
                                                 "empty blocks and would equal scale 3"),
    ],
)
def test_cpp_errors_name_the_argument(mutate, message):
    args = dict(window=[2, 2], masked=2, scales=[1, 2], mixing="continual", num_frames=3, channel_fold=8)
    args.update({k: v for k, v in mutate.items() if k in args})
    x = torch.randn(6, 37, 48).to(mutate.get("x_dtype", torch.float32))
    phase = torch.zeros(mutate.get("phase_shape", (2, 3)), dtype=torch.int64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.stdd.mix_gather(
            x, phase, args["num_frames"], args["window"], args["masked"], args["scales"], args["channel_fold"],
            args["mixing"],
        )


def test_pad_scatter_shape_errors():
    x = torch.randn(4, 17, 8)
    phase = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="mixed must have shape \\(S, B\\*T, 1 \\+ N_keep, D\\)"):
        torch.ops.stdd.pad_scatter(x, torch.randn(2, 4, 8, 8), phase, 4, [2, 2], 2, None)
    with pytest.raises(RuntimeError, match="residual must have the shape of full"):
        torch.ops.stdd.pad_scatter(x, torch.randn(2, 4, 9, 8), phase, 4, [2, 2], 2, torch.randn(4, 17, 4))
    with pytest.raises(RuntimeError, match="mixed has dtype Double but full has Float"):
        torch.ops.stdd.pad_scatter(x, torch.randn(2, 4, 9, 8, dtype=torch.float64), phase, 4, [2, 2], 2, None)


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU and a CUDA build of the extension).
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and extension.CUDA_COMPILED),
    reason="needs a CUDA GPU and the extension built with nvcc",
)

# Every vector width of the CUDA kernels (csrc/stca_kernel_bodies.h, vector_width: the
# largest power of two <= 16 bytes dividing D, I and every I / s; the rule itself is
# tested by tests/cpp). Widths for 2-byte dtypes; float32 takes at most 4, float64 2.
VECTOR_WIDTH_CASES = [
    Case(T=2, B=3, D=64, P=4, window=(2, 2), scales=(1, 2), fold=4),  # 8: I=16, I/2=8
    Case(T=8, B=2, D=768, P=14, window=(2, 2), scales=(1, 2), fold=32),  # 4: ViT-B/16, I=24, I/2=12
    Case(T=3, B=1, D=48, P=6, window=(2, 2), scales=(1, 2), fold=4),  # 2: I=12, I/2=6
    CASES[0],  # 1: D=24, fold 4, I=6, I/2=3
    # The release's rule: every width I >> i, i < s, is a boundary.
    Case(T=8, B=2, D=768, P=14, window=(2, 2), scales=(1, 2), fold=32, mixing="official",
         mask_rounding="floor"),  # 4: I=24, 12
    Case(T=3, B=1, D=128, P=4, window=(2, 2), scales=(1, 2, 3), fold=4, mixing="official"),  # 8: I=32, 16, 8
    Case(T=4, B=1, D=48, P=4, window=(2, 2), scales=(1, 2), fold=4, mixing="official"),  # 2: I=12, 6
    CASES[12],  # 1: I=13
]
CUDA_CASES = VECTOR_WIDTH_CASES + [CASES[2], CASES[4], CASES[9], CASES[11], CASES[14], CASES[15]]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_matches_reference(case, dtype):
    x, phase = make_inputs(case, dtype, seed=10)
    generator = torch.Generator().manual_seed(11)
    full = torch.randn(x.shape, generator=generator).to(dtype)
    residual = torch.randn(x.shape, generator=generator).to(dtype)
    n_keep = reference.kept_token_index(phase, _geometry(case, x)).shape[1]
    grad_mixed = torch.randn(len(case.scales), x.shape[0], 1 + n_keep, case.D, generator=generator).to(dtype)
    grad_pad = torch.randn(x.shape, generator=generator).to(dtype)
    cpu_args = (x, full, residual, phase, grad_mixed, grad_pad)
    on_gpu = [t.cuda() for t in cpu_args]
    with nan_filled_allocations():
        got = forward_and_grads("cuda", case, on_gpu[0], on_gpu[1], on_gpu[2], on_gpu[3], on_gpu[4], on_gpu[5])
    want = forward_and_grads("cpp", case, *cpu_args[:3], phase, grad_mixed, grad_pad)
    assert torch.equal(got[0].cpu(), want[0])
    # Same per-element arithmetic as the CPU kernels, in the same order.
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=0, atol=0)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("offset_bytes", [2, 4, 8], ids=lambda b: f"{b}B-off")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_misaligned_inputs_take_a_narrower_vector(dtype, offset_bytes):
    """Inputs 2, 4 or 8 bytes off a 16-byte boundary: every op falls back to the width the
    alignment allows (bf16: 1, 2, 4 elements; float32: -, 1, 2) and stays bit-exact."""
    case = VECTOR_WIDTH_CASES[0]  # boundaries allow 16 bytes, so only the alignment limits it
    element = torch.tensor([], dtype=dtype).element_size()
    if offset_bytes % element:
        pytest.skip(f"{offset_bytes} bytes is not a whole number of {dtype} elements")
    x, phase = make_inputs(case, dtype, seed=13)
    generator = torch.Generator().manual_seed(14)
    window, masked, scales = list(case.window), _geometry(case, x).masked, list(case.scales)
    mixed = torch.ops.stdd.mix_gather(x, phase, case.T, window, masked, scales, case.fold, case.mixing)
    full, residual, grad_pad = (torch.randn(x.shape, generator=generator).to(dtype) for _ in range(3))
    grad_mixed = torch.randn(mixed.shape, generator=generator).to(dtype)

    def off(t):  # the same values, offset_bytes into a fresh CUDA buffer
        skip = offset_bytes // element
        return torch.empty(t.numel() + skip, dtype=dtype, device="cuda")[skip:].view(t.shape).copy_(t)

    def run_all(x_, mixed_, full_, residual_, grad_mixed_, grad_pad_, phase_):
        return [
            torch.ops.stdd.mix_gather(x_, phase_, case.T, window, masked, scales, case.fold, case.mixing),
            torch.ops.stdd.mix_gather_backward(
                grad_mixed_, phase_, case.T, case.P, window, masked, scales, case.fold, case.mixing
            ),
            torch.ops.stdd.pad_scatter(full_, mixed_, phase_, case.T, window, masked, residual_),
            *torch.ops.stdd.pad_scatter_backward(grad_pad_, phase_, case.T, window, masked, len(scales)),
        ]

    tensors = (x, mixed, full, residual, grad_mixed, grad_pad)
    expected = run_all(*tensors, phase)
    moved = [off(t.cuda()) for t in tensors]
    assert all(t.data_ptr() % 16 == offset_bytes % 16 for t in moved)
    with nan_filled_allocations():
        got = run_all(*moved, phase.cuda())
    for name, g, w in zip(("mixed", "grad_x", "pad", "grad_full", "grad_mixed"), got, expected):
        assert torch.equal(g.cpu(), w), name


@pytest.mark.cuda
@needs_cuda
def test_cuda_non_contiguous_and_offset_inputs():
    case = CASES[2]
    x, phase = make_inputs(case, torch.float16, seed=12)
    expected = stdd_kernels.mix_gather(x, case.T, phase=phase, backend="cpp", **case.op_kwargs)
    # Contiguous but 2 bytes off a 16-byte boundary: the kernels must take the one-element path.
    misaligned = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view(x.shape).copy_(x)
    strided = x.cuda().transpose(0, 1).contiguous().transpose(0, 1)
    for x_gpu in (misaligned, strided):
        got = stdd_kernels.mix_gather(x_gpu, case.T, phase=phase.cuda(), backend="cuda", **case.op_kwargs)
        assert torch.equal(got.cpu(), expected)
    assert dispatch.resolve_backend(None, torch.device("cuda"), torch.float32).name in ("cuda", "triton")
