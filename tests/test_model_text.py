"""Text side: prompt sources, frozen text features with a validity mask, and the
on-disk feature cache (reuse, invalidation on prompt/model/weights change)."""

import json
import os

import pytest
import torch

pytest.importorskip("open_clip")

from stdd.knowledge import load_prompts
from stdd.model import TextEncoder, load_clip, template_prompts

TINY = "STDD-Tiny-ViT"


def _encoder(seed=0, name=TINY):
    torch.manual_seed(seed)
    clip, source = load_clip(name, None, allow_random_init=True)
    return TextEncoder(clip, source)


def test_template_prompts():
    prompts = template_prompts(["archery", "juggling balls"], ["a video of {}.", "{}"])
    assert prompts == {"archery": ["a video of archery.", "archery"],
                       "juggling balls": ["a video of juggling balls.", "juggling balls"]}
    with pytest.raises(ValueError, match="placeholder"):
        template_prompts(["archery"], ["no placeholder"])
    with pytest.raises(ValueError, match="duplicate"):
        template_prompts(["archery", "archery"])


def test_prompt_file_order_and_errors(tmp_path):
    path = tmp_path / "askg.json"
    path.write_text(json.dumps({"b": ["b one."], "a": ["a one.", "a two."], "c": ["c."]}), encoding="utf-8")
    assert list(load_prompts(path)) == ["b", "a", "c"]
    assert load_prompts(path, ["a", "b"]) == {"a": ["a one.", "a two."], "b": ["b one."]}
    with pytest.raises(ValueError, match=r"askg.json has no prompts for 1 of 2 classes"):
        load_prompts(path, ["a", "zzz"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": []}), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: class 'a' must map to a non-empty list"):
        load_prompts(bad)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.json")


def test_features_match_encode_text_with_mask_not_repeats():
    torch.manual_seed(0)
    clip, source = load_clip(TINY, None, allow_random_init=True)
    import copy
    reference = copy.deepcopy(clip).eval()
    encoder = TextEncoder(clip, source, batch_size=2)  # several batches
    prompts = {"archery": ["a video of archery.", "a bow and a target."], "surfing": ["a video of surfing."],
               "juggling": ["one.", "two.", "three."]}
    result = encoder.class_features(prompts)
    assert result.features.shape == (3, 3, 32)
    assert result.mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert result.class_names == ("archery", "surfing", "juggling")
    assert (result.features[~result.mask] == 0).all()
    tokens = encoder.tokenizer(prompts["juggling"])
    with torch.no_grad():
        expected = reference.encode_text(tokens, normalize=True)
    torch.testing.assert_close(result.features[2], expected, atol=1e-6, rtol=1e-5)
    assert encoder.clip.visual is None
    assert all(not p.requires_grad for p in encoder.parameters())


def test_cache_reused_and_invalidated(tmp_path):
    cache = tmp_path / "text_cache"
    encoder = _encoder(seed=0)
    prompts = template_prompts(["archery", "surfing"], ["a video of {}.", "{}"])

    first = encoder.class_features(prompts, cache_dir=cache)
    assert not first.cache_hit and os.path.isfile(first.cache_path)
    second = encoder.class_features(prompts, cache_dir=cache)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert torch.equal(second.features, first.features) and torch.equal(second.mask, first.mask)
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first.cache_path)]  # no temp files left

    # reuse really reads the file: plant known values under the same key
    stored = torch.load(first.cache_path, weights_only=True)
    stored["features"] = torch.full_like(stored["features"], 0.25)
    torch.save(stored, first.cache_path)
    assert (encoder.class_features(prompts, cache_dir=cache).features == 0.25).all()

    # prompt change -> new key, recomputed
    changed = dict(prompts, surfing=["a video of surfing.", "surfing waves."])
    third = encoder.class_features(changed, cache_dir=cache)
    assert not third.cache_hit and third.cache_path != first.cache_path
    # other weights (another random init) -> recomputed
    other_weights = _encoder(seed=1).class_features(prompts, cache_dir=cache)
    assert not other_weights.cache_hit and other_weights.cache_path != first.cache_path
    # other model -> recomputed
    other_model = _encoder(seed=0, name="STDD-Tiny-ViT-64").class_features(prompts, cache_dir=cache)
    assert not other_model.cache_hit and other_model.features.shape[-1] == 64
    # a corrupt file is recomputed and rewritten
    with open(first.cache_path, "wb") as handle:
        handle.write(b"truncated")
    recomputed = encoder.class_features(prompts, cache_dir=cache)
    assert not recomputed.cache_hit
    torch.testing.assert_close(recomputed.features, first.features)
    assert encoder.class_features(prompts, cache_dir=cache).cache_hit


def test_a_cache_file_with_a_changed_byte_is_recomputed_not_used(tmp_path, caplog):
    from torch_files import flip_byte_in_largest_tensor

    cache = tmp_path / "text_cache"
    encoder = _encoder(seed=0)
    prompts = template_prompts(["archery", "surfing"], ["a video of {}.", "{}"])
    first = encoder.class_features(prompts, cache_dir=cache)
    flip_byte_in_largest_tensor(first.cache_path)  # a disk error inside the stored features
    with caplog.at_level("WARNING"):
        again = encoder.class_features(prompts, cache_dir=cache)
    assert not again.cache_hit and "CRC-32" in caplog.text and str(first.cache_path) in caplog.text
    assert torch.equal(again.features, first.features)
    assert encoder.class_features(prompts, cache_dir=cache).cache_hit  # rewritten whole


def test_checkpoint_weights_key_the_cache(tmp_path):
    torch.manual_seed(0)
    clip, _ = load_clip(TINY, None, allow_random_init=True)
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    encoder = TextEncoder.from_pretrained(TINY, str(path))
    assert encoder.source.weights_id.startswith("sha256:")
    prompts = {"archery": ["archery."]}
    assert not encoder.class_features(prompts, cache_dir=tmp_path / "c").cache_hit
    assert TextEncoder.from_pretrained(TINY, str(path)).class_features(prompts, cache_dir=tmp_path / "c").cache_hit


def test_orthogonal_class_features_are_a_fixed_orthonormal_set_per_class_list():
    from stdd.model import orthogonal_class_features

    prompts = {"moving left": ["a", "b"], "moving right": ["c"], "growing": ["d", "e", "f"]}
    features = orthogonal_class_features(prompts, 8)
    assert features.features.shape == (3, 1, 8) and features.mask.all() and features.cache_path is None
    assert features.class_names == tuple(prompts) and features.prompts == (("a", "b"), ("c",), ("d", "e", "f"))
    flat = features.features[:, 0].double()
    assert torch.allclose(flat @ flat.T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    # a function of the class list only: the same in any process, whatever the prompts or the global seed
    torch.manual_seed(123)
    again = orthogonal_class_features({name: ["other"] for name in prompts}, 8)
    assert torch.equal(again.features, features.features)
    # the first class's vector is its own draw, normalised (the later ones are orthogonalised against it)
    expected = torch.randn(8, generator=torch.Generator().manual_seed(int.from_bytes(
        __import__("hashlib").sha256(b"moving left").digest()[:8], "little")), dtype=torch.float64)
    assert torch.allclose(flat[0], expected / expected.norm(), atol=1e-6)
    assert not torch.allclose(orthogonal_class_features({"growing": ["x"]}, 8).features[0], features.features[0])
    with pytest.raises(ValueError, match="3 classes need a feature width >= 3, the model's is 2"):
        orthogonal_class_features(prompts, 2)


def test_text_features_config_picks_the_source_for_training_and_evaluation():
    pytest.importorskip("omegaconf")
    from stdd.engine.config import load_config
    from stdd.engine.task import text_features_for
    from stdd.model import orthogonal_class_features

    encoder = _encoder()
    prompts = {"moving left": ["an object slides leftwards."], "moving right": ["an object slides rightwards."]}
    from_tower = text_features_for(encoder, prompts, load_config("demo", ["text.features=encoder"]).text)
    assert torch.allclose(from_tower.features[:, 0], encoder.encode([p[0] for p in prompts.values()]))
    orthogonal = text_features_for(encoder, prompts, load_config("demo", ["text.features=orthogonal"]).text)
    assert torch.equal(orthogonal.features, orthogonal_class_features(prompts, encoder.output_dim).features)
    assert encoder.output_dim == from_tower.features.shape[-1] == 32
    # a subset of a class list (stdd.eval scores only the classes its splits use) gets the whole list's rows
    names = ["moving up", "moving left", "moving right"]
    subset = text_features_for(encoder, prompts, load_config("demo").text, class_list=names)
    whole = orthogonal_class_features({name: ["x"] for name in names}, 32)
    assert torch.equal(subset.features, whole.features[[1, 2]]) and subset.class_names == tuple(prompts)
    assert not torch.equal(subset.features, orthogonal.features)  # without the list: a different basis


def test_word_class_features_share_what_the_prompts_share():
    pytest.importorskip("omegaconf")
    from stdd.engine.config import load_config
    from stdd.engine.task import text_features_for
    from stdd.model import word_class_features

    prompts = {"moving left": ["horizontal decreasing"], "moving up": ["vertical decreasing"],
               "moving down": ["Vertical, increasing!", "vertical increasing vertical"]}
    features = word_class_features(prompts, 32)
    assert features.features.shape == (3, 2, 32) and features.mask.tolist() == [[True, False], [True, False],
                                                                                [True, True]]
    assert torch.allclose(features.features[features.mask].norm(dim=-1), torch.ones(4))
    assert torch.equal(features.features[0, 1], torch.zeros(32))  # padding, masked
    # a word is the same vector in every class list and process: classes that share a word share its direction
    torch.manual_seed(7)
    alone = word_class_features({"moving up": ["vertical decreasing"]}, 32)
    assert torch.equal(alone.features[0, 0], features.features[1, 0])
    word = {w: word_class_features({w: [w]}, 32).features[0, 0].double() for w in
            ("horizontal", "vertical", "decreasing", "increasing")}
    left, up, down = (features.features[i, 0].double() for i in range(3))
    assert torch.allclose(left, (word["horizontal"] + word["decreasing"]) / (word["horizontal"] + word["decreasing"]).norm(),
                          atol=1e-6)
    assert (up @ (word["decreasing"] - word["increasing"])) > 0 > (down @ (word["decreasing"] - word["increasing"]))
    assert not torch.allclose(features.features[2, 0], features.features[2, 1], atol=1e-3)  # a repeat weighs more
    encoder = _encoder()
    chosen = text_features_for(encoder, prompts, load_config("demo", ["text.features=words"]).text)
    assert torch.equal(chosen.features, word_class_features(prompts, encoder.output_dim).features)
    with pytest.raises(ValueError, match="prompt '!!' of class 'x' has no word"):
        word_class_features({"x": ["!!"]}, 8)
