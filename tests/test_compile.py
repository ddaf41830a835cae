"""``torch.compile(fullgraph=True)`` traces the STCA ops and blocks with no graph break.

The ``stdd_triton`` ops are ``torch.library.custom_op``s with fake impls and
registered autograd, so dynamo keeps them as opaque nodes and AOTAutograd
traces their backward ops too. On CPU this runs with the ``aot_eager``
backend (and one block stack with the default inductor backend) under Triton's
interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` when no GPU is
visible); results and gradients are compared with the
eager reference backend.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import stdd_kernels
from triton_helpers import GraphRecorder

triton_backend = importlib.import_module("stdd_kernels.triton_backend")
triton_backend.reload_kernels()
DEVICE = "cpu" if importlib.import_module("stdd_kernels.triton_mix_gather").interpreting() else "cuda"


def _inputs(seed=0, rows=6, tokens=17, channels=16):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, tokens, channels, generator=generator).to(DEVICE) for _ in range(3)]


def _ops_step(x, full, residual, phase, backend):
    mixed = stdd_kernels.mix_gather(
        x, 3, scales=(1, 2), channel_fold=4, phase=phase, backend=backend, validate=False
    )
    mixed = torch.tanh(mixed) * 2  # something between the ops, as attention would be
    return stdd_kernels.pad_scatter(full, mixed, 3, phase=phase, residual=residual, backend=backend, validate=False)


@pytest.mark.parametrize("explicit_phase", [True, False], ids=["phase", "eval-phase"])
def test_public_ops_trace_fullgraph(explicit_phase):
    """The validating public ops (validate=False) + dispatch + stdd_triton ops: one graph."""
    torch._dynamo.reset()
    phase = (
        stdd_kernels.mask_phase(2, 3, mode="train", generator=torch.Generator().manual_seed(1), device=DEVICE)
        if explicit_phase
        else None
    )
    recorder = GraphRecorder()
    compiled = torch.compile(_ops_step, fullgraph=True, backend=recorder)

    leaves = [t.requires_grad_(True) for t in _inputs()]
    out = compiled(*leaves, phase, "triton")
    out.square().sum().backward()
    got = [out.detach()] + [t.grad for t in leaves]

    ref_leaves = [t.requires_grad_(True) for t in _inputs()]
    ref_out = _ops_step(*ref_leaves, phase, "reference")
    ref_out.square().sum().backward()
    expected = [ref_out.detach()] + [t.grad for t in ref_leaves]

    assert len(recorder.graphs) == 1
    assert "stdd_triton.mix_gather" in recorder.code() and "stdd_triton.pad_scatter" in recorder.code()
    for name, a, b in zip(("out", "d_x", "d_full", "d_residual"), got, expected):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def _tiny_blocks(layers, width=32, heads=2, seed=0):
    pytest.importorskip("open_clip")
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList([ResidualAttentionBlock(width, heads, ls_init_value=0.5) for _ in range(layers)])
    with torch.no_grad():  # non-trivial biases and norms
        for parameter in blocks.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return blocks.to(DEVICE)


@pytest.mark.parametrize("projection", ["shared", "per_path"])
def test_stca_block_stack_traces_fullgraph_with_triton_backend(projection):
    """Two stdd.model.STCABlocks on the triton backend, compiled whole, forward and backward; with
    shared projections (the default) the mixed paths' ops are mix_factors + project_mixed, written
    out (per_path) mix_gather."""
    pytest.importorskip("open_clip")
    from stdd.model import STCABlock, STCASettings

    torch._dynamo.reset()
    frames, batch, grid, width = 3, 2, 4, 32
    blocks = _tiny_blocks(2, width)

    def stack(backend):
        return torch.nn.ModuleList(
            [STCABlock(block, STCASettings(channel_fold=8, backend=backend, projection=projection), num_frames=frames)
             for block in blocks]
        ).train()

    def run(modules, x, phase):
        for module in modules:
            x = module(x, phase)
        return x

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch * frames, 1 + grid * grid, width, generator=generator).to(DEVICE)
    phase = stdd_kernels.mask_phase(batch, frames, mode="train", generator=generator, device=DEVICE)
    recorder = GraphRecorder()
    compiled = torch.compile(run, fullgraph=True, backend=recorder)

    triton_stack = stack("triton")
    loss = compiled(triton_stack, x, phase).square().mean()
    loss.backward()
    got = [loss.detach()] + [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad(set_to_none=True)
    expected_loss = run(stack("reference"), x, phase).square().mean()
    expected_loss.backward()
    expected = [expected_loss.detach()] + [p.grad for p in blocks.parameters()]

    assert len(recorder.graphs) == 1
    mixed_ops = ("mix_factors", "project_mixed") if projection == "shared" else ("mix_gather",)
    for op in (*mixed_ops, "pad_scatter"):
        assert recorder.code().count(f"stdd_triton.{op}") == 2, op
    if projection == "shared":
        assert "stdd_triton.mix_gather" not in recorder.code()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_stca_block_stack_compiles_with_inductor():
    """The default torch.compile backend (inductor) around two STCABlocks on the triton backend:
    one graph (the custom ops stay opaque nodes, inductor fuses the glue around them),
    loss and every gradient equal to the eager reference."""
    pytest.importorskip("open_clip")
    from stdd.model import STCABlock, STCASettings

    torch._dynamo.reset()
    frames, batch, grid, width = 3, 2, 4, 32
    blocks = _tiny_blocks(2, width, seed=1)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(batch * frames, 1 + grid * grid, width, generator=generator).to(DEVICE)
    phase = stdd_kernels.mask_phase(batch, frames, mode="train", generator=generator, device=DEVICE)

    def run(modules, tokens):
        for module in modules:
            tokens = module(tokens, phase, validate=False)
        return tokens

    def loss_and_grads(backend, compile_it):
        stack = [STCABlock(block, STCASettings(channel_fold=8, backend=backend), num_frames=frames) for block in blocks]
        fn = torch.compile(run, fullgraph=True) if compile_it else run
        blocks.zero_grad(set_to_none=True)
        loss = fn(stack, x).square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in blocks.parameters()]

    got = loss_and_grads("triton", compile_it=True)
    expected = loss_and_grads("reference", compile_it=False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
