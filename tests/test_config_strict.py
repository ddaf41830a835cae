"""Strict configs: unknown keys, real booleans and integers, value ranges, each error naming its dotted key."""

import pytest

pytest.importorskip("omegaconf")

from stdd.engine.config import VALUE_RANGES, ConfigError, load_config
from stdd.errors import UsageError


def test_a_misspelled_key_in_a_yaml_with_base_is_refused(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("base: demo\noptim: {lrr: 1.0}\n")
    with pytest.raises(ConfigError, match=r"user\.yaml: optim\.lrr") as caught:
        load_config(user)
    assert isinstance(caught.value, UsageError)


@pytest.mark.parametrize("text, expected", [("false", False), ("'false'", False), ("true", True), ("'true'", True)])
def test_booleans_are_booleans_also_when_quoted(text, expected):
    assert load_config("demo", [f"model.stca.enabled={text}"]).model.stca.enabled is expected


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=2.7", "data.batch_size"),  # not an integer: refused, never truncated to 2
    ("model.stca.enabled=maybe", "model.stca.enabled"),
])
def test_values_of_the_wrong_type_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("demo", [override])


@pytest.mark.parametrize("override, message", [
    ("run.max_steps=-1", r"run\.max_steps=-1: expected an integer >= 1"),
    ("run.max_steps=0", r"run\.max_steps=0"),
    ("optim.lr=-1", r"optim\.lr=-1\.0: expected a number > 0"),  # the value given, not the scaled lr
    ("data.batch_size=0", r"data\.batch_size=0"),
    ("data.num_workers=-2", r"data\.num_workers=-2"),
    ("text.features=orthogonl", r"text\.features='orthogonl': expected one of encoder, orthogonal"),
    ("data.frame_cache_mb=-1", r"data\.frame_cache_mb=-1\.0: expected a number >= 0"),
    ("optim.betas=[0.9,1.5]", r"optim\.betas=.0\.9, 1\.5.: expected two numbers in \[0, 1\)"),
    ("eval.n_spatial_crops=2", r"eval\.n_spatial_crops=2: expected one of 1, 3"),
    ("averaging.ema_decay=1.0", r"averaging\.ema_decay=1\.0"),
    ("optim.accumulation_steps=0", r"optim\.accumulation_steps=0"),
])
def test_values_out_of_range_are_refused_naming_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_every_checked_key_exists_and_every_preset_is_in_range():
    from omegaconf import OmegaConf

    from stdd.engine.config import STDDConfig, list_presets

    schema = OmegaConf.structured(STDDConfig)
    for key in VALUE_RANGES:
        assert OmegaConf.select(schema, key, default="<missing>") != "<missing>", key
    for preset in list_presets():
        load_config(preset)


def test_an_empty_yaml_names_the_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty\.yaml: is empty"):
        load_config(empty)


def test_a_stored_config_out_of_range_is_refused_for_inference(tmp_path):
    torch = pytest.importorskip("torch")
    from stdd.engine.checkpoint import save_weights
    from stdd.engine.inference import config_for_weights

    cfg = load_config("demo")
    path = save_weights(tmp_path / "final.pt", {"w": torch.zeros(1)}, cfg)
    with pytest.raises(ConfigError, match=r"final\.pt \(its stored config\): eval\.batch_size=0"):
        config_for_weights(str(path), None, ["eval.batch_size=0"])
