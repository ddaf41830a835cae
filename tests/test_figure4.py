"""The paper's Figure 4 ablation: which ASKG prompts a class gets (``text.prompt_kinds``: spatial S, temporal T,
both ST) x how frames meet prompts (``loss.score``: frame_prompt, Eq. 8, or mean_pool), for plain CLIP and STDD.

The key and where it is read (every prompt source of training, evaluation and prediction), its refusal of
sources without the spatial / temporal split, and the twelve ``fig4_*`` presets: every one at config level,
one STDD cell trained for one step and one CLIP cell evaluated without a checkpoint, on tiny settings."""

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")

from omegaconf import OmegaConf

from stdd.data.synthetic import CLASS_NAMES
from stdd.engine.config import PRESET_DIR, PROTOCOL_KEYS, VALUE_CHOICES, ConfigError, load_config
from stdd.engine.task import build_prompts
from stdd.knowledge.prompts import PROMPT_KINDS
from stdd.resources import askg_path, class_names, display_name

METHODS = ("clip", "stdd")
KINDS = {"s": "S", "t": "T", "st": "ST"}
SCORES = ("frame_prompt", "mean_pool")
PRESETS = [f"fig4_{method}_{kind}_{score}" for method in METHODS for kind in KINDS for score in SCORES]
SYNTHETIC = ["moving left", "moving right"]  # the tiny runs' classes

# The preset's architecture and data replaced by the tiny random-init CLIP on a tiny synthetic set, on the CPU;
# the cell's own keys (text.prompt_kinds, loss.score, model.temporal) are left as the preset sets them.
TINY = ["model.clip_name=STDD-Tiny-ViT", "model.pretrained=null", "model.allow_random_init=true",
        "data.input_size=32", "data.short_side=32", "data.num_frames=4", "data.stride=3", "data.num_workers=0",
        "data.horizontal_flip=false", "text.cache_dir=null", "run.device=cpu", "run.precision=fp32",
        "run.tensorboard=false", "eval.n_temporal_views=1", "eval.batch_size=2"]


def _cell(preset: str) -> tuple[str, str, str]:
    """(method, prompt kinds, score) of a preset named fig4_<method>_<kinds>_<score>."""
    method, kind, score = preset.split("_", 3)[1:]
    return method, KINDS[kind], score


def askg_document(names) -> dict:
    """A valid ASKG document for ``names``: shipped UCF101 graphs, each renamed to one of the names."""
    shipped = json.loads(askg_path("ucf101").read_text(encoding="utf-8"))["classes"]
    classes = {}
    for name, (old, graph) in zip(names, shipped.items()):
        graph = copy.deepcopy(graph)
        graph["class"] = name
        old_name = display_name("ucf101", old)
        graph["prompts"] = {kind: [s.replace(f"of {old_name},", f"of {name},") for s in sentences]
                            for kind, sentences in graph["prompts"].items()}
        classes[name] = graph
    return {"schema_version": 1, "dataset": "custom", "provenance": {}, "classes": classes}


@pytest.fixture(scope="module")
def askg_file(tmp_path_factory):
    """An ASKG file of every synthetic motion class (validated), and its document."""
    from stdd.knowledge import validate_askg_file

    document = askg_document(CLASS_NAMES)
    path = tmp_path_factory.mktemp("askg") / "motion_askg.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert validate_askg_file(path) == []
    return path, document


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny synthetic set of two classes, shared by the runs of this module."""
    from stdd.data import generate_synthetic_dataset

    pytest.importorskip("av")
    return generate_synthetic_dataset(tmp_path_factory.mktemp("data"), videos_per_class=2, val_videos_per_class=1,
                                      classes=SYNTHETIC, num_frames=16, height=32, width=32, seed=0)


def _kinds(document, names, kinds):
    return {name: [s for kind in kinds for s in document["classes"][name]["prompts"][kind]] for name in names}


# ----------------------------------------------------------------------------- the key


def test_the_key_defaults_to_both_kinds_and_its_values_have_one_home():
    assert load_config("k400_vitb16").text.prompt_kinds == "ST"
    assert VALUE_CHOICES["text.prompt_kinds"] is PROMPT_KINDS  # the list itself, not a copy
    assert "text.prompt_kinds" in PROTOCOL_KEYS  # how a model is scored
    names = class_names("ucf101")[:4]
    # the default keeps the prompts as they were: every prompt of the graph, spatial then temporal
    assert build_prompts("askg", names, dataset="ucf101") == build_prompts("askg", names, dataset="ucf101",
                                                                           prompt_kinds="ST")
    shipped = json.loads(askg_path("ucf101").read_text(encoding="utf-8"))
    assert build_prompts("askg", names, dataset="ucf101") == _kinds(shipped, names, ("spatial", "temporal"))


def test_s_t_and_st_give_the_spatial_the_temporal_and_both_lists_of_an_askg_file(askg_file):
    path, document = askg_file
    names = ["growing", "moving left"]  # not the file's order: the classes come in the order asked
    for value, kinds in PROMPT_KINDS.items():
        prompts = build_prompts(str(path), names, prompt_kinds=value)
        assert prompts == _kinds(document, names, kinds)
        assert list(prompts) == names
    spatial = build_prompts(str(path), names, prompt_kinds="S")
    temporal = build_prompts(str(path), names, prompt_kinds="T")
    assert all(set(spatial[n]).isdisjoint(temporal[n]) and spatial[n] and temporal[n] for n in names)
    # with_templates: the template sentences after the chosen kind
    with_templates = build_prompts(str(path), names, prompt_kinds="T", with_templates=True)
    templated = build_prompts("templates", names)
    assert all(with_templates[n] == temporal[n] + templated[n] for n in names)
    # the shipped sets and the Kinetics-600 path (its renamed classes read the K400 graphs)
    ucf = class_names("ucf101")[:3]
    shipped = json.loads(askg_path("ucf101").read_text(encoding="utf-8"))
    assert build_prompts("askg", ucf, dataset="ucf101", prompt_kinds="S") == _kinds(shipped, ucf, ("spatial",))
    k400 = json.loads(askg_path("k400").read_text(encoding="utf-8"))
    k600 = build_prompts("askg", ["waking up", class_names("k600_new")[0]], dataset="k600", prompt_kinds="T")
    assert k600["waking up"] == k400["classes"]["baby waking up"]["prompts"]["temporal"]


def test_a_typo_is_refused_at_load_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        load_config("fig4_stdd_s_frame_prompt", ["text.prompt_kinds=SX"])
    message = str(caught.value)
    assert "\n" not in message and "text.prompt_kinds='SX'" in message and "S, T, ST" in message
    with pytest.raises(ConfigError, match=r"text\.prompt_kinds='st'"):  # the values as written, not folded
        build_prompts("askg", class_names("ucf101")[:2], dataset="ucf101", prompt_kinds="st")


def test_a_source_without_the_split_is_one_line_naming_the_key(tmp_path, synthetic):
    names = SYNTHETIC
    flat = tmp_path / "prompts.json"
    flat.write_text(json.dumps({name: [f"a video of {name}."] for name in names}))
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({"0": "moving left: a shape moves left.", "1": "moving right: to the right."}))
    cases = [("templates", {}, "text.prompts=templates"),
             ("class_descriptions", {}, "text.prompts=class_descriptions"),
             (str(flat), {}, f"text.prompts={flat}"),
             (str(descriptions), {}, f"text.prompts={descriptions}"),
             ("dataset", {"dataset_prompts": synthetic.prompts_file}, "text.prompts=dataset")]
    for source, options, named in cases:
        for value in ("S", "T"):
            with pytest.raises(ConfigError) as caught:
                build_prompts(source, names, prompt_kinds=value, **options)
            message = str(caught.value)
            assert "\n" not in message and message.startswith(f"text.prompt_kinds={value}: "), message
            assert named in message, message
        if source != "class_descriptions":  # (that one needs its file: an error of its own)
            assert build_prompts(source, names, prompt_kinds="ST", **options)  # ST: read as they are


def test_a_stored_config_without_the_key_still_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from stdd.engine.checkpoint import save_weights
    from stdd.engine.inference import config_for_weights

    stored = OmegaConf.to_container(load_config("demo"))
    del stored["text"]["prompt_kinds"]  # a checkpoint written before the key existed
    path = save_weights(tmp_path / "final.pt", {"w": torch.zeros(1)}, OmegaConf.create(stored))
    cfg, _ = config_for_weights(str(path), None, [])
    assert cfg.text.prompt_kinds == "ST"


# ----------------------------------------------------------------------------- refused before anything is written


def test_training_refuses_an_unsplit_source_before_writing(tmp_path):
    from stdd.engine.trainer import run_training

    run, data = tmp_path / "run", tmp_path / "data"
    cfg = load_config("demo", [f"run.output_dir={run}", f"data.root={data}", "text.prompt_kinds=T"])
    with pytest.raises(ConfigError, match=r"^text\.prompt_kinds=T: text\.prompts=dataset \(the synthetic set's"):
        run_training(cfg, quiet=True)
    assert not run.exists() and not data.exists()


def test_evaluation_refuses_an_unsplit_source_before_writing(tmp_path, synthetic):
    from stdd import eval as evaluation

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"^text\.prompt_kinds=S: text\.prompts=templates has no"):
        evaluation.run(["--config", "fig4_clip_s_frame_prompt", "--protocol", "ep2", "--annotations",
                        str(synthetic.annotation_files["val"]), "--root", str(synthetic.root), "--classes",
                        str(synthetic.classes_file), "--out-dir", str(out), "--quiet", *TINY,
                        "text.prompts=templates"])
    assert not out.exists()


def test_prediction_reads_the_kinds_of_its_prompts_file(tmp_path, synthetic, askg_file):
    from stdd import predict as prediction

    path, document = askg_file
    names = SYNTHETIC
    assert prediction._file_prompts(names, path, prompt_kinds="T") == _kinds(document, names, ("temporal",))
    video = sorted((synthetic.root / "videos" / "val").rglob("*.mp4"))[0]
    with pytest.raises(ConfigError, match=rf"^text\.prompt_kinds=S: --prompts {synthetic.prompts_file} has no"):
        prediction.predict([video], classes=names, prompts=synthetic.prompts_file, config="demo",
                           overrides=["text.prompt_kinds=S"])


# ----------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_fig4_preset_sets_its_cell_and_nothing_else(preset):
    method, kinds, score = _cell(preset)
    path = PRESET_DIR / f"{preset}.yaml"
    text = path.read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("# Figure 4") and f"--config {preset}" in "\n".join(header)
    assert [line for line in text.splitlines() if line and not line.startswith("#")][0] == "base: k400_vitb16"
    cfg = load_config(preset)  # loads, every value in range
    assert (cfg.text.prompts, cfg.text.prompt_kinds, cfg.loss.score) == ("askg", kinds, score)
    assert cfg.run.output_dir == f"runs/{preset}"
    written = OmegaConf.to_container(OmegaConf.load(path))
    written.pop("base")
    changed = {f"{section}.{key}" for section, keys in written.items() for key in keys}
    cell = {"run.output_dir", "text.prompts", "text.prompt_kinds", "loss.score"}
    if method == "clip":
        assert cfg.model.temporal == "none" and "--checkpoint" not in text and "stdd.train" not in text
        cell.add("model.temporal")
    else:
        assert cfg.model.temporal == "stca" and "stdd.train" in text and "--checkpoint" in text
    assert changed == cell
    base = OmegaConf.to_container(load_config("k400_vitb16"))
    ours = OmegaConf.to_container(cfg)
    for key in cell:  # everything else is the base's
        section, name = key.split(".")
        base[section][name] = ours[section][name]
    assert ours == base


def test_the_fig4_presets_are_the_twelve_cells_each_with_its_own_folder():
    from stdd.engine.config import list_presets

    assert sorted(name for name in list_presets() if name.startswith("fig4_")) == sorted(PRESETS)
    assert len({load_config(name).run.output_dir for name in PRESETS}) == len(PRESETS)


def _recording(monkeypatch, module):
    """Record every build_prompts call of ``module``: (prompt_kinds, prompts)."""
    calls = []
    original = module.build_prompts

    def recorded(*args, **kwargs):
        prompts = original(*args, **kwargs)
        calls.append((kwargs.get("prompt_kinds"), prompts))
        return prompts

    monkeypatch.setattr(module, "build_prompts", recorded)
    return calls


def test_an_stdd_cell_trains_a_step_with_its_prompts_and_score(tmp_path, synthetic, askg_file, monkeypatch):
    from stdd.engine import task
    from stdd.engine.trainer import run_training

    preset = "fig4_stdd_t_mean_pool"
    _, kinds, score = _cell(preset)
    path, document = askg_file
    run = tmp_path / "run"
    cfg = load_config(preset, [*TINY, "data.dataset=synthetic", f"data.root={synthetic.root}", "data.class_names=null",
                               f"data.synthetic.classes=[{','.join(SYNTHETIC)}]", "data.synthetic.videos_per_class=2",
                               "data.synthetic.val_videos_per_class=1", "data.synthetic.num_frames=16",
                               "data.synthetic.size=32", "data.synthetic.seed=0", "data.batch_size=4",
                               "optim.epochs=1", "optim.warmup_epochs=0",
                               f"run.output_dir={run}", f"text.prompts={path}"])
    assert (cfg.text.prompt_kinds, cfg.loss.score, cfg.model.temporal) == (kinds, score, "stca")
    calls = _recording(monkeypatch, task)
    result = run_training(cfg, quiet=True)
    assert result["global_step"] == 1 and Path(result["final_weights"]).is_file()  # one step: 4 videos, batch 4
    assert calls == [(kinds, _kinds(document, SYNTHETIC, PROMPT_KINDS[kinds]))]
    stored = OmegaConf.load(run / "config.yaml")
    assert (stored.text.prompt_kinds, stored.loss.score) == (kinds, score)


def test_a_clip_cell_is_evaluated_without_a_checkpoint(tmp_path, synthetic, askg_file, monkeypatch):
    from stdd import eval as evaluation

    preset = "fig4_clip_s_frame_prompt"
    _, kinds, score = _cell(preset)
    path, document = askg_file
    out = tmp_path / "out"
    calls = _recording(monkeypatch, evaluation)
    evaluation.run(["--config", preset, "--protocol", "ep2", "--annotations", str(synthetic.annotation_files["val"]),
                    "--root", str(synthetic.root), "--classes", str(synthetic.classes_file), "--out-dir", str(out),
                    "--quiet", *TINY, f"text.prompts={path}"])
    report = json.loads((out / "results.json").read_text())
    assert report["checkpoint"] is None and report["temporal"] == "none" and report["videos"] == len(SYNTHETIC)
    assert calls == [(kinds, _kinds(document, SYNTHETIC, PROMPT_KINDS[kinds]))]
