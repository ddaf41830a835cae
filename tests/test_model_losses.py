"""Eq. 9 cross-entropy and the FROSTER-style distillation: the gradient reaches the
student (and its projector), never the frozen teacher."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from stdd.model import (
    ResidualProjector,
    STCASettings,
    build_stdd,
    classification_loss,
    feature_distillation_loss,
    template_prompts,
)

TINY = "STDD-Tiny-ViT"


def test_cross_entropy_matches_eq9_by_hand():
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    log_softmax = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    expected = -(log_softmax[0, 0] + log_softmax[1, 2]) / 2
    torch.testing.assert_close(classification_loss(scores, labels), expected)
    with pytest.raises(ValueError, match="labels"):
        classification_loss(scores, torch.tensor([0.0, 1.0]))


def test_residual_projector_starts_as_identity_and_learns():
    projector = ResidualProjector(16)
    features = torch.randn(2, 3, 16)
    torch.testing.assert_close(projector(features), features, atol=0, rtol=0)
    teacher = torch.randn(2, 3, 16)
    loss = feature_distillation_loss(features, teacher, projector)
    expected = (1 - F.cosine_similarity(F.normalize(features, dim=-1), teacher, dim=-1)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert projector.mlp[2].weight.grad.abs().sum() > 0  # the zero-initialised layer gets a gradient


def _model_and_classes(stca=STCASettings(channel_fold=8), **options):
    torch.manual_seed(0)
    model, text = build_stdd(TINY, None, allow_random_init=True, stca=stca, **options)
    classes = text.class_features(template_prompts(["archery", "juggling", "surfing"], ["a video of {}."]))
    return model, classes


def test_distillation_gradient_reaches_student_not_teacher():
    model, classes = _model_and_classes()
    model.train()
    assert not model.teacher.training  # the teacher stays in eval mode
    assert all(not p.requires_grad for p in model.teacher.parameters())
    video = torch.randn(2, 4, 3, 32, 32)
    out = model(video, classes.features, classes.mask, labels=torch.tensor([1, 2]))
    assert out.distill_loss is not None and out.distill_loss.item() > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 2.0 * out.distill_loss)

    model.zero_grad()
    out.distill_loss.backward()  # the distillation term alone
    student = dict(model.video_encoder.named_parameters())
    for name in ("visual.conv1.weight", "visual.proj", "visual.transformer.resblocks.0.block.attn.in_proj_weight",
                 "visual.transformer.resblocks.1.block.mlp.c_fc.weight"):
        assert student[name].grad is not None and student[name].grad.abs().sum() > 0, name
    assert model.projector.mlp[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not model.teacher(video).requires_grad


def test_teacher_is_the_original_clip_encoder():
    model, _ = _model_and_classes()
    video = torch.randn(1, 2, 3, 32, 32)
    # with STCA switched off the student equals the teacher at initialisation
    off, _ = _model_and_classes(STCASettings(channel_fold=8, mask_ratio=0.0, mixing="none"))
    off.eval()
    with torch.no_grad():
        torch.testing.assert_close(off.encode_video(video), off.teacher(video), atol=1e-5, rtol=0)
        assert (model.encode_video(video) - model.teacher(video)).abs().max() > 1e-4  # STCA on: differs


def test_no_distillation_in_eval_or_without_teacher():
    model, classes = _model_and_classes()
    video = torch.randn(1, 2, 3, 32, 32)
    model.eval()
    out = model(video, classes.features, classes.mask, labels=torch.tensor([0]))
    assert out.distill_loss is None and torch.equal(out.loss, out.ce_loss)
    plain, _ = _model_and_classes(distill_weight=0.0)
    assert plain.teacher is None and plain.projector is None
    plain.train()
    out = plain(video, classes.features, classes.mask, labels=torch.tensor([0]))
    assert out.distill_loss is None
