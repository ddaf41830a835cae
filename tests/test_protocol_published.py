"""Base-to-novel and few-shot: HM arithmetic, what a model may be scored on, the presets, and the whole
protocol on synthetic videos (training per seed, then ``python -m stdd.eval`` over the seeds' models)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")

from stdd.data.annotations import resolve_split, write_split_folder
from stdd.engine import metrics, protocols
from stdd.engine.config import ConfigError, list_presets, load_config, published_split_of

REPO = Path(__file__).resolve().parents[1]


def test_harmonic_mean_and_the_seed_average_as_the_field_reports_it():
    assert metrics.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert metrics.harmonic_mean(50.0, 50.0) == 50.0 and metrics.harmonic_mean(0.0, 0.0) == 0.0
    assert metrics.harmonic_mean(100.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="harmonic_mean"):
        metrics.harmonic_mean(-1.0, 50.0)
    runs = [{"base": {"top1": 90.0, "top5": 100.0}, "novel": {"top1": 30.0, "top5": 80.0}},
            {"base": {"top1": 70.0, "top5": 100.0}, "novel": {"top1": 50.0, "top5": 90.0}}]
    summary = metrics.summarize_runs(runs, ["base", "novel"])
    assert summary["num_runs"] == 2
    assert (summary["base_top1_mean"], summary["base_top1_std"]) == (80.0, 10.0)
    assert (summary["novel_top1_mean"], summary["novel_top5_mean"]) == (40.0, 85.0)
    # HM of the averaged base and novel top-1 (80, 40), not the mean of the seeds' HMs (45, 58.33)
    assert summary["hm"] == pytest.approx(2 * 80 * 40 / 120)
    assert [run["hm"] for run in runs] == pytest.approx([45.0, 2 * 70 * 50 / 120])
    assert summary["hm_of_runs_mean"] == pytest.approx((45.0 + 2 * 70 * 50 / 120) / 2)
    few = metrics.summarize_runs([{"all": {"top1": 60.0, "top5": 90.0}}], ["all"])
    assert few["all_top1_mean"] == 60.0 and "hm" not in few


def test_what_a_model_may_be_scored_on(tmp_path):
    hmdb_b2n, ucf_b2n = resolve_split("hmdb51", "base2novel"), resolve_split("ucf101", "base2novel")
    hmdb_few = resolve_split("hmdb51", "fewshot")
    key = protocols.published_run_key
    assert key("base2novel", hmdb_b2n, None) is None  # not trained on a published list: scored as it is
    assert key("base2novel", hmdb_b2n, (hmdb_b2n, 2)) == 2
    assert key("fewshot", hmdb_few, (hmdb_few, 8), shots=8) == 8
    with pytest.raises(ValueError, match=r"--checkpoint: trained on the 4-shot list of the fewshot split hmdb51, "
                                         r"which holds the novel classes too"):
        key("base2novel", hmdb_b2n, (hmdb_few, 4))
    with pytest.raises(ValueError, match=r"trained on the base2novel split ucf101 \(its seed 1\), scored on the "
                                         r"base2novel split hmdb51"):
        key("base2novel", hmdb_b2n, (ucf_b2n, 1))
    with pytest.raises(ValueError, match=r"trained on the base2novel split hmdb51 .* scored on the fewshot split"):
        key("fewshot", hmdb_few, (hmdb_b2n, 1))
    with pytest.raises(ValueError, match=r"w\.pt: trained on the 8-shot list, scored as --shots 16"):
        key("fewshot", hmdb_few, (hmdb_few, 8), shots=16, source="w.pt")


def test_presets_train_on_the_list_their_name_says():
    names = [name for name in list_presets() if name.startswith(("b2n_", "fewshot_"))]
    assert len(names) == 4 * 3 + 3 * 4
    for name in names:
        cfg = load_config(name)
        split, key = published_split_of(cfg)
        match = re.fullmatch(r"b2n_(\w+)_s(\d)|fewshot_(\w+)_(\d+)shot", name)
        dataset, number = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        assert (split.dataset, key, cfg.data.published.protocol) == (
            dataset, int(number), "base2novel" if name.startswith("b2n") else "fewshot")
        assert cfg.run.output_dir == f"runs/{name}" and cfg.data.dataset == "published"
        assert cfg.data.horizontal_flip == (dataset != "ssv2")  # SSv2 has left/right classes
        assert cfg.text.prompts == ("templates" if dataset == "ssv2" else "askg")
        assert cfg.model.clip_name == "ViT-B-16" and cfg.data.num_frames == 8 and cfg.optim.lr == 2e-6
        assert cfg.optim.epochs == (11 if name.startswith("b2n") else 50)


@pytest.mark.parametrize("overrides, message", [
    (["data.published.dataset=hmdb"], r"data\.published\.dataset 'hmdb': no published base2novel split for it; "
                                      r"expected one of hmdb51, k400, ssv2, ucf101"),
    (["data.published.seed=4"], r"data\.published\.seed=4: the base2novel split hmdb51 has no training list for "
                                r"it; its lists have seed 1, 2, 3"),
    (["data.published.protocol=fewshot", "data.published.seed=null", "data.published.shots=3"],
     r"data\.published\.shots=3: the fewshot split hmdb51 has no training list .* shots 2, 4, 8, 16"),
    (["data.published.protocol=fewshot", "data.published.seed=null", "data.published.dataset=k400",
      "data.published.shots=2"], r"'k400': no published fewshot split for it; expected one of hmdb51, ssv2, ucf101"),
    (["data.published.protocol=fewshot", "data.published.shots=2"], r"data\.published\.seed=1: a fewshot split "
                                                                      r"picks its list by data\.published\.shots"),
    (["data.class_names=hmdb51"], r"data\.class_names=hmdb51: not read with data\.dataset=published"),
    (["data.published.dataset=ssv2", "text.prompts=templates"], r"data\.horizontal_flip=true: Something-Something"),
])
def test_a_published_split_that_does_not_exist_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("b2n_hmdb51_s1", overrides)


# ----------------------------------------------------------------------------- the protocol end to end

av = pytest.importorskip("av")
pytest.importorskip("open_clip")

from test_cli_errors import assert_one_line_usage_error, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_b2n_synthetic", REPO / "bench" / "b2n_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic_split(bench, tmp_path_factory):
    """The benchmark's synthetic split (2 base, 2 novel motion classes), tiny: 2 seeds of 2 videos per class."""
    work = tmp_path_factory.mktemp("b2n")
    split, root = bench.make_split(work, seeds=[1, 2], pool_per_class=3, per_class=2, val_per_class=2)
    return work, split, root


@pytest.fixture(scope="module")
def seed_models(bench, synthetic_split):
    """One model per seed, trained on its seed's list (base classes only) with the benchmark's command line."""
    from stdd.engine.trainer import run_training
    from stdd.cli import split_overrides

    work, split, root = synthetic_split
    models = []
    for seed in (1, 2):
        command = bench.train_command(split, root, work / f"stdd_s{seed}", seed, "stdd",
                                      ["optim.epochs=1", "data.batch_size=4", "optim.warmup_epochs=0"])
        _, overrides = split_overrides(command[5:])
        run_training(load_config("demo", overrides), quiet=True)
        models.append(work / f"stdd_s{seed}" / "final.pt")
    return models


def test_base_to_novel_on_synthetic_videos_end_to_end(bench, synthetic_split, seed_models, tmp_path):
    work, split, root = synthetic_split
    cfg = load_config("demo", bench.train_command(split, root, work / "x", 1, "stdd")[5:])
    published, _ = published_split_of(cfg)
    from stdd.engine.task import data_spec

    spec = data_spec(cfg, "train")  # trained on its seed's list, labelled with the base classes only
    assert spec.class_names == list(bench.BASE_CLASSES) and spec.annotation_file == published.train_list(1)

    # one validation video of a novel class is missing: skipped and counted, the rest is scored
    gone = published.records(published.val["novel"], "novel", root)[-1].path
    moved = gone.with_suffix(".away")
    gone.rename(moved)
    try:
        result = run_cli("stdd.eval", "--protocol", "base2novel", "--dataset", split, "--root", root,
                         "--checkpoint", *seed_models, "--out-dir", tmp_path / "out")
    finally:
        moved.rename(gone)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [run["seed"] for run in report["runs"]] == [1, 2] and report["num_runs"] == 2
    for run in report["runs"]:
        assert (run["base"]["classes"], run["novel"]["classes"]) == (2, 2)
        assert (run["base"]["videos_scored"], run["novel"]["videos_scored"]) == (4, 3)
        assert run["novel"]["videos_missing"] == 1 and run["base"]["videos_missing"] == 0
        assert run["hm"] == pytest.approx(metrics.harmonic_mean(run["base"]["top1"], run["novel"]["top1"]))
    base = sum(run["base"]["top1"] for run in report["runs"]) / 2
    novel = sum(run["novel"]["top1"] for run in report["runs"]) / 2
    assert (report["base_top1_mean"], report["novel_top1_mean"]) == pytest.approx((base, novel))
    assert report["hm"] == pytest.approx(metrics.harmonic_mean(base, novel))
    assert "seed 1" in result.stdout and "mean of 2 model(s)" in result.stdout and "HM" in result.stdout
    assert "1 missing" in result.stdout and str(gone) in result.stderr  # the warning names the missing video
    rows = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [*bench.BASE_CLASSES, *bench.NOVEL_CLASSES]
    assert sum(int(row.split(",")[1]) for row in rows[1:]) == 2 * (4 + 3)  # both models' videos


def test_few_shot_evaluation_and_what_it_refuses(bench, synthetic_split, seed_models, tmp_path, capsys, monkeypatch):
    from stdd import eval as eval_cli
    from stdd import cli

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    work, b2n, root = synthetic_split
    b2n_split = resolve_split(str(b2n), "base2novel")
    names = [*bench.BASE_CLASSES, *bench.NOVEL_CLASSES]
    val = [(r.path.relative_to(root), names.index(b2n_split.classes[part][r.label]))
           for part in ("base", "novel") for r in b2n_split.records(b2n_split.val[part], part, root)]
    few = write_split_folder(work / "fewshot", protocol="fewshot", classes={"all": names}, train_key="shots",
                             train_part="all", train={2: val[:2]}, val={"all": val}, prompts=bench.ATTRIBUTE_PROMPTS)
    common = ["--protocol", "fewshot", "--dataset", str(few.folder), "--root", str(root), "--quiet"]
    # the untrained demo model (no checkpoint): all four classes scored
    assert eval_cli.main([*common, "--config", "demo", "--shots", "2", "--out-dir", str(tmp_path / "few"),
                          "text.features=words", "text.prompts=dataset"]) == 0
    report = json.loads((tmp_path / "few" / "results.json").read_text())
    assert report["shots"] == 2 and report["runs"][0]["all"]["videos_scored"] == 8 and "hm" not in report
    # a model trained on base-to-novel lists is no few-shot model; the b2n lists hold no novel class to train on
    assert eval_cli.main([*common, "--checkpoint", str(seed_models[0]), "--out-dir", str(tmp_path / "x")]) == 2
    assert "trained on the base2novel split" in capsys.readouterr().err
    assert eval_cli.main([*common, "--shots", "16", "--config", "demo", "--out-dir", str(tmp_path / "y")]) == 2
    error = capsys.readouterr().err
    assert "--shots=16: the fewshot split" in error and "its lists have shots 2" in error
    assert eval_cli.main(["--protocol", "fewshot", "--dataset", "ucf101", "--shots", "3", "--root", str(root),
                          "--config", "demo", "--out-dir", str(tmp_path / "v")]) == 2
    assert capsys.readouterr().err == ("error: --shots=3: the fewshot split ucf101 has no training list for it; its "
                                       "lists have shots 2, 4, 8, 16\n")
    assert eval_cli.main(["--protocol", "base2novel", "--dataset", str(b2n), "--root", str(tmp_path / "empty"),
                          "--checkpoint", str(seed_models[0]), "--out-dir", str(tmp_path / "z")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --root {tmp_path / 'empty'}: none of the 4 videos of ") and "base_val.txt" in line
    assert eval_cli.main([*common, "--annotations", "a.txt", "--config", "demo", "--out-dir", str(tmp_path / "w")]) == 2
    assert "--annotations: not read by --protocol fewshot" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "xyzwv")  # refused before anything was written


def test_wrong_dataset_and_shot_counts_without_a_list_are_one_line_errors(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    out = tmp_path / "out"
    assert_one_line_usage_error(
        run_cli("stdd.eval", "--protocol", "base2novel", "--dataset", "hmdb", "--root", root, "--config", "demo",
                "--out-dir", out),
        "--dataset 'hmdb'", "expected one of hmdb51, k400, ssv2, ucf101")
    assert_one_line_usage_error(
        run_cli("stdd.train", "--config", "fewshot_ucf101_2shot", "data.published.shots=3", f"data.root={root}",
                f"run.output_dir={tmp_path / 'run'}"),
        "data.published.shots=3", "its lists have shots 2, 4, 8, 16")
    assert not out.exists() and not (tmp_path / "run").exists()
