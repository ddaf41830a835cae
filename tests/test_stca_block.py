"""STCABlock: equals the plain open_clip block when STCA is switched off, and
matches a literal, step-by-step reading of docs/stca.md (steps 1-4) otherwise."""

import copy
import re
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("open_clip")

import open_clip.transformer as open_clip_transformer
from open_clip.transformer import CustomResidualAttentionBlock, LayerScale, ResidualAttentionBlock, VisionTransformer

import stdd_kernels
from stdd.model import STCABlock, STCASettings, VideoEncoder, multi_head_self_attention
from stdd.model.stca_settings import PROJECTIONS
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
    """docs/stca.md steps 1-4 written out: each scale attended on its own, with the
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


class _PackedAttention(torch.nn.Module):
    """A stand-in for open_clip's own ``Attention`` module (which replaces nn.MultiheadAttention in
    newer open_clip blocks): packed ``in_proj_weight``/``in_proj_bias``, an ``out_proj`` linear,
    ``num_heads``, ``batch_first``, an ``attn_drop`` dropout, optional scaled-cosine / head-scale
    parts, and no ``embed_dim`` or ``_qkv_same_embed_dim`` attributes."""

    def __init__(self, dim, num_heads, *, scaled_cosine=False, batch_first=True):
        super().__init__()
        self.num_heads = num_heads
        self.batch_first = batch_first
        self.in_proj_weight = torch.nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.in_proj_bias = torch.nn.Parameter(0.1 * torch.randn(3 * dim))
        self.logit_scale = torch.nn.Parameter(torch.zeros(num_heads, 1, 1)) if scaled_cosine else None
        self.head_scale = None
        self.attn_drop = torch.nn.Dropout(0.0)
        self.out_proj = torch.nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):  # (N, L, D), batch first
        n, length, dim = x.shape
        q, k, v = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.softmax(q @ k.transpose(-1, -2) / (dim // self.num_heads) ** 0.5, dim=-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class _PackedAttentionBlock(torch.nn.Module):
    """A block laid out like open_clip's ResidualAttentionBlock, around ``_PackedAttention``."""

    def __init__(self, dim, heads, **attention_options):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = _PackedAttention(dim, heads, **attention_options)
        self.ls_1, self.ls_2 = torch.nn.Identity(), torch.nn.Identity()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def test_block_check_is_duck_typed_on_what_stca_uses():
    torch.manual_seed(0)
    block = _PackedAttentionBlock(48, 4)
    assert not hasattr(block.attn, "embed_dim") and not hasattr(block.attn, "_qkv_same_embed_dim")
    x = torch.randn(2 * 3, 17, 48)
    with torch.no_grad():
        off = STCABlock(block, STCASettings(mask_ratio=0.0, mixing="none", backend="reference"), num_frames=3)
        torch.testing.assert_close(off(x), block(x), atol=1e-5, rtol=1e-5)
        # STCA on: the same result as an nn.MultiheadAttention block holding the same weights
        twin = copy.deepcopy(block)
        twin.attn = torch.nn.MultiheadAttention(48, 4, batch_first=True)
        twin.attn.in_proj_weight.copy_(block.attn.in_proj_weight)
        twin.attn.in_proj_bias.copy_(block.attn.in_proj_bias)
        twin.attn.out_proj.load_state_dict(block.attn.out_proj.state_dict())
        h = block.ln_1(x)  # the stand-in computes that attention
        torch.testing.assert_close(twin.attn(h, h, h, need_weights=False)[0], block.attn(h), atol=1e-5, rtol=1e-5)
        settings = STCASettings(channel_fold=8, backend="reference")
        phase = torch.tensor([[0, 1, 2], [3, 1, 0]])
        torch.testing.assert_close(STCABlock(block, settings, num_frames=3)(x, phase),
                                   STCABlock(twin, settings, num_frames=3)(x, phase), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scaled-cosine"):
        STCABlock(_PackedAttentionBlock(48, 4, scaled_cosine=True), num_frames=3)
    with pytest.raises(ValueError, match="batch-first"):
        STCABlock(_PackedAttentionBlock(48, 4, batch_first=False), num_frames=3)
    separate = _block(48, 4)
    separate.attn = torch.nn.MultiheadAttention(48, 4, kdim=32, vdim=32, batch_first=True)
    with pytest.raises(ValueError, match="one packed in_proj_weight"):
        STCABlock(separate, num_frames=3)
    with pytest.raises(ValueError, match="num_heads"):
        broken = _PackedAttentionBlock(48, 4)
        broken.attn.num_heads = 5
        STCABlock(broken, num_frames=3)


class _OpenClipAttention(torch.nn.Module):
    """Laid out like open_clip's own ``Attention`` (with which its main branch builds every
    ``ResidualAttentionBlock``): a packed ``in_proj_weight`` (3D, D) and ``in_proj_bias``, ``out_proj``,
    ``num_heads``, ``head_dim``, ``scale``, ``attn_drop`` and ``out_drop`` dropouts; ``ln_q`` / ``ln_k``
    (qk-norm, per head) and ``ln_inner`` (inner norm) that are ``nn.Identity`` unless switched on;
    ``logit_scale`` (scaled-cosine attention) and ``head_scale`` that are ``None`` unless switched on;
    and no ``batch_first`` attribute: it takes (N, L, D) by construction. ``batch_first`` given: the
    attribute is set (an older layout that had the setting)."""

    def __init__(self, dim, num_heads, *, qk_norm=False, scaled_cosine=False, scale_heads=False, inner_norm=False,
                 proj_drop=0.0, scale=None, batch_first=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.in_proj_weight = torch.nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.in_proj_bias = torch.nn.Parameter(0.1 * torch.randn(3 * dim))
        self.ln_q = torch.nn.LayerNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.ln_k = torch.nn.LayerNorm(self.head_dim) if qk_norm else torch.nn.Identity()
        self.logit_scale = torch.nn.Parameter(torch.full((num_heads, 1, 1), 2.3)) if scaled_cosine else None
        self.head_scale = torch.nn.Parameter(torch.rand(num_heads, 1, 1) + 0.5) if scale_heads else None
        self.ln_inner = torch.nn.LayerNorm(dim) if inner_norm else torch.nn.Identity()
        self.attn_drop = torch.nn.Dropout(0.0)
        self.out_proj = torch.nn.Linear(dim, dim)
        self.out_drop = torch.nn.Dropout(proj_drop)
        if batch_first is not None:
            self.batch_first = batch_first

    def forward(self, x, attn_mask=None):  # (N, L, D)
        n, length, dim = x.shape
        q, k, v = (part.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for part in torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
        if self.logit_scale is not None:
            unit = torch.nn.functional.normalize
            logits = unit(q, dim=-1) @ unit(k, dim=-1).transpose(-1, -2) * self.logit_scale.exp()
        else:
            logits = self.ln_q(q) @ self.ln_k(k).transpose(-1, -2) * self.scale
        heads = self.attn_drop(logits.softmax(dim=-1)) @ v  # (N, H, L, head_dim)
        if self.head_scale is not None:
            heads = heads * self.head_scale
        merged = self.ln_inner(heads.transpose(1, 2).reshape(n, length, dim))
        return self.out_drop(self.out_proj(merged))


class _LayersLayerNorm(torch.nn.LayerNorm):
    """open_clip's LayerNorm (F.layer_norm, the result cast back to the input's dtype) as its main branch
    defines it: in ``open_clip.layers`` (3.x: ``open_clip.transformer``), the module named below."""

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


try:  # the installed open_clip's, where it has that module
    from open_clip.layers import LayerNorm as _MainBranchLayerNorm
except ImportError:
    _LayersLayerNorm.__module__ = "open_clip.layers"
    _MainBranchLayerNorm = _LayersLayerNorm


class _OpenClipBlock(torch.nn.Module):
    """open_clip's ResidualAttentionBlock layout (ln_1, attn, ls_1, ln_2, mlp, ls_2) around ``attn``, with
    the LayerNorm of open_clip's main branch."""

    def __init__(self, attn, dim, ls_init_value=0.5):
        super().__init__()
        self.ln_1, self.ln_2 = _MainBranchLayerNorm(dim), _MainBranchLayerNorm(dim)
        self.attn = attn
        self.ls_1, self.ls_2 = LayerScale(dim, ls_init_value), LayerScale(dim, ls_init_value)
        self.mlp = torch.nn.Sequential(OrderedDict([
            ("c_fc", torch.nn.Linear(dim, 2 * dim)), ("gelu", torch.nn.GELU()), ("c_proj", torch.nn.Linear(2 * dim, dim)),
        ]))

    def forward(self, x, attn_mask=None):
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def _open_clip_block(dim=48, heads=4, *, attention="written", seed=0, **options):
    torch.manual_seed(seed)
    if attention == "written":
        attn = _OpenClipAttention(dim, heads, **options)
    else:  # the installed open_clip's own module, where it has one
        if getattr(open_clip_transformer, "Attention", None) is None:
            pytest.skip("this open_clip has no Attention module")
        attn = open_clip_transformer.Attention(dim, heads, **options)
    block = _OpenClipBlock(attn, dim)
    with torch.no_grad():  # non-trivial biases, norms and layer scales
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return block.eval()


def _multihead_twin(block, dim=48, heads=4):
    """``block`` with an nn.MultiheadAttention holding the same weights."""
    twin = copy.deepcopy(block)
    twin.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        twin.attn.in_proj_weight.copy_(block.attn.in_proj_weight)
        twin.attn.in_proj_bias.copy_(block.attn.in_proj_bias)
        twin.attn.out_proj.load_state_dict(block.attn.out_proj.state_dict())
    return twin.eval()


@pytest.mark.parametrize("attention", ["written", "open_clip"])
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_open_clip_attention_module_layout_is_computed_as_its_block(projection, attention):
    block = _open_clip_block(attention=attention)
    assert not hasattr(block.attn, "batch_first")
    x = torch.randn(2 * 3, 17, 48)
    with torch.no_grad():
        off = STCASettings(mask_ratio=0.0, mixing="none", backend="reference", projection=projection)
        torch.testing.assert_close(STCABlock(block, off, num_frames=3).eval()(x), block(x), atol=1e-5, rtol=1e-5)
        # STCA on: what the same weights give in an nn.MultiheadAttention block
        twin = _multihead_twin(block)
        h = block.ln_1(x)
        torch.testing.assert_close(twin.attn(h, h, h, need_weights=False)[0], block.attn(h), atol=1e-5, rtol=1e-5)
        on = STCASettings(channel_fold=8, backend="reference", projection=projection)
        phase = torch.tensor([[0, 1, 2], [3, 1, 0]])
        torch.testing.assert_close(STCABlock(block, on, num_frames=3).eval()(x, phase),
                                   STCABlock(twin, on, num_frames=3).eval()(x, phase), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_video_encoder_converts_a_vit_built_with_that_attention_module(projection):
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=16, patch_size=4, width=48, layers=2, heads=4, mlp_ratio=2.0,
                               output_dim=24).eval()
    video = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        expected = visual(video.flatten(0, 1)).reshape(2, 3, -1)
        blocks = visual.transformer.resblocks
        for index, block in enumerate(blocks):  # the same weights in blocks laid out as open_clip's main branch's
            attention = _OpenClipAttention(48, 4)
            attention.in_proj_weight.copy_(block.attn.in_proj_weight)
            attention.in_proj_bias.copy_(block.attn.in_proj_bias)
            attention.out_proj.load_state_dict(block.attn.out_proj.state_dict())
            blocks[index] = _OpenClipBlock(attention, 48)
            for part in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"):
                setattr(blocks[index], part, getattr(block, part))
        torch.testing.assert_close(visual(video.flatten(0, 1)).reshape(2, 3, -1), expected, atol=1e-5, rtol=1e-5)
        settings = STCASettings(window=(2, 2), mask_ratio=0.0, mixing="none", backend="reference",
                                projection=projection)
        encoder = VideoEncoder(visual, settings).eval()
        torch.testing.assert_close(encoder(video), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(qk_norm=True), "qk-norm (ln_q)"),
    (dict(qk_norm=True, batch_first=True), "qk-norm (ln_q)"),
    (dict(qk_norm=True, attention="open_clip"), "qk-norm (ln_q)"),
    (dict(scaled_cosine=True), "scaled-cosine attention (logit_scale)"),
    (dict(scale_heads=True), "head scaling (head_scale)"),
    (dict(inner_norm=True), "inner attention norm (ln_inner)"),
    (dict(inner_norm=True, attention="open_clip"), "inner attention norm (ln_inner)"),
    (dict(proj_drop=0.1), "drops out its output (out_drop"),
    (dict(scale=0.5), "scales its attention logits by 0.5"),
    (dict(batch_first=False), "must be batch-first"),
])
def test_open_clip_attention_variants_stca_does_not_compute_are_refused(options, message):
    block = _open_clip_block(**options)
    with pytest.raises(ValueError, match=re.escape(message)):
        STCABlock(block, STCASettings(channel_fold=8), num_frames=3)


def test_xformers_request_without_xformers_is_a_clear_error():
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="xformers"):
            STCABlock(_block(), STCASettings(channel_fold=8, attention="xformers"), num_frames=2)
    else:
        pytest.skip("xformers is installed; its kernel needs CUDA (not tested on CPU)")
