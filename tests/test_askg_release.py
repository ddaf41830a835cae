"""``python -m stdd.askg import-release``: the authors' three YAML knowledge files, written here in their
format, into this project's graph and prompt files, which ``stdd.eval --prompts`` then loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stdd.askg.cli import main
from stdd.askg.release import (
    RELEASE_SETS, RELEASE_TEMPLATE_COUNT, ReleaseFormatError, import_release, match_key, parse_triple, release_prompts,
)
from stdd.knowledge.schema import validate_askg_document
from stdd.resources import class_names, display_name

REPO = Path(__file__).resolve().parents[1]

# The release's files as it writes them: title-case names, triples as "<a, relation, b>" strings (one with
# two parts, one with four), a comment line, and one class this project's UCF101 list does not have.
ASKG_YAML = """\
# classes_ASKG_ucf101.yml
Apply Eye Makeup:
  label: Apply Eye Makeup
  obj_en_li: [eyeliner, mirror, eye, brush, eyelid]
  obj_rel_triples:
    - "<eyeliner, applied to, eyelid>"
    - "<brush, held near, eye>"
    - "<mirror, reflects, eye>"
    - "<eyeliner, mirror>"
  act_obj_triples:
    - "<looking into mirror, uses, mirror>"
  sub_act_en_li: [looking into mirror, opening eyeliner, drawing line]
  act_rel_triples:
    - "<looking into mirror, precedes, opening eyeliner>"
    - "<opening eyeliner, precedes, drawing line>"
Archery:
  label: Archery
  obj_en_li: [bow, arrow, target, quiver, archer]
  obj_rel_triples:
    - "<arrow, placed on, bow>"
    - "<arrow, flies to, target>"
    - "<quiver, holds, arrow>"
  act_obj_triples:
    - "<drawing the string, uses, bow>"
    - "<aiming, at, target, slowly>"
  sub_act_en_li: [nocking the arrow, drawing the string, aiming, releasing]
  act_rel_triples:
    - "<nocking the arrow, precedes, drawing the string>"
    - "<drawing the string, precedes, aiming>"
    - "<aiming, precedes, releasing>"
Yo Yo:
  label: Yo Yo
  obj_en_li: [yo-yo, string, hand, finger, floor]
  obj_rel_triples:
    - "<string, tied to, finger>"
    - "<yo-yo, hangs from, string>"
    - "<hand, holds, yo-yo>"
  act_obj_triples:
    - "<throwing down, uses, yo-yo>"
  sub_act_en_li: [winding, throwing down, pulling back]
  act_rel_triples:
    - "<winding, precedes, throwing down>"
    - "<throwing down, precedes, pulling back>"
Flying Carpet:
  label: Flying Carpet
  obj_en_li: [carpet]
  obj_rel_triples: []
  act_obj_triples: []
  sub_act_en_li: []
  act_rel_triples: []
"""

XPROMPT_YAML = """\
# This is an example of apply eye makeup...
Apply Eye Makeup:
  label: Apply Eye Makeup
  xprompt_oo:
    - where eyeliner is applied to the eyelid
    - where a brush is held near the eye
    - where a mirror reflects the eye
  xprompt_ao:
    - which uses a mirror
  xprompt_aa:
    - where looking into the mirror precedes opening the eyeliner
    - where opening the eyeliner precedes drawing a line
Yo Yo:
  label: Yo Yo
  xprompt_oo:
    - where the string is tied to a finger
    - where the yo-yo hangs from the string
    - where a hand holds the yo-yo
  xprompt_ao:
    - which uses a yo-yo
    - where the yo-yo hangs from the string
  xprompt_aa:
    - where winding precedes throwing down
    - where throwing down precedes pulling back
Archery:
  label: Archery
  xprompt_oo:
    - where an arrow is placed on the bow
    - where the arrow flies to the target
    - where a quiver holds arrows
  xprompt_ao:
    - which uses a bow
  xprompt_aa:
    - where nocking the arrow precedes drawing the string
    - where drawing the string precedes aiming
"""

TEMPLATES = [f"template {i} {{}}." for i in range(10)]
LABELS_YAML = "classes:\n" + "".join(f"  - {c}\n" for c in ("Apply Eye Makeup", "Archery", "Yo Yo")) + \
    "templates:\n" + "".join(f"  - '{t}'\n" for t in TEMPLATES) + "obj_templates:\n  - 'a photo of {}.'\n"


@pytest.fixture
def release_files(tmp_path):
    files = {}
    for name, text in (("askg", ASKG_YAML), ("xprompt", XPROMPT_YAML), ("labels", LABELS_YAML)):
        files[name] = tmp_path / f"classes_{name}_ucf101.yml"
        files[name].write_text(text, encoding="utf-8")
    return files


def test_names_triples_and_the_release_prompt_rule():
    assert match_key("Apply Eye Makeup") == match_key("ApplyEyeMakeup")
    assert match_key("Brush Hair") == match_key("brush_hair")
    assert match_key("Massaging Person'S Head") == match_key("massaging person's head")
    for dataset in RELEASE_SETS:  # every class of each set, spaced and title-cased, maps back to itself alone
        names = class_names(dataset)
        keys = {match_key(display_name(dataset, name).title()): name for name in names}
        assert len(keys) == len(names) and all(keys[match_key(name)] == name for name in names)
    assert parse_triple("<beer, poured into,  glass>") == ["beer", "poured into", "glass"]
    assert parse_triple("beer, in, bottle") == ["beer", "in", "bottle"]
    for bad in ("<glass, held by>", "<a, b, c, d>", "<a, , c>", None, 3):
        assert parse_triple(bad) is None
    # per template: the plain prompt first, then one per clause; a repeat is kept once
    assert release_prompts("Archery", ["where a bow is held", "which uses a bow", "where a bow is held"],
                           ["a video of a person {}.", "an example of {}."]) == [
        "a video of a person Archery.", "a video of a person Archery, where a bow is held.",
        "a video of a person Archery, which uses a bow.",
        "an example of Archery.", "an example of Archery, where a bow is held.", "an example of Archery, which uses a bow.",
    ]


def test_import_maps_classes_counts_malformed_triples_and_builds_prompts_the_release_way(release_files):
    result = import_release(release_files["askg"], release_files["xprompt"], dataset="ucf101",
                            labels=release_files["labels"])
    report = result.report
    ucf = class_names("ucf101")
    xmix = result.prompts["prompts.json"]
    assert list(xmix) == ["ApplyEyeMakeup", "Archery", "YoYo"]  # project names, project class order
    assert report["release_classes_unmatched"] == {"--askg": ["Flying Carpet"], "--xprompt": []}
    assert report["project_classes_missing"] == [n for n in ucf if n not in xmix] and len(result.missing) == 98
    assert report["malformed_triples"] == {"object_object": 1, "action_object": 1, "action_action": 0}
    assert report["malformed_triple_examples"] == ["Apply Eye Makeup: '<eyeliner, mirror>'",
                                                   "Archery: '<aiming, at, target, slowly>'"]
    # the release's runs: the first 8 templates, xmix = oo, ao, aa in file order, plain prompt first
    templates = TEMPLATES[:RELEASE_TEMPLATE_COUNT]
    assert report["templates"] == templates
    clauses = ["where the string is tied to a finger", "where the yo-yo hangs from the string",
               "where a hand holds the yo-yo", "which uses a yo-yo",  # the ao repeat of an oo clause: once
               "where winding precedes throwing down", "where throwing down precedes pulling back"]
    expected = [sentence for template in templates
                for sentence in [template.format("Yo Yo")] + [template.format(f"Yo Yo, {c}") for c in clauses]]
    assert xmix["YoYo"] == expected
    assert result.prompts["prompts_spatial.json"]["Archery"][:4] == [
        "template 0 Archery.", "template 0 Archery, where an arrow is placed on the bow.",
        "template 0 Archery, where the arrow flies to the target.", "template 0 Archery, where a quiver holds arrows."]
    assert result.prompts["prompts_temporal.json"]["Archery"][:2] == [
        "template 0 Archery.", "template 0 Archery, which uses a bow."]
    # the --xprompt entries are not in --labels order (the release pairs them by position)
    assert len(report["xprompt_entries_out_of_label_order"]) == 2
    # the graphs in this project's format: triples parsed, malformed ones out, sentences of the clauses
    graph = result.document["classes"]["Archery"]
    assert graph["relations"]["action_object"] == [["drawing the string", "uses", "bow"]]
    assert graph["prompts"]["spatial"][0] == "This is a video of archery, where an arrow is placed on the bow."
    assert graph["prompts"]["temporal"][-1] == "This is a video of archery, where drawing the string precedes aiming."
    errors = validate_askg_document(result.document, "askg.json", require_complete=False)
    assert not [e for e in errors if "Archery" in e]  # a graph meeting the schema imports as one
    # imported, but outside this project's schema: its temporal clauses do not spell its sub-actions
    assert report["classes_outside_the_graph_schema"] == {
        "ApplyEyeMakeup": ["class 'ApplyEyeMakeup'.prompts.temporal: no sentence names a sub-action"]}


def test_cli_writes_prompts_that_stdd_eval_loads(release_files, tmp_path):
    pytest.importorskip("omegaconf")
    pytest.importorskip("open_clip")
    pytest.importorskip("av")
    from stdd.data import generate_synthetic_dataset

    out = tmp_path / "imported"
    status = main(["import-release", "--askg", str(release_files["askg"]), "--xprompt", str(release_files["xprompt"]),
                   "--labels", str(release_files["labels"]), "--set", "ucf101", "--out", str(out)])
    assert status == 1  # 98 UCF101 classes have no knowledge in these small files
    for name in ("askg.json", "prompts.json", "prompts_spatial.json", "prompts_temporal.json", "report.json"):
        assert (out / name).is_file()
    assert json.loads((out / "report.json").read_text())["malformed_triples"]["object_object"] == 1

    # three generated videos labelled with the imported UCF101 classes, evaluated with the imported prompts
    videos = generate_synthetic_dataset(tmp_path / "videos", videos_per_class={"test": 1},
                                        classes=["moving left", "moving right", "growing"], num_frames=16,
                                        height=32, width=32, seed=0)
    classes = ["ApplyEyeMakeup", "Archery", "YoYo"]
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    lines = videos.annotation_files["test"].read_text().splitlines()
    (tmp_path / "test.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "stdd.eval", "--config", "demo", "--protocol", "ep2", "--annotations",
         str(tmp_path / "test.txt"), "--format", "list", "--root", str(videos.root), "--classes",
         str(tmp_path / "classes.txt"), "--prompts", str(out / "prompts.json"), "--out-dir", str(tmp_path / "eval"),
         "--quiet", "data.num_frames=2", "data.stride=4", "eval.n_temporal_views=1", "run.tensorboard=false",
         "text.features=encoder"],  # the demo preset's orthogonal features would not read the prompts
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["videos"] == 3 and report["videos_failed"] == 0


def test_bad_release_files_are_named(release_files, tmp_path, capsys):
    args = ["import-release", "--askg", str(release_files["askg"]), "--xprompt", str(release_files["xprompt"]),
            "--set", "ucf101", "--out", str(tmp_path / "out")]
    broken = tmp_path / "broken.yml"
    broken.write_text("Archery: [unclosed\n")
    assert main([*args[:4], str(broken), *args[5:]]) == 2
    assert f"--xprompt {broken}: not valid YAML" in capsys.readouterr().err
    missing = tmp_path / "nothing.yml"
    assert main(["import-release", "--askg", str(missing), *args[3:]]) == 2
    assert f"--askg {missing}: no such file" in capsys.readouterr().err
    broken.write_text("Archery:\n  label: Archery\n  xprompt_oo: where a bow is held\n")
    with pytest.raises(ReleaseFormatError, match=r"--xprompt .*class 'Archery': xprompt_oo must be a list"):
        import_release(release_files["askg"], broken, dataset="ucf101")
    broken.write_text("- Archery\n- Yo Yo\n")
    with pytest.raises(ReleaseFormatError, match=r"--askg .*expected a mapping of classes"):
        import_release(broken, release_files["xprompt"], dataset="ucf101")
    broken.write_text("classes: [Archery]\ntemplates: ['a video of {} and {}.']\n")
    with pytest.raises(ReleaseFormatError, match=r"--labels .*needs exactly one"):
        import_release(release_files["askg"], release_files["xprompt"], dataset="ucf101", labels=broken)
    with pytest.raises(ReleaseFormatError, match="--set 'k600'"):
        import_release(release_files["askg"], release_files["xprompt"], dataset="k600")
    with pytest.raises(ReleaseFormatError, match="--templates"):
        import_release(release_files["askg"], release_files["xprompt"], dataset="ucf101", num_templates=0)
    # a repeated top-level key (the release's files are answers appended one after another) is reported
    repeated = tmp_path / "repeated.yml"
    repeated.write_text(XPROMPT_YAML + XPROMPT_YAML.split("Archery:\n")[0].split("# This is an example of apply eye makeup...\n")[1])
    report = import_release(release_files["askg"], repeated, dataset="ucf101").report
    assert report["repeated_keys"]["--xprompt"] == ["Apply Eye Makeup", "Yo Yo"]
    # without --labels: this project's templates, said so
    assert report["template_source"].startswith("no --labels")


# The release's graphs as its files write them: the class itself the subject of its action-object relations and
# the first of its action-action relations, and a relation to an entity in neither list.
PAPER_SHAPE_ASKG = """\
archery:
  label: archery
  obj_en_li: [bow, arrow, target, quiver, arm guard]
  obj_rel_triples:
    - <arrow, placed on, bow>
    - <quiver, holds, arrow>
    - <arm guard, worn for, safety>
    - <bow, used in, archery>
  act_obj_triples:
    - <archery, requires, bow>
    - <archery, aims at, target>
  sub_act_en_li: [nocking the arrow, drawing the string, releasing the arrow]
  act_rel_triples:
    - <archery, starts with, nocking the arrow>
    - <nocking the arrow, precedes, drawing the string>
    - <drawing the string, precedes, releasing the arrow>
"""
PAPER_SHAPE_XPROMPT = """\
archery:
  label: archery
  xprompt_oo:
    - where an arrow is placed on the bow
    - where a quiver holds the arrow
    - where an arm guard is worn for safety
  xprompt_ao:
    - which requires a bow
  xprompt_aa:
    - starting with nocking the arrow
    - where nocking the arrow precedes drawing the string
"""


def test_the_release_graph_shape_meets_the_schema_and_unlisted_entities_are_reported(tmp_path):
    askg, xprompt = tmp_path / "classes_ASKG_ucf101.yml", tmp_path / "classes_xprompt_ucf101.yml"
    askg.write_text(PAPER_SHAPE_ASKG)
    xprompt.write_text(PAPER_SHAPE_XPROMPT)
    out = tmp_path / "out"
    assert main(["import-release", "--askg", str(askg), "--xprompt", str(xprompt), "--set", "ucf101",
                 "--out", str(out)]) == 1  # the other 100 classes have no knowledge here
    report = json.loads((out / "report.json").read_text())
    assert report["classes_outside_the_graph_schema"] == {}
    assert report["relations_to_unlisted_entities"] == {"Archery": [
        "class 'Archery'.relations.object_object[2]: object 'safety' is in neither objects nor sub_actions "
        "(nor the class)"]}
    graph = json.loads((out / "askg.json").read_text())["classes"]["Archery"]
    assert graph["relations"]["action_object"][0] == ["archery", "requires", "bow"]
    assert validate_askg_document(json.loads((out / "askg.json").read_text()), "askg.json",
                                  require_complete=False) == []


def hmdb51_release_files(tmp_path, drop=None):
    """The release's three HMDB51 files, in its format and order, with the four classes its clause and graph files
    write otherwise than its label file: ``chew`` labelled ``chewing``, ``falling to the floor`` for ``fall floor``,
    ``shooting gun`` and ``waving``; ``drop`` leaves one class's entries out of both files."""
    written = [display_name("hmdb51", name) for name in class_names("hmdb51")]  # "brush hair", ..., "fall floor"
    keys = {"fall floor": "falling to the floor"}
    labels = {"chew": "chewing", "fall floor": "falling to the floor", "shoot gun": "shooting gun", "wave": "waving"}
    askg, xprompt = [], []
    for c in written:
        if c == drop:
            continue
        key, node = keys.get(c, c), keys.get(c, c)
        word = c.split()[-1]
        askg.append(f"{key}:\n  label: {key}\n  obj_en_li: [{word} thing, hand, arm, floor, person]\n"
                    f"  obj_rel_triples:\n  - <hand, holds, {word} thing>\n  - <arm, moves, hand>\n"
                    f"  - <person, stands on, floor>\n"
                    f"  act_obj_triples:\n  - <{node}, involves, {word} thing>\n  - <{node}, needs, hand>\n"
                    f"  sub_act_en_li: [reaching out, holding on, letting go]\n"
                    f"  act_rel_triples:\n  - <{node}, starts with, reaching out>\n"
                    f"  - <reaching out, precedes, holding on>\n  - <holding on, precedes, letting go>\n")
        xprompt.append(f"# This is an example of {labels.get(c, c)}...\n{key}:\n  label: {labels.get(c, c)}\n"
                       f"  xprompt_oo:\n    - where a hand holds the {word} thing\n    - where an arm moves the hand\n"
                       f"    - where a person stands on the floor\n"
                       f"  xprompt_ao:\n    - which involves the {word} thing\n"
                       f"  xprompt_aa:\n    - starting with reaching out\n    - where reaching out precedes holding on\n")
    files = {"askg": "\n".join(askg), "xprompt": "\n".join(xprompt),
             "labels": "classes:\n" + "".join(f"- {c}\n" for c in written) + "templates:\n- a video of {}.\n"}
    paths = {}
    tmp_path.mkdir(exist_ok=True)
    for kind, text in files.items():
        paths[kind] = tmp_path / f"classes_{kind}_hmdb51.yml"
        paths[kind].write_text(text)
    return paths


def test_hmdb51_entries_named_otherwise_are_matched_and_reported(tmp_path):
    files = hmdb51_release_files(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "stdd.askg", "import-release", "--askg", str(files["askg"]), "--xprompt",
         str(files["xprompt"]), "--labels", str(files["labels"]), "--set", "hmdb51", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # all 51 classes have prompts
    report = json.loads((out / "report.json").read_text())
    assert report["classes_with_prompts"] == report["classes_with_graphs"] == 51
    assert report["release_classes_unmatched"] == {"--askg": [], "--xprompt": []}
    fall = {"entry": "falling to the floor", "label": "falling to the floor", "class": "fall_floor",
            "matched_by": "position", "position": 12, "label_file_class": "fall floor"}
    assert report["release_entries_matched_inexactly"] == {"--askg": [fall], "--xprompt": [
        {"entry": "chew", "label": "chewing", "class": "chew", "matched_by": "key", "position": 3}, fall,
        {"entry": "shoot gun", "label": "shooting gun", "class": "shoot_gun", "matched_by": "key", "position": 36},
        {"entry": "wave", "label": "waving", "class": "wave", "matched_by": "key", "position": 50}]}
    assert report["xprompt_entries_out_of_label_order"] == []
    for line in ("--xprompt: 4 entries matched other than by their exact name",
                 "'chew' (label 'chewing') -> chew: by its key; its label differs",
                 "'falling to the floor' -> fall_floor: by its position 12, as the release pairs it "
                 "(--labels class 'fall floor')",
                 "'shoot gun' (label 'shooting gun') -> shoot_gun:", "'wave' (label 'waving') -> wave:",
                 "--askg: 1 entries matched other than by their exact name"):
        assert line in result.stderr, result.stderr
    # the release's prompts name the class as its label file does; the graph's class node is the class
    prompts = json.loads((out / "prompts.json").read_text())
    assert list(prompts) == class_names("hmdb51")
    assert prompts["fall_floor"][:2] == ["a video of fall floor.", "a video of fall floor, where a hand holds the floor thing."]
    assert prompts["chew"][0] == "a video of chew."
    graph = json.loads((out / "askg.json").read_text())["classes"]["fall_floor"]
    assert graph["relations"]["action_object"][0] == ["fall floor", "involves", "floor thing"]
    assert graph["relations"]["action_action"][0] == ["fall floor", "starts with", "reaching out"]
    assert report["classes_outside_the_graph_schema"] == {} and report["relations_to_unlisted_entities"] == {}

    # by position only as the release pairs them: when the label file has as many classes as the file entries
    short = hmdb51_release_files(tmp_path / "short", drop="kiss")
    result = import_release(short["askg"], short["xprompt"], dataset="hmdb51", labels=short["labels"])
    assert result.report["release_classes_unmatched"] == {"--askg": ["falling to the floor"],
                                                          "--xprompt": ["falling to the floor"]}
    assert result.missing == ["fall_floor", "kiss"]
    # without --labels: key, label and normalised name only
    result = import_release(files["askg"], files["xprompt"], dataset="hmdb51")
    assert result.missing == ["fall_floor"] and len(result.report["release_entries_matched_inexactly"]["--xprompt"]) == 3
    # two entries for one class: the one matched the earlier way keeps it, the other is reported
    files["xprompt"].write_text(files["xprompt"].read_text() + "\nchewing:\n  label: chew\n  xprompt_oo: []\n")
    result = import_release(files["askg"], files["xprompt"], dataset="hmdb51", labels=files["labels"])
    assert result.report["release_classes_unmatched"]["--xprompt"] == ["falling to the floor", "chewing (label 'chew')"]
    assert [note for note in result.report["notes"] if "'chew'" in note] == [
        "--xprompt: entry 'chewing' is 'chew' by its label, but entry 'chew' is, by its key; 'chew' is kept for it"]
