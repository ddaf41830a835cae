"""Video-class alignment scores (paper Eq. 8) and the mean-pooled ablation.

Frame features ``z_{n,t}`` ``(B, T, E)`` against prompt features ``c_{k,j}``
``(K, N_max, E)`` with a validity mask ``(K, N_max)`` (classes have different
prompt counts; padded prompts are masked, never repeated). With cosine
similarities scaled by CLIP's logit scale,
``s[n,k,t,j] = logit_scale * cos(z_{n,t}, c_{k,j})``::

    S_v2t[n,k] = mean_t  max_{valid j} s[n,k,t,j]      (frame-to-prompt)
    S_t2v[n,k] = mean_{valid j} max_t  s[n,k,t,j]      (prompt-to-frame)
    S[n,k]     = (S_v2t + S_t2v) / 2                   (Eq. 8; used for the loss and zero-shot)

The ablation ``mode="mean_pool"`` scores the mean-pooled video feature against each
class's mean prompt feature: ``logit_scale * cos(mean_t z, mean_j c_k)``.

Two more modes score as other methods do, each against the class weight
``w_k = normalise(mean_{valid j} normalise(c_{k,j}))`` (the prompts' unit
features averaged, then renormalised: one classifier row per class)::

    frame_logit_mean:  S[n,k] = mean_t  logit_scale * cos(z_{n,t}, w_k)      (Open-VCLIP, FROSTER)
    feature_mean:      S[n,k] = logit_scale * cos(mean_t z_{n,t}, w_k)       (ViFi-CLIP)

``frame_logit_mean`` averages the per-frame logits; ``feature_mean`` averages the
frames' raw (unnormalised) features and normalises the mean, which is not what
``mean_pool`` does (it averages the unit frame features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Eq. 8 (the default) | the mean-pooled ablation | mean of per-frame logits (Open-VCLIP, FROSTER) |
# logits of the mean raw frame feature (ViFi-CLIP)
SCORE_MODES = ("frame_prompt", "mean_pool", "frame_logit_mean", "feature_mean")


def _check_mask(text_mask: torch.Tensor, classes: int, prompts: int) -> torch.Tensor:
    if not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be a bool tensor (K, N_max), got {getattr(text_mask, 'dtype', text_mask)}")
    if tuple(text_mask.shape) != (classes, prompts):
        raise ValueError(f"text_mask must have shape (K, N_max) = ({classes}, {prompts}), got {tuple(text_mask.shape)}")
    return text_mask


def frame_prompt_scores(similarity: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 8 from a similarity tensor.

    ``similarity``: ``(B, K, T, N_max)``, already logit-scaled;
    ``text_mask``: ``(K, N_max)`` bool, True for real prompts (every class needs
    at least one). Returns ``S`` ``(B, K)``. Values at padded prompts are never read.
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must have shape (B, K, T, N_max), got {tuple(similarity.shape)}")
    _, classes, _, prompts = similarity.shape
    mask = _check_mask(text_mask, classes, prompts).to(similarity.device)
    valid = mask[None, :, None, :]  # (1, K, 1, N_max)
    # frame-to-prompt: best real prompt per frame, averaged over frames
    v2t = similarity.masked_fill(~valid, float("-inf")).amax(dim=3).mean(dim=2)  # (B, K)
    # prompt-to-frame: best frame per prompt, averaged over the real prompts only
    # (padded columns are zeroed first so that whatever they hold, even NaN, gets no gradient)
    best_frame = similarity.masked_fill(~valid, 0.0).amax(dim=2)  # (B, K, N_max), zero where padded
    counts = mask.sum(dim=1).to(similarity.dtype)  # (K,)
    t2v = best_frame.sum(dim=2) / counts
    return 0.5 * (v2t + t2v)


def alignment_scores(
    video_features: torch.Tensor,
    text_features: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale=1.0,
    *,
    mode: str = SCORE_MODES[0],
    validate: bool = True,
) -> torch.Tensor:
    """Class scores ``(B, K)`` for frame features ``(B, T, E)`` and prompt features ``(K, N_max, E)``.

    ``mode="frame_prompt"``: Eq. 8 (:func:`frame_prompt_scores`) on logit-scaled
    cosine similarities. ``mode="mean_pool"``: the mean-pooled video feature against each
    class's mean (real) prompt feature, logit-scaled cosine. ``"frame_logit_mean"`` and
    ``"feature_mean"``: see the module docstring. ``logit_scale`` is
    a float or a scalar tensor (CLIP's ``logit_scale.exp()``, 100 for the
    released models). ``validate=False`` skips the check that every class
    has a real prompt (it reads the mask back from the device); callers that
    checked this mask already pass it.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if video_features.dim() != 3:
        raise ValueError(f"video_features must have shape (B, T, E), got {tuple(video_features.shape)}")
    if text_features.dim() != 3:
        raise ValueError(f"text_features must have shape (K, N_max, E), got {tuple(text_features.shape)}")
    if video_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"video_features have E={video_features.shape[-1]} but text_features have E={text_features.shape[-1]}"
        )
    classes, prompts, _ = text_features.shape
    mask = _check_mask(text_mask, classes, prompts).to(text_features.device)
    if validate and not bool(mask.any(dim=1).all()):
        empty = torch.nonzero(~mask.any(dim=1)).flatten().tolist()
        raise ValueError(f"text_mask marks no prompt as valid for class indices {empty[:10]}")
    text_features = text_features.to(video_features.dtype)
    frames = F.normalize(video_features, dim=-1)
    prompts_unit = F.normalize(text_features, dim=-1)
    if mode == "frame_prompt":
        similarity = torch.einsum("bte,kne->bktn", frames, prompts_unit) * logit_scale
        return frame_prompt_scores(similarity, mask)
    weights = mask.to(prompts_unit.dtype).unsqueeze(-1)  # (K, N_max, 1)
    class_mean = F.normalize((prompts_unit * weights).sum(dim=1) / weights.sum(dim=1), dim=-1)  # (K, E)
    if mode == "frame_logit_mean":
        return (logit_scale * frames @ class_mean.t()).mean(dim=1)  # (B, T, K) -> (B, K)
    if mode == "feature_mean":
        video = F.normalize(video_features.mean(dim=1), dim=-1)  # the raw features' mean, then unit length
    else:  # mean-pooled ablation: the unit frame features' mean
        video = F.normalize(frames.mean(dim=1), dim=-1)  # (B, E)
    return logit_scale * video @ class_mean.t()
