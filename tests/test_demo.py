"""The demo path end to end with a tiny step count (the full demo is run by hand, see README)."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from test_train_resume import REPO, _env, tiny_overrides

from stdd.engine import checkpoint as ckpt
from stdd.engine import comparison
from stdd.errors import UsageError

TINY_DEMO = [
    "data.synthetic.videos_per_class=2", "data.synthetic.val_videos_per_class=1",
    "data.synthetic.classes=[moving left,moving right]", "data.num_frames=4", "data.stride=3",
    "data.batch_size=2", "optim.epochs=1", "run.tensorboard=false",
]


def test_demo_smoke_trains_both_variants_and_writes_the_table(tmp_path):
    summary = comparison.run_demo(
        str(tmp_path / "work"),
        TINY_DEMO,
        out=str(tmp_path / "summary.json"),
        quiet=True,
    )
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["results"].keys() == {"stdd", "frame_only"}
    for row in written["results"].values():
        assert row["steps"] == 2 and row["val_videos"] == 2 and 0 <= row["top1"] <= 100
        assert row["resumed_from"] is None
    assert written["stca_minus_frame_only_top1"] == round(
        written["results"]["stdd"]["top1"] - written["results"]["frame_only"]["top1"], 2)
    assert written["config"]["model"]["stca"]["enabled"] is True  # the base config; frame-only overrides it
    frame_only_config = (tmp_path / "work" / "frame_only" / "config.yaml").read_text()
    assert "enabled: false" in frame_only_config
    assert summary["table"][0].split()[:3] == ["model", "top-1", "top-5"]
    # the report: what the numbers mean, per class, and where every file is
    report = "\n".join(summary["table"])
    assert "chance is 50.0%" in report and "never its direction (moving left from moving right)" in report
    assert "window-shift masking 0.5 of each 2x2 window, continual mixing at scales (1, 2)" in report
    for name, row in written["results"].items():
        run = tmp_path / "work" / name
        assert row["confusion_png"] == str(run / "confusion.png") and (run / "confusion.png").read_bytes()[:4] == b"\x89PNG"
        per_class = (run / "per_class.csv").read_text().splitlines()
        assert per_class[0] == "class,videos,correct,top1_accuracy" and len(per_class) == 3
        assert set(row["per_class_top1"]) == {"moving left", "moving right"}
        assert sum(row["per_class_top1"].values()) / 2 == pytest.approx(row["top1"], abs=0.01)  # one video each
        assert f"{name}: {run} (config.yaml, metrics.jsonl, final.pt); confusion matrix {run / 'confusion.png'}" in report
    assert "TensorBoard" not in report  # run.tensorboard=false: no logs to point at

    # a second demo in the same directory starts its own (marked) runs over
    for name in comparison.VARIANTS:
        assert (tmp_path / "work" / name / comparison.DEMO_MARKER).is_file()
    (tmp_path / "work" / "stdd" / "left-over").write_text("from the first demo")
    again = comparison.run_demo(str(tmp_path / "work"), TINY_DEMO, quiet=True)
    assert again["results"]["stdd"]["steps"] == 2 and not (tmp_path / "work" / "stdd" / "left-over").exists()


def test_the_demo_preset_is_the_papers_stca_and_no_masking_is_a_variant(tmp_path):
    from stdd.engine.config import load_config
    from stdd.model import STCASettings

    paper, defaults = load_config("demo").model.stca, STCASettings()
    assert (tuple(paper.window), paper.mask_ratio, tuple(paper.scales), paper.mixing, paper.mask_rounding) == (
        defaults.window, defaults.mask_ratio, defaults.scales, defaults.mixing, defaults.mask_rounding)
    assert (tuple(paper.window), paper.mask_ratio, tuple(paper.scales), paper.mixing) == ((2, 2), 0.5, (1, 2), "continual")
    assert load_config("demo_no_masking").model.stca.mask_ratio == 0.0

    summary = comparison.run_demo(str(tmp_path / "work"), TINY_DEMO, quiet=True, variant="no-masking")
    assert summary["variant"] == "no-masking" and summary["config"]["model"]["stca"]["mask_ratio"] == 0.0
    assert "no window-shift masking" in "\n".join(summary["table"])
    with pytest.raises(UsageError, match="--variant 'papr': expected one of paper, no-masking"):
        comparison.run_demo(str(tmp_path / "other"), TINY_DEMO, quiet=True, variant="papr")
    assert not (tmp_path / "other").exists()
    result = _demo(["--variant", "papr", "--work-dir", str(tmp_path / "other")])
    assert result.returncode == 2 and "papr" in result.stderr and not (tmp_path / "other").exists()


def _demo(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stdd.demo", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_the_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    from stdd.engine.config import load_config
    from stdd.engine.trainer import run_training

    work = tmp_path / "work"
    run = work / "stdd"  # a real training run where the demo would put its STDD run
    run_training(load_config("demo", tiny_overrides(tmp_path / "data", run, epochs=1)), quiet=True)
    before = {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert {"config.yaml", "final.pt"} <= {str(p) for p in before}

    result = _demo(["--work-dir", str(work), "--quiet", *TINY_DEMO])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --work-dir: {run} exists and was not made by the demo (it has no "
                     f"{comparison.DEMO_MARKER} file): it is left untouched; choose another --work-dir or move it away"]
    after = {p.relative_to(run): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_a_killed_demo_continues_with_resume(tmp_path):
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "--quiet", *TINY_DEMO, "data.synthetic.videos_per_class=4", "optim.epochs=6",
            "checkpoint.every_steps=2"]
    demo = subprocess.Popen([sys.executable, "-m", "stdd.demo", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and demo.poll() is None and not ckpt.list_checkpoints(work / "stdd" / "checkpoints"):
            time.sleep(0.01)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGKILL)
        demo.communicate(timeout=60)
    assert demo.returncode == -signal.SIGKILL, "the demo ended before it could be killed"
    step = ckpt.find_latest_checkpoint(work / "stdd" / "checkpoints")[1]["global_step"]

    resumed = _demo(args + ["--resume", "--out", str(tmp_path / "summary.json")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())["results"]
    assert ckpt.parse_checkpoint_name(rows["stdd"]["resumed_from"].rsplit("/", 1)[1])[1] == step
    assert rows["frame_only"]["resumed_from"] is None  # it had not started
    assert rows["stdd"]["steps"] == rows["frame_only"]["steps"] == 24  # 8 videos / batch 2 x 6 epochs
