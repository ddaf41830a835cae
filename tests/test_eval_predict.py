"""stdd.eval (protocol CLI) and stdd.predict (CLI + Python) on real generated videos."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd.data import generate_synthetic_dataset
from stdd.engine.checkpoint import save_weights
from stdd.engine.config import load_config
from stdd.predict import predict

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["moving left", "moving right", "growing"]
# text.features=encoder: the prompts go through the text tower (the demo preset's orthogonal features skip them)
TINY = ["data.num_frames=4", "data.stride=3", "eval.n_temporal_views=2", "run.tensorboard=false",
        "text.features=encoder"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    dataset = generate_synthetic_dataset(root, videos_per_class={"test": 2}, classes=CLASSES, num_frames=16,
                                         height=32, width=32, seed=3)
    return dataset


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights file of the demo model (random init, STCA on) with its config inside."""
    path = tmp_path_factory.mktemp("weights") / "final.pt"
    cfg = load_config("demo", TINY)
    from stdd.engine.task import build_model, student_state_dict

    torch.manual_seed(0)
    model, _ = build_model(cfg, "cpu", with_teacher=False)
    return save_weights(path, student_state_dict(model), cfg)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_eval_cli_ep3_style_splits_and_outputs(videos, weights, tmp_path):
    # two "official" test lists over the same classes (EP3 shape) + the full list
    lines = videos.annotation_files["test"].read_text().splitlines()
    first, second = tmp_path / "split1.txt", tmp_path / "split2.txt"
    first.write_text("\n".join(lines[0::2]) + "\n")
    second.write_text("\n".join(lines[1::2]) + "\n")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "stdd.eval", "--checkpoint", str(weights), "--protocol", "ep3",
         "--annotations", str(first), str(second), "--root", str(videos.root), "--classes", str(videos.classes_file),
         "--prompts", str(videos.prompts_file), "--out-dir", str(out), "--quiet"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["num_splits"] == 2 and report["videos"] == 6 and report["videos_failed"] == 0
    assert [s["num_videos"] for s in report["splits"]] == [3, 3]
    assert report["views"] == "2 temporal x 1 spatial"
    assert all(s["top5"] == 100.0 for s in report["splits"])  # 3 classes: top-5 always hits
    assert report["top1_mean"] == pytest.approx(sum(s["top1"] for s in report["splits"]) / 2)
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,videos,correct,top1_accuracy" and len(rows) == 4
    assert sum(int(r.split(",")[1]) for r in rows[1:]) == 6
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_reports_bad_arguments(videos, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "stdd.eval", "--config", "demo", "--protocol", "ep3", "--annotations",
         str(videos.annotation_files["test"]), "--root", str(videos.root), "--classes", str(videos.classes_file),
         "--out-dir", str(tmp_path)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "ep3 needs the official test lists" in result.stderr


def test_predict_cli_on_generated_videos_with_a_broken_one(videos, weights, tmp_path):
    clips = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[:2]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "stdd.predict", *map(str, clips), str(broken), "--classes", ",".join(CLASSES),
         "--checkpoint", str(weights), "--top-k", "2", "--json"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: one video failed, the others are classified
    output = json.loads(result.stdout)
    assert [Path(r["video"]).name for r in output] == [c.name for c in clips] + ["broken.mp4"]
    for entry in output[:2]:
        scores = [p["score"] for p in entry["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert all(p["class"] in CLASSES for p in entry["predictions"]) and 0 < sum(scores) <= 1.0 + 1e-6
    assert "error" in output[2]


def test_predict_python_api_matches_the_cli_and_checks_arguments(videos, weights):
    clip = sorted((videos.root / "videos" / "test").rglob("*.mp4"))[0]
    results = predict([clip], classes=CLASSES, checkpoint=weights, top_k=3, prompts=videos.prompts_file)
    assert len(results) == 1 and len(results[0]["predictions"]) == 3
    assert sum(p["score"] for p in results[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    again = predict(str(clip), classes=",".join(CLASSES), checkpoint=weights, top_k=3,
                         prompts=videos.prompts_file)
    assert again == results  # deterministic in eval mode
    with pytest.raises(ValueError, match="at least two"):
        predict([clip], classes=["only one"], checkpoint=weights)
    with pytest.raises(ValueError, match="no such file"):
        predict([clip.with_name("missing.mp4")], classes=CLASSES, checkpoint=weights)
