"""Every file the ASKG tooling reads, damaged: ONE line ``error: ...`` naming the file and what is wrong, exit
status 2, no traceback, nothing written. Real ``python -m stdd.askg`` processes on real files cut short.

(``python -m stdd.askg build`` sets a damaged cache entry of its own directory aside and rebuilds it:
tests/test_askg_pipeline.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stdd.knowledge import load_prompts
from stdd.askg.builder import class_slug
from stdd.knowledge.prompts import PromptSourceError
from stdd.knowledge.schema import validate_askg_file
from stdd.resources import askg_path

REPO = Path(__file__).resolve().parents[1]

GRAPH = {
    "class": "archery",
    "objects": ["bow", "arrow", "target", "bowstring", "quiver"],
    "sub_actions": ["nocking the arrow", "drawing the bowstring", "releasing the arrow"],
    "relations": {
        "object_object": [["arrow", "rests on", "bow"], ["bowstring", "attached to", "bow"], ["quiver", "holds", "arrow"]],
        "action_object": [["drawing the bowstring", "pulls back", "bowstring"]],
        "action_action": [["nocking the arrow", "comes before", "drawing the bowstring"],
                          ["drawing the bowstring", "comes before", "releasing the arrow"]],
    },
    "prompts": {
        "spatial": ["This is a video of archery, where the arrow rests on the bow.",
                    "This is a video of archery, where the bowstring is attached to the bow.",
                    "This is a video of archery, where the quiver holds the arrow."],
        "temporal": ["This is a video of archery, where nocking the arrow comes before drawing the bowstring.",
                     "This is a video of archery, where drawing the bowstring comes before releasing the arrow.",
                     "This is a video of archery, where drawing the bowstring pulls back the bowstring."],
    },
}


def run_askg(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("STDD_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "stdd.askg", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *culprits) -> str:
    """Exit 2 and exactly one stderr line ``error: ...`` naming every culprit; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for culprit in culprits:
        assert str(culprit) in lines[0], lines[0]
    return lines[0]


def cut_at(path: Path, marker: str, extra: int = 0) -> None:
    """Cut ``path`` short: keep its text up to ``extra`` characters past the first ``marker`` (a copy that stopped)."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.index(marker) + extra], encoding="utf-8")


def test_a_damaged_graph_file_is_named_by_every_command(tmp_path):
    graph = tmp_path / "hmdb51.json"
    graph.write_text(askg_path("hmdb51").read_text(encoding="utf-8"), encoding="utf-8")
    cut_at(graph, '"objects"', 9)  # right after a key: "Expecting ':' delimiter"
    out = tmp_path / "prompts.json"
    for args in (("prompts", "--graph", graph, "--out", out), ("inspect", "--graph", graph, "--class", "clap")):
        line = assert_one_line_error(run_askg(*args), f"--graph {graph}", "not valid JSON", "truncated?")
        assert "line " in line and "column " in line
    assert not out.exists()
    # validate: the file named before any other is checked; its own errors are exit status 1, not this
    line = assert_one_line_error(run_askg("validate", "ucf101", graph), graph, "not valid JSON")
    assert run_askg("validate", "ucf101").returncode == 0
    assert validate_askg_file(graph) == [line[len("error: "):]]  # the library says the same, as an error
    graph.write_bytes(b'{"schema_version": 1, "dataset": "hmdb51\xff"}')
    assert_one_line_error(run_askg("prompts", "--graph", graph, "--out", out), graph, "not UTF-8")
    graph.write_text("")
    assert_one_line_error(run_askg("validate", graph), graph, "empty file")


def write_build_dir(root: Path) -> Path:
    (root / "classes").mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "dataset": "custom", "classes": ["archery"],
                                                    "provenance": {}}))
    (root / "classes" / f"{class_slug('archery')}.json").write_text(
        json.dumps({"class": "archery", "result": GRAPH, "provenance": {}}, indent=1))
    return root


def test_a_damaged_build_directory_is_named(tmp_path):
    built = write_build_dir(tmp_path / "built")
    out = tmp_path / "prompts.json"
    good = run_askg("prompts", "--graph", built, "--out", out)
    assert good.returncode == 0, good.stderr
    out.unlink()
    manifest = built / "manifest.json"
    saved = manifest.read_text()
    cut_at(manifest, '"classes"', 4)
    assert_one_line_error(run_askg("prompts", "--graph", built, "--out", out), manifest, "not valid JSON")
    manifest.write_text(json.dumps({"dataset": "custom"}))
    assert_one_line_error(run_askg("inspect", "--graph", built, "--class", "archery"), manifest,
                          "expected a build manifest")
    manifest.write_text(saved)
    cache = built / "classes" / f"{class_slug('archery')}.json"
    cut_at(cache, '"prompts"', 3)
    line = assert_one_line_error(run_askg("prompts", "--graph", built, "--out", out), cache, "not valid JSON",
                                 "python -m stdd.askg build")
    assert "set it aside and rebuild" in line
    with pytest.raises(PromptSourceError, match=str(cache)):  # the library's prompt loader: the same
        load_prompts(built)
    cache.write_text(json.dumps(["archery", GRAPH]))
    assert_one_line_error(run_askg("prompts", "--graph", built, "--out", out), cache, "expected the cache entry")
    assert not out.exists()


RELEASE = {
    "askg": "Archery:\n  label: Archery\n  obj_en_li: [bow, arrow, target, quiver, archer]\n"
            "  obj_rel_triples:\n    - \"<arrow, placed on, bow>\"\n    - \"<quiver, holds, arrow>\"\n",
    "xprompt": "Archery:\n  label: Archery\n  xprompt_oo:\n    - \"where an arrow is placed on the bow\"\n"
               "  xprompt_ao: []\n  xprompt_aa: []\n",
    "labels": "classes:\n  - Archery\ntemplates:\n  - 'a video of a person {}.'\n  - 'an example of {}.'\n",
}
CUT_AT = {"askg": "<quiver", "xprompt": "where an arrow", "labels": "an example"}


@pytest.mark.parametrize("kind", sorted(RELEASE))
def test_cut_release_files_are_named(tmp_path, kind):
    files = {}
    for name, text in RELEASE.items():
        files[name] = tmp_path / f"classes_{name}_ucf101.yml"
        files[name].write_text(text)
    out = tmp_path / "out"
    args = ["import-release", "--set", "ucf101", "--out", out] + [
        item for name in ("askg", "xprompt", "labels") for item in (f"--{name}", files[name])]
    assert run_askg(*args).returncode == 1  # readable: 100 UCF101 classes lack knowledge here
    out_files = sorted(p.name for p in out.iterdir())
    for path in out.iterdir():
        path.unlink()
    out.rmdir()
    assert "report.json" in out_files
    cut_at(files[kind], CUT_AT[kind], 4)
    line = assert_one_line_error(run_askg(*args), f"--{kind} {files[kind]}", "not valid YAML", "truncated?")
    assert "line " in line and "column " in line
    assert not out.exists()
    files[kind].write_text("")
    assert_one_line_error(run_askg(*args), f"--{kind} {files[kind]}", "empty file")
