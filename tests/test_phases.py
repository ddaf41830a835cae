"""Training phases: the one sampler (per clip, shared by the blocks or one draw per block) and the
seed derivation every run stream comes from."""

import pytest
import torch

pytest.importorskip("open_clip")

from stdd.model import STCASettings, VideoEncoder, load_clip  # noqa: E402
from stdd.model.phases import PhaseSampler  # noqa: E402
from stdd.seeding import derive_seed, seed_sequence, torch_generator  # noqa: E402


def test_derived_streams_are_reproducible_and_independent():
    assert derive_seed(0, "phases", 3, 7) == derive_seed(0, "phases", 3, 7)
    seeds = {derive_seed(seed, stream, *keys) for seed in (0, 1) for stream in ("phases", "loader", "process")
             for keys in ((), (0,), (1,), (0, 1), (1, 0))}
    assert len(seeds) == 2 * 3 * 5  # no two (seed, stream, keys) share a stream
    assert all(0 <= s < 2**63 for s in seeds)
    first = torch.rand(4, generator=torch_generator(5, "loader", 2))
    assert torch.equal(first, torch.rand(4, generator=torch_generator(5, "loader", 2)))
    assert seed_sequence(5, "loader", 2).spawn_key[1:] == (2,)
    with pytest.raises(ValueError, match="run seed"):
        derive_seed(-1, "phases")
    with pytest.raises(ValueError, match="keys"):
        derive_seed(0, "phases", -3)
    with pytest.raises(ValueError, match="stream"):
        derive_seed(0, "")


def test_one_draw_per_clip_follows_the_clip_not_the_batch():
    sampler = PhaseSampler(STCASettings(), seed=4, num_blocks=3)
    batch = sampler(torch.tensor([5, 9, 2]), epoch=1, num_frames=6)
    assert batch.shape == (3, 6) and batch.dtype == torch.int64
    # a clip's phases depend on (seed, epoch, clip index) only: not on its batch or position
    assert torch.equal(sampler([9], epoch=1, num_frames=6)[0], batch[1])
    assert torch.equal(sampler([2, 5], epoch=1, num_frames=6), batch[[2, 0]])
    assert not torch.equal(sampler([5, 9, 2], epoch=2, num_frames=6), batch)  # a new epoch, new draws
    assert not torch.equal(PhaseSampler(STCASettings(), seed=5, num_blocks=3)([5, 9, 2], epoch=1, num_frames=6),
                           batch)
    for row in sampler(range(40), epoch=0, num_frames=6):  # each clip: (t + i) mod K without shuffle
        assert torch.equal(row, (torch.arange(6) + row[0]) % 4)
    offsets = {int(row[0]) for row in sampler(range(40), epoch=0, num_frames=6)}
    assert offsets == {0, 1, 2, 3}


def test_shuffled_phases_are_permutations_of_the_cycle():
    sampler = PhaseSampler(STCASettings(shuffle_phases=True), seed=0, num_blocks=1)
    phase = sampler(range(30), epoch=0, num_frames=4)
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in phase)
    assert any(row.tolist() != [(row[0].item() + t) % 4 for t in range(4)] for row in phase)


def test_independent_draws_per_block_feed_the_encoder_block_by_block():
    sampler = PhaseSampler(STCASettings(channel_fold=8, per_block_phases=True), seed=1, num_blocks=2)
    phase = sampler([0, 1], epoch=0, num_frames=4)
    assert phase.shape == (2, 2, 4)
    assert not torch.equal(phase[0], phase[1])  # the blocks draw independently
    assert torch.equal(sampler([1], epoch=0, num_frames=4)[:, 0], phase[:, 1])  # still keyed by the clip
    torch.manual_seed(0)
    clip, _ = load_clip("STDD-Tiny-ViT", None, allow_random_init=True)
    encoder = VideoEncoder(clip.visual, STCASettings(channel_fold=8, backend="reference")).train()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out = encoder(video, phase)
        assert not torch.equal(out, encoder(video, phase[0]))  # block 1 used its own draw
        assert torch.equal(out, encoder(video, phase.clone()))


def test_sampler_state_restores_the_seed_and_refuses_other_settings():
    sampler = PhaseSampler(STCASettings(), seed=11, num_blocks=2)
    resumed = PhaseSampler(STCASettings(), seed=0, num_blocks=2)
    resumed.load_state_dict(sampler.state_dict())
    assert torch.equal(resumed([3, 4], epoch=2, num_frames=5), sampler([3, 4], epoch=2, num_frames=5))
    with pytest.raises(ValueError, match="shuffle_phases"):
        PhaseSampler(STCASettings(shuffle_phases=True), seed=0, num_blocks=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="per_block"):
        PhaseSampler(STCASettings(per_block_phases=True), seed=0, num_blocks=2).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="num_blocks"):
        PhaseSampler(STCASettings(), seed=0, num_blocks=0)
    with pytest.raises(ValueError, match="run seed"):
        PhaseSampler(STCASettings(), seed=-2, num_blocks=1)
