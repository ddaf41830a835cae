"""Training counts the videos it could not decode: per epoch in metrics.jsonl and in the run's summary."""

import json

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd.data import generate_synthetic_dataset
from stdd.engine.config import load_config
from stdd.engine.trainer import run_training

CLASSES = ["moving left", "moving right"]


def test_decode_failures_are_counted_per_epoch_and_in_the_summary(tmp_path):
    data = generate_synthetic_dataset(tmp_path / "data", videos_per_class={"train": 3}, classes=CLASSES,
                                      num_frames=16, height=32, width=32, seed=7)
    listed = data.annotation_files["train"].read_text().split()
    broken = data.root / listed[0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: the container cannot be read
    run_dir = tmp_path / "run"
    cfg = load_config("demo", [
        "data.dataset=list", f"data.root={data.root}", f"data.train_annotations={data.annotation_files['train']}",
        f"data.class_names=[{','.join(CLASSES)}]", "text.prompts=templates", "data.num_frames=4", "data.stride=3",
        "data.batch_size=3", "data.num_workers=0", "optim.epochs=2", "run.tensorboard=false",
        "averaging.epochs=null", f"run.output_dir={run_dir}",
    ])
    result = run_training(cfg, quiet=True)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in epochs if record["event"] == "epoch"]
    assert len(epochs) == 2
    for record in epochs:  # the one broken video is drawn once per epoch (each video once per epoch)
        assert record["decode_failures"] == 1 and record["videos_failed"] == 1, record
    assert result["decode_failures"] == 2 and result["videos_failed"] == 1  # the same video both times
