"""STCABlock: equals the plain open_clip block when STCA is switched off, and
matches a literal, step-by-step reading of STCA_SPEC.md (steps 1-4) otherwise."""

import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

import stdd_kernels
from stdd.model import STCABlock, STCASettings, multi_head_self_attention
from stdd_kernels import reference
from stdd_kernels.geometry import make_geometry


def _block(width=48, heads=4, ls_init_value=None, seed=0):
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads, ls_init_value=ls_init_value)
    with torch.no_grad():  # non-trivial biases and layer norms
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return block


@pytest.mark.parametrize(
    "batch, frames, grid, width, heads, ls_init_value",
    [(2, 3, 4, 48, 4, None), (1, 1, 2, 32, 2, None), (3, 2, 6, 40, 5, 0.3)],
)
def test_switched_off_block_equals_plain_block(batch, frames, grid, width, heads, ls_init_value):
    block = _block(width, heads, ls_init_value).eval()
    stca = STCABlock(block, STCASettings(mask_ratio=0.0, mixing="none", backend="reference"), num_frames=frames).eval()
    x = torch.randn(batch * frames, 1 + grid * grid, width)
    expected = block(x)
    assert (stca(x) - expected).abs().max().item() <= 1e-5
    stca.train()  # random phases change nothing when every cell is kept
    phase = stdd_kernels.mask_phase(batch, frames, mode="train", generator=torch.Generator().manual_seed(2))
    assert (stca(x, phase) - expected).abs().max().item() <= 1e-5


def test_sdpa_attention_equals_multihead_attention_module():
    block = _block()
    x = torch.randn(5, 17, 48)
    expected = block.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(multi_head_self_attention(block.attn, x), expected, atol=1e-6, rtol=1e-5)


def _literal_stca(block, x, frames, phase, *, window, mask_ratio, scales, channel_fold, mixing):
    """STCA_SPEC steps 1-4 written out: each scale attended on its own, with the
    nn.MultiheadAttention module itself (not the SDPA path under test)."""
    geometry = make_geometry(
        num_tokens=x.shape[1], channels=x.shape[2], rows=x.shape[0], num_frames=frames,
        window=window, mask_ratio=mask_ratio, scales=scales, channel_fold=channel_fold,
        mixing=mixing, tensor_name="x",
    )

    def attend(tokens):
        normed = block.ln_1(tokens)
        return block.ls_1(block.attn(normed, normed, normed, need_weights=False)[0])

    mixed = reference.mix_gather(x, phase, geometry)
    full = x + attend(x)
    mixed = torch.stack([m + attend(m) for m in mixed.unbind(0)], dim=0)
    return reference.pad_scatter(full, mixed, phase, geometry, residual=block.ls_2(block.mlp(block.ln_2(full))))


@pytest.mark.parametrize(
    "batch, frames, grid, window, mask_ratio, scales, channel_fold, mixing",
    [
        (2, 4, 4, (2, 2), 0.5, (1, 2), 8, "continual"),
        (1, 3, 6, (2, 1), 0.5, (1,), 4, "separate"),
        (2, 2, 4, (2, 2), 0.25, (1, 2, 3), 8, "continual"),  # I=6: divisible by 1, 2, 3
    ],
)
def test_block_matches_literal_spec_forward_and_backward(
    batch, frames, grid, window, mask_ratio, scales, channel_fold, mixing
):
    width = 48
    block = _block(width, 4, ls_init_value=0.5)
    settings = STCASettings(
        window=window, mask_ratio=mask_ratio, scales=scales, channel_fold=channel_fold, mixing=mixing,
        backend="reference",
    )
    stca = STCABlock(block, settings, num_frames=frames)
    cells = window[0] * window[1]
    phase = torch.randint(0, cells, (batch, frames), generator=torch.Generator().manual_seed(1))
    x = torch.randn(batch * frames, 1 + grid * grid, width, requires_grad=True)
    upstream = torch.randn(batch * frames, 1 + grid * grid, width)

    out = stca(x, phase)
    (out * upstream).sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()

    expected = _literal_stca(
        block, x, frames, phase, window=window, mask_ratio=mask_ratio, scales=scales,
        channel_fold=channel_fold, mixing=mixing,
    )
    (expected * upstream).sum().backward()
    expected_grads = [x.grad] + [p.grad for p in block.parameters()]

    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    for got, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_default_phase_is_t_mod_k_in_eval_and_training_mode():
    block = _block()
    stca = STCABlock(block, STCASettings(channel_fold=8, backend="reference"), num_frames=4)
    x = torch.randn(2 * 4, 17, 48)
    eval_phase = torch.arange(4).remainder(4).expand(2, 4).contiguous()
    for mode in (False, True):  # the block draws nothing: phases are an input
        stca.train(mode)
        torch.testing.assert_close(stca(x), stca(x, eval_phase), atol=0, rtol=0)
    drawn = stdd_kernels.mask_phase(2, 4, mode="train", generator=torch.Generator().manual_seed(11))
    assert not torch.equal(stca(x, drawn), stca(x))  # and an explicit phase is used


def test_block_adds_no_parameters_and_keeps_open_clip_names():
    block = _block()
    stca = STCABlock(block, STCASettings(channel_fold=8), num_frames=2)
    assert [id(p) for p in stca.parameters()] == [id(p) for p in block.parameters()]
    assert set(stca.state_dict()) == {f"block.{k}" for k in block.state_dict()}


def test_bad_arguments_name_the_argument():
    block = _block()
    with pytest.raises(ValueError, match="ResidualAttentionBlock"):
        STCABlock(CustomResidualAttentionBlock(48, 4), num_frames=2)
    with pytest.raises(ValueError, match="mask_ratio"):
        STCABlock(block, STCASettings(mask_ratio=1.0), num_frames=2)
    with pytest.raises(ValueError, match="divisible by every scale"):
        STCABlock(block, STCASettings(channel_fold=16, scales=(1, 2)), num_frames=2)  # I = 3
    with pytest.raises(ValueError, match="attention"):
        STCABlock(block, STCASettings(channel_fold=8, attention="flash"), num_frames=2)
    with pytest.raises(ValueError, match="STCASettings"):
        STCABlock(block, {"channel_fold": 8}, num_frames=2)
    stca = STCABlock(block, STCASettings(channel_fold=8), num_frames=2)
    x = torch.randn(4, 17, 48)
    with pytest.raises(ValueError, match=r"phase values must be in \[0, K\)"):
        stca(x, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="phase must have shape"):
        stca(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by num_frames"):
        stca(torch.randn(3, 17, 48))


def test_xformers_request_without_xformers_is_a_clear_error():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="xformers"):
            STCABlock(_block(), STCASettings(channel_fold=8, attention="xformers"), num_frames=2)
    else:
        pytest.skip("xformers is installed; its kernel needs CUDA (not tested on CPU)")
