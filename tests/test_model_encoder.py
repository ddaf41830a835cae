"""VideoEncoder on open_clip ViTs: parity with encode_image when STCA is off,
temporal behaviour when on, phases, weights loading and checkpoint round trips."""

import copy
import hashlib
import os

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from open_clip.transformer import QuickGELU, VisionTransformer

import stdd_kernels
from stdd.model import (
    STCABlock,
    STCASettings,
    STDDModel,
    VideoEncoder,
    build_stdd,
    load_clip,
    template_prompts,
)

TINY = "STDD-Tiny-ViT"


def _tiny_clip(seed=0):
    torch.manual_seed(seed)
    clip, source = load_clip(TINY, None, allow_random_init=True)
    return clip, source


def _perturb(module, seed=0):
    """Non-trivial biases / norms so that parity tests see every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))


VARIANTS = {
    "tiny-config": None,
    "layer-scale-avg-pool-final-ln": dict(
        image_size=24, patch_size=6, width=48, layers=2, heads=3, mlp_ratio=2.0, ls_init_value=0.2,
        pool_type="avg", final_ln_after_pool=True, output_dim=16,
    ),
    "no-ln-pre-quickgelu": dict(
        image_size=24, patch_size=4, width=40, layers=3, heads=5, mlp_ratio=4.0, no_ln_pre=True,
        act_layer=QuickGELU, output_dim=24,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch, frames", [(2, 3), (1, 1)])
def test_switched_off_encoder_equals_encode_image_per_frame(variant, batch, frames):
    if VARIANTS[variant] is None:
        clip, _ = _tiny_clip()
        visual = clip.visual
    else:
        torch.manual_seed(0)
        visual = VisionTransformer(**VARIANTS[variant])
    _perturb(visual)
    plain = copy.deepcopy(visual).eval()
    encoder = VideoEncoder(visual, STCASettings(mask_ratio=0.0, mixing="none", backend="reference")).eval()
    size = plain.image_size
    video = torch.randn(batch, frames, 3, *size)
    with torch.no_grad():
        expected = plain(video.reshape(batch * frames, 3, *size)).reshape(batch, frames, -1)
        got = encoder(video)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_tiny_config_encoder_equals_clip_encode_image():
    clip, _ = _tiny_clip()
    _perturb(clip.visual)
    plain = copy.deepcopy(clip).eval()
    encoder = VideoEncoder(clip.visual, STCASettings(mask_ratio=0.0, mixing="none")).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = plain.encode_image(video.reshape(8, 3, 32, 32)).reshape(2, 4, -1)
        assert (encoder(video) - expected).abs().max().item() <= 1e-5


class _AttentionCalls(torch.overrides.TorchFunctionMode):
    """Counts the attention computations of a forward pass and the tokens each one attends over."""

    NAMES = ("scaled_dot_product_attention", "multi_head_attention_forward")

    def __init__(self):
        super().__init__()
        self.lengths = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            query = args[0]  # (R, H, L, d) for SDPA; (N, L, D) / (L, N, D) for nn.MultiheadAttention
            self.lengths.append(query.shape[-2] if func.__name__ == "scaled_dot_product_attention" else query.shape)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_frame_only_encoder_is_open_clip_forward_and_cost(variant):
    """stca=None: open_clip's own blocks untouched; the output is open_clip's forward on every
    frame (bitwise), with one attention per block over all tokens and plain CLIP's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    if VARIANTS[variant] is None:
        visual = _tiny_clip()[0].visual
    else:
        torch.manual_seed(0)
        visual = VisionTransformer(**VARIANTS[variant])
    _perturb(visual)
    plain = copy.deepcopy(visual).eval()
    blocks = list(visual.transformer.resblocks)
    encoder = VideoEncoder(visual, None).eval()
    assert list(encoder.blocks) == blocks and not any(isinstance(b, STCABlock) for b in encoder.modules())
    assert set(encoder.visual.state_dict()) == set(plain.state_dict())  # open_clip's keys, no ".block"
    batch, frames = 2, 3
    video = torch.randn(batch, frames, 3, *plain.image_size)
    flat = video.reshape(batch * frames, 3, *plain.image_size)
    with torch.no_grad():
        assert torch.equal(encoder(video), plain(flat).reshape(batch, frames, -1))
        calls = _AttentionCalls()
        with calls:
            encoder(video)
        tokens = 1 + plain.grid_size[0] * plain.grid_size[1]
        assert len(calls.lengths) == len(blocks)  # one attention per block ...
        assert all(tokens in shape for shape in calls.lengths)  # ... over the 1+N tokens of a frame
        counted = []
        for module, source in ((encoder, video), (plain, flat)):
            with FlopCounterMode(display=False) as flops:
                module(source)
            counted.append(flops.get_total_flops())
        assert counted[0] == counted[1] > 0  # the cost of plain CLIP, nothing more
        stca = VideoEncoder(copy.deepcopy(plain), STCASettings(mask_ratio=0.0, mixing="none", channel_fold=1,
                                                               scales=(1,), window=(1, 1)))
        calls = _AttentionCalls()
        with calls:
            stca.eval()(video)
        assert len(calls.lengths) == 2 * len(blocks)  # an STCA block with everything off still attends twice
    with pytest.raises(ValueError, match="no STCA blocks"):
        encoder(video, torch.zeros(batch, frames, dtype=torch.long))


def test_frame_only_gradient_checkpointing_is_open_clip_s():
    clip, _ = _tiny_clip()
    encoder = VideoEncoder(clip.visual, None).train()
    video = torch.randn(2, 2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        encoder.zero_grad()
        encoder.set_grad_checkpointing(enable)
        assert encoder.visual.transformer.grad_checkpointing is enable
        encoder(video).square().sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_every_block_is_stca_and_parameters_are_the_clip_ones():
    clip, _ = _tiny_clip()
    parameter_ids = [id(p) for p in clip.visual.parameters()]
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8))
    assert all(isinstance(b, STCABlock) for b in encoder.blocks)
    assert len(encoder.blocks) == 2
    assert [id(p) for p in encoder.parameters()] == parameter_ids
    assert "visual.transformer.resblocks.1.block.attn.in_proj_weight" in encoder.state_dict()


def test_stca_mixes_frames_within_a_clip_only():
    clip, _ = _tiny_clip()
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8, backend="reference")).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    changed = video.clone()
    changed[0, 1] += torch.randn(3, 32, 32)  # frame 1 of clip 0
    with torch.no_grad():
        before, after = encoder(video), encoder(changed)
    difference = (before - after).abs().amax(dim=-1)  # (B, T)
    assert difference[0, 0] > 1e-4 and difference[0, 2] > 1e-4  # neighbours see the change
    assert difference[1].max() == 0  # the other clip does not


def test_phases_are_an_input_shared_by_blocks_or_one_per_block():
    clip, _ = _tiny_clip()
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8, backend="reference")).train()
    video = torch.randn(2, 4, 3, 32, 32)
    drawn = stdd_kernels.mask_phase(2, 4, mode="train", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared = encoder(video, drawn)
        assert torch.equal(shared, encoder(video, drawn.expand(2, 2, 4)))  # (B, T) = the same row per block
        other = torch.stack([drawn, (drawn + 1) % 4])
        assert not torch.equal(shared, encoder(video, other))  # block 1 reads its own row
        assert torch.equal(encoder(video, other), encoder(video, other.clone()))
        # no phase: the evaluation phases t mod K, in training mode too
        assert torch.equal(encoder(video), encoder(video, torch.arange(4).expand(2, 4) % 4))
        encoder.eval()
        eval_out = encoder(video)
        assert torch.equal(eval_out, encoder(video, torch.arange(4).expand(2, 4) % 4))
    with pytest.raises(ValueError, match="phase values"):
        encoder(video, torch.full((2, 4), 4))
    with pytest.raises(ValueError, match="phase values"):
        encoder(video, torch.full((2, 2, 4), 4))
    with pytest.raises(ValueError, match=r"\(n_blocks, B, T\) = \(2, 2, 4\)"):
        encoder(video, torch.zeros(3, 2, 4, dtype=torch.long))


def test_gradient_checkpointing_gives_the_same_gradients():
    clip, _ = _tiny_clip()
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8, backend="reference")).train()
    video = torch.randn(2, 4, 3, 32, 32)
    phase = torch.tensor([[1, 2, 3, 0], [3, 0, 1, 2]])
    grads = []
    for enable in (False, True):
        encoder.zero_grad()
        encoder.set_grad_checkpointing(enable)
        encoder(video, phase).square().sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_bad_inputs_and_settings_are_named():
    clip, _ = _tiny_clip()
    with pytest.raises(ValueError, match="window"):
        VideoEncoder(copy.deepcopy(clip.visual), STCASettings(window=(3, 3)))  # 4x4 grid
    with pytest.raises(ValueError, match="divisible by every scale"):
        VideoEncoder(copy.deepcopy(clip.visual), STCASettings(channel_fold=64, scales=(1, 2)))  # I = 1
    dropout_clip = open_clip.create_model(TINY, force_patch_dropout=0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        VideoEncoder(dropout_clip.visual)
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        encoder(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match="pixels"):
        encoder(torch.randn(1, 2, 3, 64, 64))


def test_weights_are_required_unless_random_init_is_explicit(tmp_path):
    with pytest.raises(ValueError, match="allow_random_init"):
        load_clip(TINY, None)
    with pytest.raises(ValueError, match="neither a known tag nor a file"):
        load_clip(TINY, "openai")  # no released weights for the tiny config
    missing = tmp_path / "nowhere" / "ViT-B-16.bin"
    with pytest.raises(ValueError, match="does not exist"):
        load_clip(TINY, str(missing))
    with pytest.raises(ValueError, match="not an open_clip model config"):
        load_clip("ViT-Z-99", None, allow_random_init=True)


def test_local_checkpoint_round_trip(tmp_path):
    clip, _ = _tiny_clip(seed=3)
    _perturb(clip)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)

    loaded, source = load_clip(TINY, str(path))
    assert source.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.pretrained == str(path)
    for (name, want), (_, got) in zip(clip.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(want, got), name

    encoder = VideoEncoder.from_pretrained(TINY, str(path), stca=STCASettings(mask_ratio=0.0, mixing="none")).eval()
    assert encoder.source == source
    assert encoder.preprocess_cfg["size"] == (32, 32) and len(encoder.preprocess_cfg["mean"]) == 3
    video = torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        expected = clip.eval().encode_image(video[0]).unsqueeze(0)
        assert (encoder(video) - expected).abs().max().item() <= 1e-5

    wrong = tmp_path / "tiny64.pt"
    torch.save(open_clip.create_model("STDD-Tiny-ViT-64").state_dict(), wrong)
    with pytest.raises(ValueError, match="tiny64.pt"):
        load_clip(TINY, str(wrong))


def test_open_clip_visual_state_dict_loads_into_converted_encoder():
    source_clip, _ = _tiny_clip(seed=1)
    target_clip, _ = _tiny_clip(seed=2)
    encoder = VideoEncoder(target_clip.visual, STCASettings(channel_fold=8))
    encoder.load_clip_visual_state_dict(source_clip.state_dict())  # whole-CLIP keys
    renamed = {k.replace(".block.", "."): v for k, v in encoder.visual.state_dict().items()}
    for name, value in source_clip.visual.state_dict().items():
        assert torch.equal(renamed[name], value), name


def test_stdd_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model, text = build_stdd(TINY, None, allow_random_init=True, stca=STCASettings(channel_fold=8))
    classes = text.class_features(template_prompts(["archery", "juggling", "surfing"], ["a video of {}."]))
    video = torch.randn(2, 4, 3, 32, 32)
    labels = torch.tensor([0, 2])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(video, classes.features, classes.mask, labels).loss.backward()
    optimizer.step()  # weights now differ from any fresh build
    path = tmp_path / "stdd.pt"
    torch.save(model.state_dict(), path)

    torch.manual_seed(1)
    restored, _ = build_stdd(TINY, None, allow_random_init=True, stca=STCASettings(channel_fold=8))
    restored.load_state_dict(torch.load(path, weights_only=True))
    model.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            restored(video, classes.features, classes.mask).scores,
            model(video, classes.features, classes.mask).scores,
            atol=0, rtol=0,
        )
    assert isinstance(restored, STDDModel)


def _released_vision_tower(name):
    """The image tower of a released open_clip architecture, randomly initialised (no download)."""
    from open_clip.model import _build_vision_tower

    config = open_clip.get_model_config(name)
    torch.manual_seed(0)
    return _build_vision_tower(config["embed_dim"], config["vision_cfg"]).eval()


@pytest.mark.parametrize("name, window", [("ViT-B-32", (7, 1)), ("ViT-B-16", (2, 2))])
def test_released_architectures_convert_and_match_when_switched_off(name, window):
    visual = _released_vision_tower(name)
    plain = copy.deepcopy(visual)
    encoder = VideoEncoder(visual, STCASettings(window=window, mask_ratio=0.0, mixing="none")).eval()
    video = torch.randn(1, 2, 3, 224, 224)
    with torch.no_grad():
        assert (encoder(video) - plain(video[0]).unsqueeze(0)).abs().max().item() <= 1e-5


def test_vit_l14_converts_with_paper_settings_and_b32_default_window_is_explained():
    encoder = VideoEncoder(_released_vision_tower("ViT-L-14"))  # 16x16 grid, width 1024: I = 32
    assert len(encoder.blocks) == 24 and all(isinstance(b, STCABlock) for b in encoder.blocks)
    with pytest.raises(ValueError, match=r"7x7 patch grid.*Window sides that tile this grid: \[1, 7\]"):
        VideoEncoder(_released_vision_tower("ViT-B-32"))


def test_missing_tag_download_fails_with_instructions(tmp_path):
    """Offline (as CI is), a released tag cannot be downloaded: the error says how to provide weights."""
    import subprocess
    import sys

    code = (
        "from stdd.model import load_clip\n"
        "try:\n"
        f"    load_clip('ViT-B-16', 'openai', cache_dir={str(tmp_path)!r})\n"
        "except RuntimeError as error:\n"
        "    print('MESSAGE', error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "MESSAGE could not load the 'ViT-B-16' weights for pretrained tag 'openai'" in result.stdout, result.stderr
    assert "path of a local checkpoint file" in result.stdout


def test_openai_tags_get_the_activation_their_weights_were_trained_with():
    from stdd.model.clip_loading import tag_needs_quick_gelu

    assert tag_needs_quick_gelu("ViT-B-16", "openai")
    assert not tag_needs_quick_gelu("ViT-B-16-quickgelu", "openai")
    assert not tag_needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
