"""ASKG schema validator: each rule catches its violation; the shipped files validate."""

from __future__ import annotations

import copy
import json

import pytest

from stdd.resources import ASKG_DIR, ASKG_SETS, class_names, display_name
from stdd.knowledge.schema import (
    check_prompt, validate_askg_document, validate_askg_file, validate_graph, validate_stage1,
)

ARCHERY = {
    "class": "archery",
    "objects": ["bow", "arrow", "target", "bowstring", "quiver", "arm guard"],
    "sub_actions": ["nocking the arrow", "drawing the bowstring", "aiming at the target", "releasing the arrow"],
    "relations": {
        "object_object": [["arrow", "rests on", "bow"], ["bowstring", "attached to", "bow"], ["quiver", "holds", "arrow"]],
        "action_object": [["drawing the bowstring", "pulls back", "bowstring"]],
        "action_action": [["nocking the arrow", "comes before", "drawing the bowstring"],
                          ["aiming at the target", "comes before", "releasing the arrow"]],
    },
    "prompts": {
        "spatial": ["This is a video of archery, where the arrow rests on the bow.",
                    "This is a video of archery, where the bowstring is attached to the bow.",
                    "This is a video of archery, where the quiver holds the arrows."],
        "temporal": ["This is a video of archery, where aiming at the target comes before releasing the arrow.",
                     "This is a video of archery, where nocking the arrow comes before drawing the bowstring.",
                     "This is a video of archery, where drawing the bowstring pulls back the bowstring."],
    },
}


def broken(edit):
    graph = copy.deepcopy(ARCHERY)
    edit(graph)
    return validate_graph(graph, "k400", "archery")


def test_valid_graph_has_no_errors():
    assert validate_graph(ARCHERY, "k400", "archery") == []
    stage1 = {k: ARCHERY[k] for k in ("objects", "sub_actions", "relations")}
    assert validate_stage1(stage1, "archery") == []


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.__setitem__("objects", g["objects"][:4]), "4 entries, expected 5-10"),
    (lambda g: g["objects"].extend(f"thing {i}" for i in range(5)), "11 entries, expected 5-10"),
    (lambda g: g["objects"].__setitem__(5, "Bow"), "duplicate entry 'Bow'"),
    (lambda g: g.__setitem__("sub_actions", g["sub_actions"][:2]), "2 entries, expected 3-10"),
    (lambda g: g["objects"].__setitem__(0, ""), "expected a non-empty string"),
    (lambda g: g.pop("relations"), "missing fields ['relations']"),
    (lambda g: g.__setitem__("extra", 1), "unknown fields ['extra']"),
    (lambda g: g.__setitem__("class", "rowing"), "field 'class' is 'rowing'"),
    (lambda g: g["relations"]["object_object"].pop(), "2 triples, expected at least 3"),
    (lambda g: g["relations"]["action_action"].pop(), "1 triples, expected at least 2"),
    (lambda g: g["relations"].__setitem__("action_object", []), "0 triples, expected at least 1"),
    (lambda g: g["relations"]["object_object"].append(["arrow", "hits", "aiming at the target"]),
     "object 'aiming at the target' is not in objects (it is in sub_actions)"),
    (lambda g: g["relations"]["action_object"].append(["bow", "holds", "arrow"]),
     "subject 'bow' is not in sub_actions (it is in objects)"),
    (lambda g: g["relations"]["action_action"].append(["nocking the arrow", "before", "bow"]),
     "object 'bow' is not in sub_actions"),
    (lambda g: g["relations"]["action_object"].append(["archery", "needs", "archery"]),
     "subject and object are the same ('archery')"),
    (lambda g: g["relations"]["object_object"].append(["arrow", "", "bow"]), "non-empty strings"),
    (lambda g: g["relations"]["object_object"].append(["arrow", "rests on"]), "non-empty strings"),
    (lambda g: g["relations"]["object_object"].append(["arrow", "rests on", "bow"]), "duplicate triple"),
    (lambda g: g["relations"]["object_object"].append(["arrow", "touches", "arrow"]), "subject and object are the same"),
    (lambda g: g["prompts"]["spatial"].pop(), "2 sentences, expected at least 3"),
    (lambda g: g["prompts"]["temporal"].__setitem__(0, "Archery is a sport where aiming comes first."),
     "must start with 'This is a video of archery,'"),
    (lambda g: g["prompts"]["spatial"].__setitem__(0, "This is a video of archery, where the arrow rests. The bow is wood."),
     "single sentence"),
    (lambda g: g["prompts"]["spatial"].__setitem__(0, "This is a video of archery, where the arrow rests on the bow"),
     "must end with '.'"),
    (lambda g: g["prompts"]["spatial"].__setitem__(0, "This is a video of archery, where people enjoy the sport."),
     "names no object of the graph"),
    (lambda g: g["prompts"]["spatial"].__setitem__(1, g["prompts"]["spatial"][0]), "duplicate sentence"),
    (lambda g: g["prompts"]["temporal"].__setitem__(slice(None), [
        "This is a video of archery, where the bow bends.", "This is a video of archery, where the arrow flies.",
        "This is a video of archery, where the target shakes."]), "no sentence names a sub-action"),
])
def test_each_rule_is_enforced(edit, message):
    errors = broken(edit)
    assert any(message in e for e in errors), errors


def test_the_class_is_a_node_of_its_graph_and_unlisted_entities_are_noted(tmp_path, capsys):
    """The paper's graph shape: the action class with edges to its objects and sub-actions, and
    relations to entities outside the lists, are valid; the latter are reported as notes."""
    graph = copy.deepcopy(ARCHERY)
    graph["relations"]["action_object"] += [["archery", "requires", "bow"], ["ARCHERY", "uses", "quiver"]]
    graph["relations"]["action_action"].insert(0, ["archery", "starts with", "nocking the arrow"])
    graph["relations"]["object_object"] += [["bow", "used in", "archery"], ["arm guard", "worn for", "safety"]]
    graph["relations"]["action_object"].append(["releasing the arrow", "aims at", "bullseye"])
    notes = []
    assert validate_graph(graph, "k400", "archery", notes=notes) == []
    assert notes == [
        "class 'archery'.relations.object_object[4]: object 'safety' is in neither objects nor sub_actions (nor the class)",
        "class 'archery'.relations.action_object[3]: object 'bullseye' is in neither objects nor sub_actions "
        "(nor the class)"]
    assert validate_graph(graph, "k400", "archery") == []  # without a notes list: valid all the same
    stage1 = {k: graph[k] for k in ("objects", "sub_actions", "relations")}
    assert validate_stage1(stage1, "archery", "k400") == []
    # the class under its display name (UCF101's CamelCase and HMDB51's underscores as words) and its name
    ucf = copy.deepcopy(graph)
    ucf["class"] = "ApplyEyeMakeup"
    ucf["relations"]["action_object"] = [["apply eye makeup", "requires", "bow"], ["ApplyEyeMakeup", "uses", "arrow"]]
    ucf["prompts"] = {kind: [p.replace("of archery,", "of apply eye makeup,") for p in sentences]
                      for kind, sentences in ucf["prompts"].items()}
    assert validate_graph(ucf, "ucf101", "ApplyEyeMakeup") == []
    hmdb = copy.deepcopy(graph)
    hmdb["class"] = "shoot_bow"
    hmdb["relations"]["action_action"][0] = ["shoot bow", "starts with", "nocking the arrow"]
    hmdb["relations"]["action_object"] = [["shoot_bow", "requires", "bow"]]
    hmdb["prompts"] = {kind: [p.replace("of archery,", "of shoot bow,") for p in sentences]
                       for kind, sentences in hmdb["prompts"].items()}
    assert validate_graph(hmdb, "hmdb51", "shoot_bow") == []
    # another class's name is no node of this graph
    other = copy.deepcopy(graph)
    other["relations"]["action_object"] = [["rowing", "requires", "bow"]]
    notes = []
    assert validate_graph(other, "k400", "archery", notes=notes) == [] and "subject 'rowing'" in notes[1]
    # a file collects its graphs' notes, named by the file
    document = {"schema_version": 1, "dataset": "custom", "provenance": {}, "classes": {"archery": graph}}
    notes = []
    assert validate_askg_document(document, "doc.json", notes=notes) == []
    assert len(notes) == 2 and all(n.startswith("doc.json: class 'archery'.relations.") for n in notes)
    # python -m stdd.askg validate: valid (exit 0), the notes printed
    from stdd.askg import cli as askg_cli

    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document))
    assert askg_cli.main(["validate", str(path)]) == 0
    shown = capsys.readouterr().out
    assert f"{path}: OK" in shown and "2 relation(s) name an entity in neither list" in shown
    assert "note: " + notes[0].replace("doc.json", str(path)) in shown


def test_prompt_rules_use_the_display_name():
    assert display_name("ucf101", "ApplyEyeMakeup") == "apply eye makeup"
    assert display_name("ucf101", "YoYo") == "yo yo"
    assert display_name("hmdb51", "brush_hair") == "brush hair"
    assert display_name("k400", "passing American football (in game)") == "passing American football (in game)"
    assert check_prompt("This is a video of Apply Eye Makeup, where the brush sweeps the eyelid.", "apply eye makeup") is None
    assert "must start" in check_prompt("This is a video of ApplyEyeMakeup, where the brush moves.", "apply eye makeup")
    assert "3 words" in check_prompt("This is a video of archery, ok.", "archery")
    long_sentence = "This is a video of archery, where " + "very " * 50 + "long bow."
    assert "longer than" in check_prompt(long_sentence, "archery")


def test_file_level_checks(tmp_path):
    names = class_names("hmdb51")
    document = {"schema_version": 1, "dataset": "hmdb51",
                "provenance": {"generator": "g", "how": "h", "date": "2026-11-26", "regenerate": "r"},
                "classes": {}}
    errors = validate_askg_document(document, "doc")
    assert any("51 of 51 hmdb51 classes missing" in e for e in errors)
    assert validate_askg_document(document, "doc", require_complete=False) == []
    document["classes"] = {"archery": ARCHERY}
    assert any("not in the hmdb51 list" in e for e in validate_askg_document(document, "doc"))
    bad_version = dict(document, schema_version=2, provenance={"generator": "g"})
    errors = validate_askg_document(bad_version, "doc", require_complete=False)
    assert any("schema_version 2" in e for e in errors) and any("provenance.how" in e for e in errors)
    path = tmp_path / "x.json"
    path.write_text("{not json")
    assert "not valid JSON" in validate_askg_file(path)[0]
    assert len(names) == 51


@pytest.mark.parametrize("dataset", ASKG_SETS)
def test_shipped_askg_file_is_present_and_valid(dataset):
    path = ASKG_DIR / f"{dataset}.json"
    assert path.exists(), f"shipped ASKG file {path} is missing"
    errors = validate_askg_file(path)
    assert errors == [], "\n".join(errors[:30])
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["dataset"] == dataset
    assert list(document["classes"]) == class_names(dataset)


def test_prompt_sources_for_the_text_side(tmp_path):
    from stdd.askg import cli as askg_cli
    from stdd.knowledge import AskgError, load_prompts

    spatial = load_prompts("hmdb51", only="S")
    both = load_prompts("hmdb51", only="ST")
    assert list(both) == class_names("hmdb51")
    assert all(both[c][: len(spatial[c])] == spatial[c] and len(both[c]) > len(spatial[c]) for c in both)
    out = tmp_path / "prompts.json"
    assert askg_cli.main(["prompts", "--graph", "ucf101", "--out", str(out), "--only", "T"]) == 0
    assert load_prompts(out) == load_prompts("ucf101", only="T")
    assert all(p.startswith("This is a video of apply eye makeup, ") for p in load_prompts(out)["ApplyEyeMakeup"])
    (tmp_path / "bad.json").write_text('{"archery": []}')
    with pytest.raises(AskgError, match="archery"):
        load_prompts(tmp_path / "bad.json")
    # the one loader also selects classes, by exact name or plain words, and says which are missing
    hmdb = load_prompts("hmdb51", ["Brush hair", "clap"])
    assert list(hmdb) == ["Brush hair", "clap"] and hmdb["Brush hair"] == both["brush_hair"]
    with pytest.raises(AskgError, match=r"hmdb51.json has no prompts for 1 of 2 classes"):
        load_prompts("hmdb51", ["clap", "archery"])
    assert list(load_prompts("hmdb51", ["clap", "archery"], partial=True)) == ["clap"]
