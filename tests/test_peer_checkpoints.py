"""Checkpoints of Open-VCLIP, FROSTER and ViFi-CLIP, written here in each method's key layout from a
random-init CLIP, read through stdd.eval / stdd.predict and scored by each method's recipe or stdd's."""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("omegaconf")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd.data import generate_synthetic_dataset
from stdd.engine.checkpoint import CheckpointError
from stdd.engine.checkpoint_formats import read_checkpoint
from stdd.engine.config import PROTOCOL_KEYS, ConfigError, load_config
from stdd.engine.inference import config_for_weights, load_model_for_inference
from stdd.model import load_clip

REPO = Path(__file__).resolve().parents[1]
TINY = "STDD-Tiny-ViT"
CLASSES = ["moving left", "moving right", "growing"]
# The recipes' architecture (ViT-B/16 + OpenAI weights) replaced by the tiny random-init CLIP, built under
# run.seed 0 like the checkpoints' "original CLIP" below; 32-pixel frames; no text-feature cache in $HOME.
SMALL = [f"model.clip_name={TINY}", "model.pretrained=null", "model.allow_random_init=true", "data.input_size=32",
         "data.short_side=32", "text.cache_dir=null", "data.num_workers=0"]
TEXT_KEYS = ("transformer.", "positional_embedding", "ln_final.", "text_projection")


def original_clip():
    """The CLIP stdd builds for these configs (open_clip's random init under torch.manual_seed(run.seed=0))."""
    torch.manual_seed(0)
    clip, _ = load_clip(TINY, None, allow_random_init=True)
    return {key: value.detach().clone() for key, value in clip.state_dict().items()}


def fine_tuned(state, seed=1):
    """A 'trained' CLIP: every weight moved a little, the logit scale too."""
    generator = torch.Generator().manual_seed(seed)
    return {key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
            for key, value in state.items()}


def write_open_vclip(path, state, **extra):
    """Open-VCLIP's layout: {'model_state': {'model.<OpenAI CLIP key>': ...}} (+ its training checkpoints' entries)."""
    payload = {"model_state": {f"model.{key}": value for key, value in state.items()}, "epoch": 22,
               "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "cfg": "TRAIN:\n  ENABLE: True\n"}
    payload["model_state"].update(extra)
    torch.save(payload, path)
    return path


def write_froster(path, state):
    """FROSTER's: Open-VCLIP's plus the distillation heads projector_v / projector_t."""
    width = state["text_projection"].shape[1]
    heads = {f"projector_{side}.{layer}.weight": torch.randn(width, width) for side in "vt" for layer in (0, 2)}
    return write_open_vclip(path, state, **heads)


def write_vifi(path, state, *, drop=()):
    """ViFi-CLIP's: {'model': {'module.image_encoder.*', 'module.text_encoder.*', 'module.logit_scale',
    'module.prompt_learner.complete_text_embeddings'}, 'config': a yacs CfgNode, ...}; no token embedding."""
    model = {}
    for key, value in state.items():
        if key.startswith("visual."):
            model["module.image_encoder." + key[len("visual."):]] = value
        elif key.startswith(TEXT_KEYS):
            model["module.text_encoder." + key] = value
    model["module.logit_scale"] = state["logit_scale"]
    model["module.prompt_learner.complete_text_embeddings"] = torch.randn(3, 77, state["text_projection"].shape[0])
    for key in drop:
        del model[key]
    yacs = types.ModuleType("yacs")
    config_module = types.ModuleType("yacs.config")

    class CfgNode(dict):  # pickled by this name, as ViFi-CLIP's config is; the reader never imports it
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config_module.CfgNode = CfgNode
    saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": yacs, "yacs.config": config_module})
    try:
        torch.save({"model": model, "config": CfgNode(DATA=CfgNode(NUM_FRAMES=32)), "epoch": 9, "max_accuracy": 0.5,
                    "optimizer": {"state": {}, "param_groups": []}}, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    clip = original_clip()
    trained = fine_tuned(clip)
    return {"clip": clip, "trained": trained,
            "open_vclip": write_open_vclip(root / "swa_2_22.pth", trained),
            "froster": write_froster(root / "froster.pth", trained),
            "vifi_clip": write_vifi(root / "vifi.pth", trained), "root": root}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return generate_synthetic_dataset(root, videos_per_class={"test": 1}, classes=CLASSES, num_frames=16, height=32,
                                      width=32, seed=3)


def descriptions_file(path, names):
    """A class-description file as FROSTER ships them ({index: "Name: description"})."""
    path.write_text(json.dumps({str(i): f"{name.title()}: a video of something {name}" for i, name in enumerate(names)}))
    return path


# ----------------------------------------------------------------------------- formats and their keys


def test_each_layout_is_found_from_its_keys_and_unknown_ones_are_refused(weights, tmp_path):
    for name in ("open_vclip", "froster", "vifi_clip"):
        found, checkpoint = read_checkpoint(weights[name])
        assert found == name and checkpoint.format == name
        assert set(checkpoint.state) == set(weights["trained"]) - ({"token_embedding.weight"}
                                                                    if name == "vifi_clip" else set())
    assert sorted(read_checkpoint(weights["froster"])[1].unused) == [
        "projector_t.0.weight", "projector_t.2.weight", "projector_v.0.weight", "projector_v.2.weight"]
    assert read_checkpoint(weights["vifi_clip"])[1].unused == ["module.prompt_learner.complete_text_embeddings"]
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.conv.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match=r"other.pth: not a checkpoint format stdd reads .*'state_dict'"):
        read_checkpoint(other)
    with pytest.raises(CheckpointError, match="not a ViFi-CLIP checkpoint: expected a 'model' entry"):
        read_checkpoint(weights["open_vclip"], "vifi_clip")


def test_a_real_architectures_whole_key_layout_is_mapped(tmp_path):
    """ViT-B/16's every key (both towers, as OpenAI's saved CLIP names them, with its three numbers that are
    not weights) comes out under open_clip's name, in each format; only the ViFi-CLIP token embedding is
    not in its file."""
    with torch.device("meta"):  # the architecture without its weights
        model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-16"))
    keys = list(model.state_dict())
    assert len(keys) > 300 and "visual.transformer.resblocks.11.attn.in_proj_weight" in keys
    empty = {key: torch.empty(0) for key in keys}  # the layout, without ViT-B/16's 150M numbers
    for name, writer in (("open_vclip", write_open_vclip), ("froster", write_froster), ("vifi_clip", write_vifi)):
        state = dict(empty, text_projection=torch.empty(0, 0))
        if name == "open_vclip":
            writer(tmp_path / name, state, **{f"model.{n}": torch.tensor(1) for n in ("input_resolution", "vocab_size")})
        else:
            writer(tmp_path / name, state)
        _, checkpoint = read_checkpoint(tmp_path / name)
        expected = set(keys) - ({"token_embedding.weight"} if name == "vifi_clip" else set())
        assert set(checkpoint.state) == expected, name
        for key in keys:  # and a missing one would be named as the file names it
            assert checkpoint.file_key(key).endswith(key.split("visual.", 1)[-1])
    assert set(read_checkpoint(tmp_path / "open_vclip")[1].unused) == {"model.input_resolution", "model.vocab_size"}


def _load(path, overrides=(), **options):
    cfg, state = config_for_weights(str(path), None, [*SMALL, *overrides], **options)
    model, text, report = load_model_for_inference(cfg, state, "cpu")
    return cfg, model, text, report


def test_open_vclip_interpolates_every_weight_with_clip_and_keeps_clips_text_tower(weights):
    cfg, model, text, report = _load(weights["open_vclip"])
    clip, trained = weights["clip"], weights["trained"]
    assert cfg.model.temporal == "expand_view" and model.video_encoder.temporal == "expand_view"
    assert report.interpolation == 0.5 and report.text_tower == "clip"
    visual = model.video_encoder.visual.state_dict()
    for key, value in visual.items():  # w = 0.5 * w_clip + 0.5 * w_checkpoint, every image-tower weight
        assert torch.allclose(value, 0.5 * clip["visual." + key] + 0.5 * trained["visual." + key], atol=1e-6), key
    mixed_log_scale = 0.5 * float(clip["logit_scale"]) + 0.5 * float(trained["logit_scale"])
    assert float(model.logit_scale) == pytest.approx(math.exp(mixed_log_scale), rel=1e-5)
    for key, value in text.clip.state_dict().items():  # the classifier's tower: the original CLIP's
        if key in clip and value.is_floating_point():
            assert torch.equal(value, clip[key]), key
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in report.unused  # its text tower: not read
    _, plain, _, _ = _load(weights["open_vclip"], ["model.weight_interpolation=0"])
    for key, value in plain.video_encoder.visual.state_dict().items():
        assert torch.equal(value, trained["visual." + key]), key
    _, large, _, _ = _load(weights["open_vclip"], ["model.weight_interpolation=0.6"])  # its L/14 share: r on CLIP
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    assert torch.allclose(large.video_encoder.visual.state_dict()[key],
                          0.6 * clip["visual." + key] + 0.4 * trained["visual." + key], atol=1e-6)
    mixed_log_scale = 0.6 * float(clip["logit_scale"]) + 0.4 * float(trained["logit_scale"])
    assert float(large.logit_scale) == pytest.approx(math.exp(mixed_log_scale), rel=1e-5)


def test_froster_and_vifi_clip_read_their_own_text_towers(weights):
    trained, clip = weights["trained"], weights["clip"]
    _, model, text, report = _load(weights["froster"])
    assert report.interpolation == 0.0 and report.text_tower == "checkpoint"
    for key, value in text.clip.state_dict().items():
        if key in trained and key != "logit_scale" and value.is_floating_point():
            assert torch.equal(value, trained[key]), key
    assert float(model.logit_scale) == pytest.approx(math.exp(float(trained["logit_scale"])), rel=1e-5)
    assert text.source.weights_id.startswith("froster:sha256:")  # the feature cache knows these are not CLIP's

    cfg, model, text, report = _load(weights["vifi_clip"])
    assert cfg.model.temporal == "none" and cfg.data.normalization == "imagenet" and cfg.loss.score == "feature_mean"
    assert report.filled_from_clip == ["token_embedding.weight"]
    text_state = text.clip.state_dict()
    assert torch.equal(text_state["token_embedding.weight"], clip["token_embedding.weight"])
    assert torch.equal(text_state["ln_final.weight"], trained["ln_final.weight"])
    for key, value in model.video_encoder.visual.state_dict().items():
        assert torch.equal(value, trained["visual." + key]), key


def test_a_weight_the_recipe_needs_is_named_when_missing(weights, tmp_path):
    state = dict(weights["trained"])
    del state["visual.proj"]
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\) of the image tower: model\.visual\.proj"):
        _load(write_open_vclip(tmp_path / "no_proj.pth", state))
    gap = write_vifi(tmp_path / "no_ln.pth", weights["trained"], drop=("module.text_encoder.ln_final.weight",))
    with pytest.raises(CheckpointError,
                       match=r"text tower \(text.tower=checkpoint\): module\.text_encoder\.ln_final\.weight"):
        _load(gap)
    _load(gap, ["text.tower=clip"])  # with CLIP's text tower the file has all the recipe needs
    with pytest.raises(CheckpointError, match="model.clip_name=STDD-Tiny-ViT-64 has"):
        _load(weights["open_vclip"], [f"model.clip_name={TINY}-64", "data.input_size=64", "data.short_side=64"])


# ----------------------------------------------------------------------------- recipes


def test_recipe_stdd_takes_stdds_protocol_and_keeps_the_model(weights):
    own, _ = config_for_weights(str(weights["open_vclip"]), None, SMALL)
    stdd, _ = config_for_weights(str(weights["open_vclip"]), None, SMALL, recipe="stdd")
    paper = load_config("k400_vitb16", SMALL)
    for key in PROTOCOL_KEYS:
        assert stdd_value(stdd, key) == stdd_value(paper, key), key
    assert (stdd.loss.score, stdd.eval.aggregation, stdd.text.prompts) == ("frame_prompt", "mean_softmax", "askg")
    assert (own.loss.score, own.eval.aggregation, own.data.short_side) == ("frame_logit_mean", "mean_score", 32)
    for key in ("model.temporal", "model.weight_interpolation", "text.tower", "model.clip_name"):
        assert stdd_value(stdd, key) == stdd_value(own, key), key
    vifi, _ = config_for_weights(str(weights["froster"]), None, SMALL, recipe="vifi_clip")
    assert (vifi.data.normalization, vifi.text.tower, vifi.model.temporal) == ("imagenet", "checkpoint", "expand_view")


def stdd_value(cfg, key):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    return list(value) if OmegaConf.is_list(value) else value


def test_each_recipes_prompts():
    from stdd.engine.task import build_prompts

    names = ["ApplyEyeMakeup", "YoYo"]
    open_vclip = build_prompts("templates", names, dataset="ucf101", templates="open_vclip")
    assert len(open_vclip["YoYo"]) == 28 and open_vclip["ApplyEyeMakeup"][:2] == [
        "a photo of apply eye makeup.", "a photo of a person apply eye makeup."]
    assert open_vclip["YoYo"][-1] == "a demonstration of a person practicing yo yo."
    vifi = build_prompts("templates", names, dataset="ucf101", templates="vifi_clip", class_name_form="listed")
    assert vifi == {"ApplyEyeMakeup": ["a photo of a ApplyEyeMakeup."], "YoYo": ["a photo of a YoYo."]}
    assert build_prompts("templates", ["brush_hair"], dataset="hmdb51", templates="vifi_clip",
                         class_name_form="listed") == {"brush_hair": ["a photo of a brush hair."]}
    with pytest.raises(ConfigError, match="text.prompts=class_descriptions: .*--prompts FILE"):
        build_prompts("class_descriptions", names, dataset="ucf101", templates="open_vclip")


def test_froster_class_descriptions_make_29_prompts_matched_by_name(tmp_path):
    from stdd.engine.task import build_prompts

    path = tmp_path / "ucf101_rephrased_classes.json"
    path.write_text(json.dumps({"0": "Apply Eye Makeup: This video shows eye makeup", "1": "Yo Yo: Spinning a yo-yo"}))
    prompts = build_prompts(str(path), ["YoYo", "ApplyEyeMakeup"], dataset="ucf101", templates="open_vclip")
    assert list(prompts) == ["YoYo", "ApplyEyeMakeup"] and len(prompts["YoYo"]) == 29
    assert prompts["ApplyEyeMakeup"][0] == "a photo of Apply Eye Makeup. Apply Eye Makeup: This video shows eye makeup"
    assert prompts["ApplyEyeMakeup"][-1] == "Apply Eye Makeup: This video shows eye makeup"
    renamed = tmp_path / "renamed.json"  # a rephrased name: paired by position when the counts agree
    renamed.write_text(json.dumps({"0": "Barbecuing: grilling food", "1": "Yo Yo: Spinning a yo-yo"}))
    assert build_prompts(str(renamed), ["barbeque", "yo yo"], templates="open_vclip")["barbeque"][-1] == \
        "Barbecuing: grilling food"
    unmatched = r"named like 2 of 3 classes, e.g. \['barbeque', 'juggling'\] \(and list 2 classes, not 3\)"
    with pytest.raises(ConfigError, match=unmatched):
        build_prompts(str(renamed), ["barbeque", "yo yo", "juggling"], templates="open_vclip")


def test_per_frame_logit_mean_and_mean_feature_scores_are_not_the_same_thing():
    """Open-VCLIP / FROSTER average per-frame logits; ViFi-CLIP scores the normalised mean of the raw frame
    features. Frames of different norms pointing different ways tell the two apart."""
    from stdd.model.alignment import alignment_scores

    frames = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)  # (1 video, 2 frames, E=2)
    prompts = torch.tensor([[[1.0, 0.0], [1.0, 0.2]], [[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    classes = torch.nn.functional.normalize(torch.nn.functional.normalize(prompts, dim=-1).mean(1), dim=-1)
    unit = torch.nn.functional.normalize(frames, dim=-1)
    logit_mean = alignment_scores(frames, prompts, mask, 100.0, mode="frame_logit_mean")
    feature_mean = alignment_scores(frames, prompts, mask, 100.0, mode="feature_mean")
    assert torch.allclose(logit_mean, (100.0 * unit @ classes.T).mean(1))
    assert torch.allclose(feature_mean, 100.0 * torch.nn.functional.normalize(frames.mean(1), dim=-1) @ classes.T)
    assert (logit_mean - feature_mean).abs().max() > 10  # swapping them changes the scores


def test_imagenet_normalisation_reaches_the_frames(tmp_path):
    """The ViFi-CLIP recipe's clips are (pixel / 255 - ImageNet mean) / ImageNet std, not CLIP's statistics."""
    from coded_video import write_video
    from stdd.data import VideoRecord
    from stdd.engine.task import build_video_dataset

    colour = np.array([200, 60, 120], dtype=np.uint8)
    path = tmp_path / "flat.mp4"
    write_video(path, np.broadcast_to(colour, (12, 32, 32, 3)).copy(), pix_fmt="yuv444p", encoder="libx264",
                options={"qp": "0"})
    expected = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
    for recipe, name in (("vifi_clip", "imagenet"), ("open_vclip", "clip")):
        cfg = load_config(recipe, [*SMALL, "data.num_frames=2", "eval.n_temporal_views=1"])
        dataset = build_video_dataset(cfg, None, training=False, records=[VideoRecord(path, -1)])
        pixels = dataset[0]["video"][0, 0, :, 16, 16].double()  # view 0, frame 0, the centre pixel
        mean, std = (torch.tensor(v, dtype=torch.float64) for v in expected[name])
        assert torch.allclose(pixels, (torch.tensor(colour / 255.0) - mean) / std, atol=0.03), (recipe, pixels)
        other = expected["clip" if name == "imagenet" else "imagenet"]
        assert not torch.allclose(pixels, (torch.tensor(colour / 255.0) - torch.tensor(other[0])) /
                                  torch.tensor(other[1]), atol=0.03)


# ----------------------------------------------------------------------------- through the command lines


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(module, *arguments):
    return subprocess.run([sys.executable, "-m", module, *map(str, arguments)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)


def test_eval_cli_scores_a_froster_checkpoint_by_its_recipe_and_under_stdds(weights, videos, tmp_path):
    descriptions = descriptions_file(tmp_path / "rephrased.json", CLASSES)
    common = ["--annotations", videos.annotation_files["test"], "--root", videos.root, "--classes", videos.classes_file,
              "--quiet", *SMALL, "data.num_frames=4", "eval.n_temporal_views=2"]
    missing = _run("stdd.eval", "--checkpoint", weights["froster"], "--out-dir", tmp_path / "none", *common)
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert missing.stderr.strip().splitlines()[-1].startswith("error: text.prompts=class_descriptions:")
    assert "Traceback" not in missing.stderr and not (tmp_path / "none" / "results.json").exists()
    own = _run("stdd.eval", "--checkpoint", weights["froster"], "--prompts", descriptions, "--out-dir",
               tmp_path / "own", *common)
    assert own.returncode == 0, own.stderr[-3000:]
    report = json.loads((tmp_path / "own" / "results.json").read_text())
    assert report["checkpoint_weights"]["format"] == "froster" and report["temporal"] == "expand_view"
    assert report["recipe"] == "own" and report["aggregation"] == "mean_score" and report["videos"] == 3
    assert report["checkpoint_weights"]["text_tower"] == "checkpoint"
    assert "projector_v.0.weight" in report["checkpoint_weights"]["unused_keys"]
    stdd = _run("stdd.eval", "--checkpoint", weights["froster"], "--recipe", "stdd", "--prompts",
                videos.prompts_file, "--out-dir", tmp_path / "stdd", *common)
    assert stdd.returncode == 0, stdd.stderr[-3000:]
    report = json.loads((tmp_path / "stdd" / "results.json").read_text())
    assert report["recipe"] == "stdd" and report["aggregation"] == "mean_softmax"
    assert report["temporal"] == "expand_view" and report["views"] == "2 temporal x 1 spatial"


def test_predict_cli_reads_a_vifi_clip_checkpoint(weights, videos):
    clip = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[0]
    result = _run("stdd.predict", clip, "--classes", ",".join(CLASSES), "--checkpoint", weights["vifi_clip"],
                  "--json", "--top-k", "3", *SMALL, "data.num_frames=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ViFi-CLIP format" in result.stderr and "from CLIP: token_embedding.weight" in result.stderr
    predictions = json.loads(result.stdout)[0]["predictions"]
    assert sorted(p["class"] for p in predictions) == sorted(CLASSES)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_an_open_vclip_style_model_trains_and_its_weights_file_loads(tmp_path):
    """stdd.train with the widened-time attention and Open-VCLIP's score: the weights move, and the run's
    weights file (stdd's format) rebuilds the same kind of model for evaluation."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "stdd.train", "--config", "demo", f"data.root={tmp_path / 'data'}",
         "data.synthetic.videos_per_class=2", "data.synthetic.val_videos_per_class=1", "data.synthetic.size=32",
         "data.synthetic.num_frames=12", "data.synthetic.classes=[moving left,moving right]", "data.num_frames=4",
         "data.stride=3", "data.batch_size=2", "optim.epochs=1", "optim.warmup_epochs=0", "run.tensorboard=false",
         f"run.output_dir={run}", "model.temporal=expand_view", "loss.score=frame_logit_mean",
         "eval.every_epochs=0"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg, state = config_for_weights(str(run / "final.pt"), None, ["text.cache_dir=null"])
    assert cfg.model.temporal == "expand_view" and cfg.loss.score == "frame_logit_mean"
    model, _, report = load_model_for_inference(cfg, state, "cpu")
    assert report.format == "stdd" and model.video_encoder.temporal == "expand_view"
    name = "video_encoder.visual.transformer.resblocks.0.attn.in_proj_weight"  # open_clip's name: no wrapper
    fresh, _, _ = load_model_for_inference(cfg, None, "cpu")
    assert not torch.equal(model.state_dict()[name], fresh.state_dict()[name])  # trained
