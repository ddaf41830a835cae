"""The authors' release as an option (docs/stca.md, section 5): the settings that select it, the
``k400_vitb16_official`` preset, an STCA block with those settings against a literal loop-by-loop
re-implementation of the release's rules, and its phases (training: per-clip offset, permuted per
clip, drawn per block and per forward; evaluation: ``t mod K`` permuted per clip, seeded)."""

import math

import pytest
import torch

pytest.importorskip("open_clip")

from open_clip.transformer import ResidualAttentionBlock  # noqa: E402

from stdd.model import STCABlock, STCASettings, VideoEncoder, load_clip  # noqa: E402
from stdd.model.phases import PhaseSampler  # noqa: E402
from stdd.seeding import torch_generator  # noqa: E402

RELEASE = dict(window=(2, 2), mask_ratio=0.5, mask_rounding="floor", scales=(1, 2), channel_fold=32,
               mixing="official", shuffle_phases=True, per_block_phases=True, eval_shuffle_phases=True)


# ----------------------------------------------------------------------------- a literal release block


def _release_block_literal(block, x, frames, phase, *, window, mask_ratio, scales, channel_fold):
    """The release's STCA block written out from its rules with plain loops (no stdd_kernels):

    - masking: ``m = int(mask_ratio * K)`` cells of each window (floor); a frame of phase ``o``
      masks cell ``c`` when ``(c - o) mod K < m``; kept tokens window by window, cells increasing;
    - mixing of scale ``s``: ``I = D // fold``; channels ``[2I, D)`` own; for ``i = 0 .. s-1``,
      ``d = I >> i``: channels ``[0, d)`` <- kept token ``j`` of frame ``t-(i+1)`` for ``t >= i+1``
      and ``[2I-d, 2I)`` <- frame ``t+(i+1)`` for ``t <= T-2-i``, later ``i`` overwriting earlier;
      channels never written are 0; the CLS token unmixed;
    - attention with the block's module on the full path and on each scale (mixed-token residual),
      mean over scales, padding of CLS + kept tokens over the full path, MLP on the full path.
    """
    rows, length, width = x.shape
    clips, grid = rows // frames, math.isqrt(length - 1)
    w1, w2 = window
    cells = w1 * w2
    masked = int(mask_ratio * cells)
    mix = width // channel_fold

    def kept_positions(offset):
        positions = []
        for window_row in range(grid // w1):
            for window_col in range(grid // w2):
                for cell in range(cells):
                    if (cell - offset) % cells >= masked:
                        positions.append(1 + (window_row * w1 + cell // w2) * grid + window_col * w2 + cell % w2)
        return positions

    def attend(tokens):
        normed = block.ln_1(tokens)
        return block.ls_1(block.attn(normed, normed, normed, need_weights=False)[0])

    positions = [[kept_positions(int(phase[b, t])) for t in range(frames)] for b in range(clips)]
    clip_tokens = x.reshape(clips, frames, length, width)
    kept = torch.stack([torch.stack([clip_tokens[b, t, [0] + positions[b][t]] for t in range(frames)])
                        for b in range(clips)])  # (B, T, 1 + N_keep, D)
    full = x + attend(x)
    paths = []
    for scale in scales:
        mixed = torch.zeros_like(kept)
        mixed[:, :, 0] = kept[:, :, 0]
        mixed[:, :, 1:, 2 * mix:] = kept[:, :, 1:, 2 * mix:]
        for i in range(scale):
            block_width = mix >> i
            for t in range(frames):
                if t >= i + 1:
                    mixed[:, t, 1:, :block_width] = kept[:, t - (i + 1), 1:, :block_width]
                if t <= frames - 2 - i:
                    mixed[:, t, 1:, 2 * mix - block_width:2 * mix] = kept[:, t + (i + 1), 1:,
                                                                         2 * mix - block_width:2 * mix]
        flat = mixed.reshape(rows, -1, width)
        paths.append(flat + attend(flat))
    average = torch.stack(paths).mean(0)
    padded = full.clone()
    for b in range(clips):
        for t in range(frames):
            row = b * frames + t
            padded[row, [0] + positions[b][t]] = average[row]
    return padded + block.ls_2(block.mlp(block.ln_2(full)))


def _block(width=64, heads=4, seed=0):
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads, ls_init_value=0.5)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("backend", ["reference", None])  # None: the automatic choice (C++ when built)
@pytest.mark.parametrize(
    "batch, frames, grid, mask_ratio, scales, channel_fold",
    [
        (2, 8, 4, 0.5, (1, 2), 32),  # the release's settings on a width-64 block: I = 2
        (1, 4, 4, 0.4, (1, 2, 3), 8),  # floor(1.6) = 1 masked cell (nearest: 2); I = 8, blocks 8, 4, 2
        (2, 3, 2, 0.5, (2,), 16),  # T = 3: both edges at once
    ],
)
def test_block_with_release_settings_equals_the_literal_release_block(
    backend, batch, frames, grid, mask_ratio, scales, channel_fold
):
    block = _block()
    settings = STCASettings(**{**RELEASE, "mask_ratio": mask_ratio, "scales": scales,
                               "channel_fold": channel_fold, "backend": backend})
    stca = STCABlock(block, settings, num_frames=frames).train()
    sampler = PhaseSampler(settings, seed=3, num_blocks=1)
    phase = sampler(range(batch), epoch=0, num_frames=frames)[0]  # (B, T): block 0's draw
    x = torch.randn(batch * frames, 1 + grid * grid, 64, dtype=torch.float64, requires_grad=True)
    stca.double()
    upstream = torch.randn_like(x)

    out = stca(x, phase)
    (out * upstream).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    expected = _release_block_literal(block, x, frames, phase, window=(2, 2), mask_ratio=mask_ratio,
                                      scales=scales, channel_fold=channel_fold)
    (expected * upstream).sum().backward()
    wanted = [x.grad] + [p.grad for p in block.parameters()]
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    for mine, theirs in zip(got, wanted):
        torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-8)


def test_the_release_differs_from_the_paper_only_where_its_rules_say():
    """Same weights and phases: mixing='official' + floor changes the output at frames 1 and T-2
    only (scales (1, 2), ratio 0.5, where floor and nearest agree); the paper path is unchanged."""
    block = _block().double()
    frames = 8
    x = torch.randn(2 * frames, 17, 64, dtype=torch.float64)
    phase = torch.arange(frames).remainder(4).expand(2, frames)
    paper = STCABlock(block, STCASettings(backend="reference"), num_frames=frames)(x, phase)
    release = STCABlock(block, STCASettings(**RELEASE, backend="reference"), num_frames=frames)(x, phase)
    changed = (paper - release).abs().amax(dim=(1, 2)).reshape(2, frames)
    for clip in range(2):
        assert set(torch.nonzero(changed[clip] > 1e-9).flatten().tolist()) == {1, frames - 2}


def test_mask_rounding_is_a_setting_fed_to_the_geometry_and_both_ops():
    assert STCASettings(mask_ratio=0.9, mask_rounding="floor").mask_ratio == 0.9  # int(3.6) = 3 of 4
    with pytest.raises(ValueError, match="masks all 4 cells"):
        STCASettings(mask_ratio=0.9)  # round(3.6) = 4
    with pytest.raises(ValueError, match="mask_rounding"):
        STCASettings(mask_rounding="ceil")
    for name in ("shuffle_phases", "per_block_phases", "eval_shuffle_phases"):
        with pytest.raises(ValueError, match=name):
            STCASettings(**{name: 1})
    # check_model builds the operators' geometry with the same rounding (nearest would refuse 0.9)
    STCASettings(mask_ratio=0.9, mask_rounding="floor", channel_fold=8).check_model(64, 4)
    block = _block()
    x = torch.randn(4, 17, 64)
    outputs = {}
    for rounding in ("nearest", "floor"):  # 0.4 of K = 4: 2 masked cells nearest, 1 floor
        stca = STCABlock(block, STCASettings(mask_ratio=0.4, mask_rounding=rounding, channel_fold=8,
                                             backend="reference"), num_frames=2)
        outputs[rounding] = stca(x)  # mix_gather and pad_scatter agree on the count, or the shapes would not
    assert not torch.equal(outputs["nearest"], outputs["floor"])


# ----------------------------------------------------------------------------- phases


def _literal_training_phases(seed, epoch, clip, block, frames, cells=4):
    """The release's draw, written out: a random offset per clip, then argsort of uniform noise."""
    generator = torch_generator(seed, "phases", epoch, clip, block)
    offset = torch.randint(0, cells, (1, 1), generator=generator)
    phase = (torch.arange(frames).unsqueeze(0) + offset) % cells
    order = torch.argsort(torch.rand(1, frames, generator=generator), dim=1)
    return torch.gather(phase, 1, order)[0]


def test_release_training_phases_are_shuffled_per_clip_and_drawn_per_block_and_forward():
    settings = STCASettings(**RELEASE)
    sampler = PhaseSampler(settings, seed=7, num_blocks=3)
    frames = 6  # not a multiple of K: the offset shows in the multiset of phases
    phase = sampler(range(20), epoch=0, num_frames=frames)
    assert phase.shape == (3, 20, frames)
    for block in range(3):
        for clip in range(20):
            row = phase[block, clip]
            assert torch.equal(row, _literal_training_phases(7, 0, clip, block, frames))
            assert any(sorted(row.tolist()) == sorted((t + i) % 4 for t in range(frames)) for i in range(4))
    assert not torch.equal(phase[0], phase[1]) and not torch.equal(phase[1], phase[2])  # per block
    assert not torch.equal(phase, sampler(range(20), epoch=1, num_frames=frames))  # per forward (epoch)
    in_order = [(row == (torch.arange(frames) + row[0]) % 4).all().item() for row in phase.flatten(0, 1)]
    assert not all(in_order)  # permuted, not only offset
    again = PhaseSampler(STCASettings(**RELEASE), seed=7, num_blocks=3)
    assert torch.equal(again(range(20), epoch=0, num_frames=frames), phase)  # reproducible from the seed
    assert torch.equal(again([11, 4], epoch=0, num_frames=frames), phase[:, [11, 4]])  # keyed by the clip
    assert not torch.equal(PhaseSampler(settings, seed=8, num_blocks=3)(range(20), epoch=0, num_frames=frames),
                           phase)


def test_release_evaluation_phases_permute_t_mod_k_per_clip_view_and_block_reproducibly():
    sampler = PhaseSampler(STCASettings(**RELEASE), seed=2, num_blocks=2)
    phase = sampler.evaluation([5, 0, 9], num_frames=8, views=2)
    assert phase.shape == (2, 6, 8)
    for row in phase.flatten(0, 1):
        assert sorted(row.tolist()) == sorted(t % 4 for t in range(8))  # a permutation of t mod K
    for block in range(2):
        for video_row, video in enumerate([5, 0, 9]):
            for view in range(2):
                generator = torch_generator(2, "eval_phases", video, view, block)
                order = torch.argsort(torch.rand(1, 8, generator=generator), dim=1)
                literal = torch.gather(torch.arange(8).remainder(4).unsqueeze(0), 1, order)[0]
                assert torch.equal(phase[block, video_row * 2 + view], literal)
    assert not torch.equal(phase[0], phase[1])  # per block
    assert not torch.equal(phase[:, 0], phase[:, 1])  # per view
    assert torch.equal(sampler.evaluation([0], num_frames=8, views=2), phase[:, 2:4])  # any batch
    assert torch.equal(PhaseSampler(STCASettings(**RELEASE), seed=2, num_blocks=2).evaluation(
        [5, 0, 9], num_frames=8, views=2), phase)
    shared = PhaseSampler(STCASettings(**{**RELEASE, "per_block_phases": False}), seed=2, num_blocks=2)
    assert shared.evaluation([5], num_frames=8).shape == (1, 8)
    # the paper's evaluation: no draw, the encoder uses t mod K
    assert PhaseSampler(STCASettings(), seed=2, num_blocks=2).evaluation([5], num_frames=8) is None
    with pytest.raises(ValueError, match="views"):
        sampler.evaluation([5], num_frames=8, views=0)


def test_encoder_with_release_settings_needs_its_evaluation_phases():
    torch.manual_seed(0)
    clip, _ = load_clip("STDD-Tiny-ViT", None, allow_random_init=True)
    settings = STCASettings(**RELEASE, backend="reference")  # channel fold 32 on width 64: I = 2
    encoder = VideoEncoder(clip.visual, settings).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="eval_shuffle_phases"):
        encoder(video)
    sampler = PhaseSampler(settings, seed=0, num_blocks=len(encoder.blocks))
    with torch.no_grad():
        first = encoder(video, sampler.evaluation([0, 1], num_frames=4))
        assert torch.equal(first, encoder(video, sampler.evaluation([0, 1], num_frames=4)))
        assert not torch.equal(first, encoder(video, sampler.evaluation([2, 3], num_frames=4)))
        encoder.train()
        trained = encoder(video, sampler([0, 1], epoch=0, num_frames=4))
        assert trained.shape == first.shape


# ----------------------------------------------------------------------------- configs and evaluation


def test_official_preset_sets_the_release_settings_and_changes_nothing_else():
    pytest.importorskip("omegaconf")
    from omegaconf import OmegaConf

    from stdd.engine.config import ConfigError, load_config, stca_settings_of

    official, paper = load_config("k400_vitb16_official"), load_config("k400_vitb16")
    assert stca_settings_of(official) == STCASettings(**RELEASE)
    assert official.loss.distillation_weight == 2.0
    assert stca_settings_of(paper) == STCASettings()  # the paper preset keeps the deterministic defaults
    rest = [OmegaConf.to_container(cfg) for cfg in (official, paper)]
    for cfg in rest:
        del cfg["run"]["output_dir"], cfg["model"]["stca"]
    assert rest[0] == rest[1]
    with pytest.raises(ConfigError, match=r"model\.stca\.mask_rounding='ceil': expected one of nearest, floor"):
        load_config("k400_vitb16_official", ["model.stca.mask_rounding=ceil"])
    with pytest.raises(ConfigError, match=r"model\.stca\.per_block_phases"):
        load_config("k400_vitb16_official", ["model.stca.per_block_phases=sometimes"])


def test_shuffled_evaluation_is_seeded_and_independent_of_the_batch_size(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("omegaconf")
    from stdd.data import generate_synthetic_dataset, load_annotations
    from stdd.engine.config import load_config
    from stdd.engine.evaluation import score_dataset
    from stdd.engine.task import build_model, build_prompts, build_video_dataset, text_features_for

    names = ["moving left", "moving right", "growing"]
    generated = generate_synthetic_dataset(tmp_path / "videos", videos_per_class={"test": 1}, classes=names,
                                           num_frames=16, height=32, width=32, seed=1)
    records, _ = load_annotations(generated.annotation_files["test"], format="list", root=generated.root)
    release = [f"model.stca.{key}={str(value).lower() if isinstance(value, bool) else value}"
               for key, value in RELEASE.items() if key not in ("window", "scales")]
    scores = {}
    for label, extra in {"release": release, "paper": []}.items():
        cfg = load_config("demo", ["data.num_frames=4", "data.stride=3", "model.stca.backend=reference", *extra])
        model, text = build_model(cfg, "cpu", with_teacher=False)
        features = text_features_for(text, build_prompts("templates", names), cfg.text)
        dataset = build_video_dataset(cfg, None, training=False, n_temporal_views=2, records=records)
        for batch_size, seed in ((1, 0), (3, 0), (3, 1)):
            scores[label, batch_size, seed] = score_dataset(
                model, dataset, features.features, features.mask, batch_size=batch_size, seed=seed).view_scores
    torch.testing.assert_close(scores["release", 1, 0], scores["release", 3, 0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(scores["release", 3, 0], scores["release", 3, 1], atol=1e-4)  # the seed decides
    torch.testing.assert_close(scores["paper", 3, 0], scores["paper", 3, 1], atol=0, rtol=0)  # t mod K: no draw
