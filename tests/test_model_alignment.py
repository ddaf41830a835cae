"""Alignment scores (paper Eq. 8) on hand-made similarities, with padded prompts."""

import math

import pytest
import torch

pytest.importorskip("open_clip")

from stdd.model import alignment_scores, frame_prompt_scores

NAN = float("nan")


def _hand_made():
    # (B=2, K=2, T=2, N_max=3); class 1 has 2 real prompts, its column 2 is padding
    similarity = torch.tensor(
        [
            [[[1.0, 4.0, 2.0], [3.0, 0.0, 5.0]], [[2.0, -1.0, 100.0], [0.0, 6.0, 100.0]]],
            [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[-2.0, -3.0, NAN], [-4.0, -1.0, NAN]]],
        ]
    )
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # video 0, class 0: v2t = mean(4, 5) = 4.5; t2v = mean(3, 4, 5) = 4     -> 4.25
    # video 0, class 1: v2t = mean(2, 6) = 4;   t2v = mean(2, 6) = 4        -> 4
    # video 1, class 0: 0
    # video 1, class 1: v2t = mean(-2, -1) = -1.5; t2v = mean(-2, -1) = -1.5 -> -1.5
    expected = torch.tensor([[4.25, 4.0], [0.0, -1.5]])
    return similarity, mask, expected


def test_eq8_on_hand_made_similarities_ignores_padded_prompts():
    similarity, mask, expected = _hand_made()
    torch.testing.assert_close(frame_prompt_scores(similarity, mask), expected, atol=0, rtol=0)


def test_padded_prompts_get_no_gradient_and_do_not_poison_it():
    similarity, mask, _ = _hand_made()
    similarity.requires_grad_(True)
    frame_prompt_scores(similarity, mask).sum().backward()
    grad = similarity.grad
    assert torch.isfinite(grad).all()
    assert (grad[:, 1, :, 2] == 0).all()
    # video 0 class 1: v2t picks (t0, j0) and (t1, j1), each weight 1/2 * 1/T;
    # t2v picks (t0, j0) and (t1, j1), each weight 1/2 * 1/N_real
    torch.testing.assert_close(grad[0, 1], torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]))


def _loop_scores(video, text, mask, scale):
    """Eq. 8 read literally, with Python loops over videos, classes, frames and prompts."""
    B, T, _ = video.shape
    K, N, _ = text.shape
    out = torch.empty(B, K, dtype=torch.float64)
    for n in range(B):
        for k in range(K):
            real = [j for j in range(N) if mask[k, j]]
            cos = [[scale * torch.nn.functional.cosine_similarity(video[n, t], text[k, j], dim=0).item()
                    for j in real] for t in range(T)]
            v2t = sum(max(row) for row in cos) / T
            t2v = sum(max(cos[t][i] for t in range(T)) for i in range(len(real))) / len(real)
            out[n, k] = 0.5 * (v2t + t2v)
    return out


def test_alignment_scores_match_a_literal_reading_of_eq8():
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(3, 4, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(5, 6, 8, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True, True] + [False] * 4, [True] + [False] * 5,
                         [True] * 5 + [False], [True, True, True] + [False] * 3])
    text[~mask] = 1e3  # garbage in the padding must not matter
    got = alignment_scores(video, text, mask, logit_scale=100.0)
    torch.testing.assert_close(got, _loop_scores(video, text, mask, 100.0), atol=1e-9, rtol=1e-9)


def test_mean_pooled_ablation_by_hand():
    video = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean direction (1, 1)/sqrt2
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -5.0]],  # class 0: mean (1, 1) -> cos 1
                         [[1.0, 0.0], [0.0, -3.0], [9.0, 9.0]]])  # class 1: (1, 0), (0, -1); pad ignored
    mask = torch.tensor([[True, True, False], [True, True, False]])
    got = alignment_scores(video, text, mask, logit_scale=10.0, mode="mean_pool")
    torch.testing.assert_close(got, torch.tensor([[10.0, 0.0]]), atol=1e-6, rtol=0)


def test_alignment_argument_errors():
    video, text = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match="no prompt as valid"):
        alignment_scores(video, text, torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="text_mask must have shape"):
        alignment_scores(video, text, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        alignment_scores(video, text, torch.ones(2, 2))
    with pytest.raises(ValueError, match="mode"):
        alignment_scores(video, text, torch.ones(2, 2, dtype=torch.bool), mode="max")
    with pytest.raises(ValueError, match="E=4"):
        alignment_scores(video, torch.randn(2, 2, 5), torch.ones(2, 2, dtype=torch.bool))
    assert not math.isnan(alignment_scores(video, text, torch.ones(2, 2, dtype=torch.bool)).sum().item())


def test_stdd_model_checks_each_mask_once_but_every_new_mask():
    from stdd.model import STCASettings, build_stdd

    torch.manual_seed(0)
    model, _ = build_stdd("STDD-Tiny-ViT", None, allow_random_init=True, stca=STCASettings(channel_fold=8),
                          distill_weight=0.0)
    frames, text = torch.randn(1, 2, 32), torch.randn(2, 2, 32)
    mask = torch.ones(2, 2, dtype=torch.bool)
    model.scores(frames, text, mask)
    model.scores(frames, text, mask)  # checked already: fine
    mask[1] = False  # edited in place: the version changes, so it is checked again
    with pytest.raises(ValueError, match="no prompt as valid"):
        model.scores(frames, text, mask)
    with pytest.raises(ValueError, match="no prompt as valid"):
        model.scores(frames, text, torch.tensor([[True, True], [False, False]]))
