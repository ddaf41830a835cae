"""Widened-time attention (Open-VCLIP / FROSTER's "expand temporal view") against a loop-by-loop reading of
its rule, in float64: queries are frame t's tokens; keys and values are frame t+1's, frame t-1's and frame
t's projected tokens (CLS included), a missing neighbour being a block of zeros that is not masked."""

import copy
import math

import pytest
import torch

pytest.importorskip("open_clip")

from open_clip.transformer import VisionTransformer

from stdd.model import VideoEncoder, load_clip
from stdd.model.expand_view import expand_view_attention, expand_view_block


def _visual(seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(image_size=16, patch_size=8, width=24, layers=2, heads=3, mlp_ratio=2.0, output_dim=12)
    options.update(overrides)
    visual = VisionTransformer(**options).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and norms, so every parameter shows in the output
        for p in visual.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return visual


@torch.no_grad()
def reference_attention(attn, x, frames):
    """The rule, one query at a time: softmax over [frame t+1 ; frame t-1 ; frame t] keys, zeros where a
    neighbour is missing (their logit is 0 and their value 0), then out_proj."""
    rows, length, width = x.shape
    heads = attn.num_heads
    dim = width // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q_all = x @ w[:width].T + b[:width]
    k_all = x @ w[width:2 * width].T + b[width:2 * width]
    v_all = x @ w[2 * width:].T + b[2 * width:]
    out = torch.zeros(rows, length, width, dtype=x.dtype)
    for row in range(rows):
        clip, t = divmod(row, frames)
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            keys, values = [], []
            for neighbour in (t + 1, t - 1, t):
                for token in range(length):
                    if 0 <= neighbour < frames:
                        source = clip * frames + neighbour
                        keys.append(k_all[source, token, cols])
                        values.append(v_all[source, token, cols])
                    else:
                        keys.append(torch.zeros(dim, dtype=x.dtype))
                        values.append(torch.zeros(dim, dtype=x.dtype))
            for query in range(length):
                logits = [float(q_all[row, query, cols] @ key) / math.sqrt(dim) for key in keys]
                top = max(logits)
                weights = [math.exp(logit - top) for logit in logits]
                total = sum(weights)
                out[row, query, cols] = sum((weight / total) * value for weight, value in zip(weights, values))
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_attention_equals_the_loop_reference_boundary_frames_included(frames):
    block = _visual().transformer.resblocks[0]
    x = torch.randn(2 * frames, 5, 24, dtype=torch.float64)
    got = expand_view_attention(block.attn, x, frames)
    expected = reference_attention(block.attn, x, frames)
    assert (got - expected).abs().max().item() < 1e-12


def test_the_missing_neighbours_are_unmasked_zeros():
    """A clip's first and last frames see zero keys: each takes a logit of 0 in the softmax. Masking them
    instead (attending to the existing frames only) gives other outputs there, the same inside."""
    block = _visual().transformer.resblocks[0]
    frames, x = 3, torch.randn(3, 5, 24, dtype=torch.float64)
    got = expand_view_attention(block.attn, x, frames)
    attn = block.attn
    heads, width = attn.num_heads, 24
    qkv = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(3, 5, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    masked = []
    for t in range(frames):
        seen = [n for n in (t + 1, t - 1, t) if 0 <= n < frames]
        keys, values = torch.cat([k[n] for n in seen], 1), torch.cat([v[n] for n in seen], 1)
        masked.append(torch.nn.functional.scaled_dot_product_attention(q[t:t + 1], keys[None], values[None]))
    masked = torch.nn.functional.linear(torch.cat(masked).transpose(1, 2).reshape(3, 5, width),
                                        attn.out_proj.weight, attn.out_proj.bias)
    assert (got[1] - masked[1]).abs().max().item() < 1e-12  # the middle frame has both neighbours
    for t in (0, 2):
        assert (got[t] - masked[t]).abs().max().item() > 1e-3


def test_encoder_runs_every_block_widened_keeps_openai_names_and_adds_nothing():
    visual = _visual()
    plain = copy.deepcopy(visual)
    encoder = VideoEncoder(visual, None, temporal="expand_view").eval()
    assert list(encoder.visual.state_dict()) == list(plain.state_dict())  # the same names, nothing added
    batch, frames = 2, 3
    video = torch.randn(batch, frames, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        tokens = plain._embeds(video.reshape(batch * frames, 3, 16, 16))
        for block in plain.transformer.resblocks:
            tokens = tokens + block.ls_1(reference_attention(block.attn, block.ln_1(tokens), frames))
            tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
        expected = (plain.ln_post(tokens[:, 0]) @ plain.proj).reshape(batch, frames, -1)
        got = encoder(video)
    assert (got - expected).abs().max().item() < 1e-11
    with torch.no_grad():  # frames do see each other: a change in frame 2 reaches frames 0 and 1 after 2 blocks
        changed = video.clone()
        changed[:, 2] += 1.0
        moved = (encoder(changed) - got).abs().amax(dim=(0, 2))
    assert bool((moved > 1e-6).all())


def test_gradients_match_finite_differences():
    block = _visual(seed=3, width=8, heads=2, layers=1).transformer.resblocks[0]
    x = torch.randn(4, 2, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expand_view_block(block, t, 2), (x,), eps=1e-6, atol=1e-8, fast_mode=True)

    def attention_of(weight):
        attn = copy.deepcopy(block.attn)
        del attn.in_proj_weight  # a plain tensor in its place, so the gradient reaches the weight
        attn.in_proj_weight = weight
        return expand_view_attention(attn, x.detach(), 2)

    weight = block.attn.in_proj_weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(attention_of, (weight,), eps=1e-6, atol=1e-8, fast_mode=True)


def test_tiny_clip_config_trains_with_gradient_checkpointing():
    torch.manual_seed(0)
    clip, _ = load_clip("STDD-Tiny-ViT", None, allow_random_init=True)
    encoder = VideoEncoder(clip.visual, None, temporal="expand_view").train()
    video = torch.randn(2, 4, 3, 32, 32)
    plain_out = encoder(video)
    plain_out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in grads
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    out = encoder(video)
    out.square().sum().backward()
    assert torch.allclose(out, plain_out)
    for name, grad in grads.items():
        assert torch.allclose(dict(encoder.named_parameters())[name].grad, grad, atol=1e-6), name


def test_settings_are_checked():
    clip, _ = load_clip("STDD-Tiny-ViT", None, allow_random_init=True)
    from stdd.model import STCASettings

    with pytest.raises(ValueError, match="takes no STCA settings"):
        VideoEncoder(copy.deepcopy(clip.visual), STCASettings(), temporal="expand_view")
    with pytest.raises(ValueError, match="needs STCA settings"):
        VideoEncoder(copy.deepcopy(clip.visual), None, temporal="stca")
    with pytest.raises(ValueError, match="temporal must be one of"):
        VideoEncoder(copy.deepcopy(clip.visual), None, temporal="expand")
    with pytest.raises(ValueError, match="phase was given"):
        VideoEncoder(clip.visual, None, temporal="expand_view")(torch.randn(1, 2, 3, 32, 32),
                                                                  torch.zeros(1, 2, dtype=torch.long))
