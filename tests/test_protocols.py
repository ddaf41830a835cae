"""Zero-shot protocol split logic and metrics (no model needed)."""

import json

import numpy as np
import pytest
import torch

from stdd.engine import metrics, protocols
from stdd.errors import UsageError
from stdd.resources import K400_RENAMED_IN_K600, class_names


def test_ep1_draws_are_reproducible_half_of_classes_and_differ_between_draws():
    ucf = class_names("ucf101")
    first = protocols.ep1_splits(ucf, draws=10, seed=0)
    again = protocols.ep1_splits(list(reversed(ucf)), draws=10, seed=0)  # list order must not matter
    assert len(first) == 10
    assert all(len(split.class_indices) == 50 for split in first)
    names_first = [{ucf[i] for i in s.class_indices} for s in first]
    reversed_names = list(reversed(ucf))
    names_again = [{reversed_names[i] for i in s.class_indices} for s in again]
    assert names_first == names_again
    assert len({frozenset(n) for n in names_first}) == 10  # ten different draws
    other_seed = protocols.ep1_splits(ucf, draws=10, seed=1)
    assert [s.class_indices for s in other_seed] != [s.class_indices for s in first]
    hmdb = protocols.ep1_splits(class_names("hmdb51"))
    assert {len(s.class_indices) for s in hmdb} == {25}


def test_ep1_pinned_draw_does_not_change_across_versions():
    # The draw is defined by SHA-256 ranks; pin one so a change of the rule is noticed.
    names = [f"class {i}" for i in range(10)]
    assert protocols.ep1_splits(names, draws=1, seed=0)[0].class_indices == tuple(
        sorted(sorted(range(10), key=lambda i: __import__("hashlib").sha256(f"0/0/class {i}".encode()).hexdigest())[:5])
    )


def test_k600_splits_are_disjoint_from_k400_and_reproducible():
    k600, k400 = class_names("k600"), class_names("k400")
    novel = protocols.k600_novel_class_indices(k600, k400, renamed=K400_RENAMED_IN_K600)
    assert len(novel) == 220
    assert [k600[i] for i in novel] == class_names("k600_new")
    seen = {protocols.normalize_class_name(n) for n in k400} | {
        protocols.normalize_class_name(n) for n in K400_RENAMED_IN_K600.values()
    }
    splits = protocols.k600_splits(k600, k400, renamed=K400_RENAMED_IN_K600, seed=0)
    assert len(splits) == 3
    for split in splits:
        assert len(split.class_indices) == 160 == len(set(split.class_indices))
        assert not {protocols.normalize_class_name(k600[i]) for i in split.class_indices} & seen
        assert set(split.class_indices) <= set(novel)
    assert len({s.class_indices for s in splits}) == 3
    again = protocols.k600_splits(k600, k400, renamed=K400_RENAMED_IN_K600, seed=0)
    assert [s.class_indices for s in again] == [s.class_indices for s in splits]


def test_k600_novel_count_check_catches_a_renamed_class():
    k600, k400 = class_names("k600"), class_names("k400")
    with pytest.raises(ValueError, match="expected 220"):
        protocols.k600_novel_class_indices(k600, k400)  # renames not given: renamed K400 classes leak in


def test_split_file_text_and_json(tmp_path):
    names = ["jumping", "Running Fast", "swimming", "eating"]
    text_file = tmp_path / "splits.txt"
    text_file.write_text("# two splits\n[first]\njumping\nrunning_fast\n\n[second]\nswimming\neating  # comment\n")
    splits = protocols.read_split_file(text_file, names)
    assert [(s.name, s.class_indices) for s in splits] == [("first", (0, 1)), ("second", (2, 3))]
    json_file = tmp_path / "splits.json"
    json_file.write_text(json.dumps([["eating", "jumping"], ["swimming"]]))
    assert [s.class_indices for s in protocols.read_split_file(json_file, names)] == [(0, 3), (2,)]
    bad = tmp_path / "bad.txt"
    bad.write_text("jumping\nflying\n")
    with pytest.raises(ValueError, match=r"bad.txt:2.*'flying'"):
        protocols.read_split_file(bad, names)


def test_ep3_uses_official_lists_and_metrics_per_split(tmp_path):
    # 4 classes, 8 videos, 2 views. Scores make video i predict class (i % 4) except video 7.
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    scores = torch.full((2, 8, 4), -5.0)
    for i in range(8):
        scores[:, i, i % 4] = 5.0
    scores[:, 7, 3] = -5.0
    scores[:, 7, 0] = 5.0  # video 7 (class 3) predicted as class 0
    splits = protocols.ep3_splits(["a", "b", "c", "d"], [[0, 1, 2, 3], [4, 5, 6, 7]])
    results = [metrics.evaluate_split(scores, labels, split, ks=(1, 5)) for split in splits]
    assert [r["top1"] for r in results] == [100.0, 75.0]
    assert [r["top5"] for r in results] == [100.0, 100.0]
    summary = metrics.summarize(results)
    assert summary["top1_mean"] == pytest.approx(87.5) and summary["top1_std"] == pytest.approx(12.5)
    # A split restricted to classes {0, 3}: video 7's competitor class 0 is still there.
    sub = metrics.evaluate_split(scores, labels, protocols.ZeroShotSplit("s", (0, 3)), ks=(1,))
    assert sub["num_videos"] == 4 and sub["top1"] == 75.0
    matrix = metrics.confusion_matrix(results[1]["labels"], results[1]["predictions"], 4)
    assert matrix[3, 0] == 1 and np.trace(matrix) == 3
    csv_path = metrics.write_per_class_csv(tmp_path / "per_class.csv", ["a", "b", "c", "d"], matrix)
    assert csv_path.read_text().splitlines()[4] == "d,1,0,0.00"
    png = metrics.plot_confusion_matrix(tmp_path / "cm.png", matrix, ["a", "b", "c", "d"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_view_aggregation_softmax_is_over_the_split_classes():
    # One video, two views; the first view is confident in a class outside the split.
    scores = torch.tensor([[[10.0, 1.0, 0.0]], [[0.0, 0.0, 3.0]]])
    only_01 = metrics.aggregate_views(scores, (0, 1))
    assert torch.allclose(only_01.sum(-1), torch.ones(1, dtype=torch.float64))
    assert only_01.argmax().item() == 0
    # view 1: softmax(1, 0) = (.73, .27); view 2: softmax(0, 3) = (.05, .95); mean favours class 2
    assert metrics.aggregate_views(scores, (1, 2)).argmax().item() == 1


def test_k600_splits_from_the_release_class_list():
    k600 = class_names("k600")
    release = class_names("k600_new_release")
    splits = protocols.k600_splits(k600, novel_names=release, seed=0)
    assert [len(s.class_indices) for s in splits] == [160] * 3
    allowed = {k600.index(n) for n in release}
    assert all(set(s.class_indices) <= allowed for s in splits)
    renamed = {k600.index(n) for n in K400_RENAMED_IN_K600.values()}
    assert any(set(s.class_indices) & renamed for s in splits)  # the 12 renames are candidates now
    assert splits == protocols.k600_splits(k600, novel_names=release, seed=0)
    # the release spells one name in lower case: matched like any class name
    assert protocols.class_indices(k600, ["throwing ball (not baseball or american football)"], "x") == [
        k600.index("throwing ball (not baseball or American football)")]
    with pytest.raises(ValueError, match=r"my list: 1 of its 2 classes .*'no such class'"):
        protocols.class_indices(k600, ["abseiling", "no such class"], "my list")
    with pytest.raises(ValueError, match="k400_names"):
        protocols.k600_splits(k600)


def test_eval_cli_k600_classes_selects_the_candidate_list():
    from stdd.eval import build_argument_parser, build_splits

    k600 = class_names("k600")
    base = ["--protocol", "k600", "--annotations", "unused.csv", "--out-dir", "unused"]
    parser = build_argument_parser()
    usual = build_splits(parser.parse_args(base), k600, [])
    release = build_splits(parser.parse_args(base + ["--k600-classes", "k600_new_release"]), k600, [])
    new, renamed = set(class_names("k600_new")), {k600.index(n) for n in K400_RENAMED_IN_K600.values()}
    assert all({k600[i] for i in s.class_indices} <= new for s in usual)
    assert release == protocols.k600_splits(k600, novel_names=class_names("k600_new_release"), seed=0)
    assert any(set(s.class_indices) & renamed for s in release)
    with pytest.raises(UsageError, match="--k600-classes"):
        parser.parse_args(base + ["--k600-classes", "k600"])


def test_shipped_askg_prompts_cover_the_release_k600_list():
    """The 12 K400 renames of the 232-class list read the K400 graph of their K400 name."""
    pytest.importorskip("omegaconf")
    from stdd.knowledge import load_prompts
    from stdd.engine.task import build_prompts

    release = class_names("k600_new_release")
    prompts = build_prompts("askg", release, dataset="k600")
    assert list(prompts) == release
    k400 = load_prompts("k400")
    for old, new in K400_RENAMED_IN_K600.items():
        assert prompts[new] == k400[old]
    k600_new = load_prompts("k600_new")
    assert all(prompts[name] == k600_new[name] for name in class_names("k600_new"))
