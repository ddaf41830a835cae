"""The demo path end to end with a tiny step count (the full demo is run by hand, see README)."""

import json

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from stdd.engine import comparison


def test_demo_smoke_trains_both_variants_and_writes_the_table(tmp_path):
    summary = comparison.run_demo(
        str(tmp_path / "work"),
        [
            "data.synthetic.videos_per_class=2", "data.synthetic.val_videos_per_class=1",
            "data.synthetic.classes=[moving left,moving right]", "data.num_frames=4", "data.stride=3",
            "data.batch_size=2", "optim.epochs=1", "run.tensorboard=false",
        ],
        out=str(tmp_path / "summary.json"),
        quiet=True,
    )
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["results"].keys() == {"stdd", "frame_only"}
    for row in written["results"].values():
        assert row["steps"] == 2 and row["val_videos"] == 2 and 0 <= row["top1"] <= 100
    assert written["stca_minus_frame_only_top1"] == round(
        written["results"]["stdd"]["top1"] - written["results"]["frame_only"]["top1"], 2)
    assert written["config"]["model"]["stca"]["enabled"] is True  # the base config; frame-only overrides it
    frame_only_config = (tmp_path / "work" / "frame_only" / "config.yaml").read_text()
    assert "enabled: false" in frame_only_config
    assert summary["table"][0].split()[:3] == ["model", "top-1", "top-5"]
