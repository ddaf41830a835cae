"""ASKG pipeline against a real OpenAI-compatible HTTP server on loopback.

The server (a ThreadingHTTPServer started per test) speaks the chat-completions
API and answers from a script per (class, stage): valid answers, malformed JSON,
missing fields, wrong counts, bad prompts, HTTP 429/500/401. It counts requests
so the tests can tell what a resumed run asked again.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("openai")

from stdd.askg import cli as askg_cli
from stdd.askg import builder as askg_lib
from stdd.askg.builder import AskgBuilder, AskgConfig, AskgError, FatalEndpointError, class_slug
from stdd.knowledge.schema import validate_askg_file, validate_graph

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-NEVER-WRITE-ME-4f9c2b"
CLASSES = ["archery", "rowing", "knitting", "juggling balls", "pole vault"]


# ------------------------------------------------------------------ scripted answers

def knowledge_for(name: str) -> dict:
    """A schema-valid stage-1 answer whose entities are tied to the class name."""
    word = name.split()[0]
    objects = [f"{word} frame", f"{word} handle", f"{word} strap", "left hand", "right hand", "floor mat"]
    actions = [f"gripping the {word} handle", f"lifting the {word} frame", f"lowering the {word} frame",
               "resting the hands"]
    return {
        "objects": objects,
        "sub_actions": actions,
        "relations": {
            "object_object": [[objects[1], "is fixed to", objects[0]], [objects[2], "wraps around", objects[3]],
                              [objects[0], "stands on", objects[5]]],
            "action_object": [[actions[0], "closes around", objects[1]]],
            "action_action": [[actions[0], "comes before", actions[1]], [actions[2], "comes before", actions[3]]],
        },
    }


def prompts_for(name: str) -> dict:
    k = knowledge_for(name)
    lead = f"This is a video of {name}, where"
    return {
        "spatial": [f"{lead} the {s} {p} the {o}." for s, p, o in k["relations"]["object_object"]],
        "temporal": [f"{lead} {s} {p} {o}." for kind in ("action_action", "action_object")
                     for s, p, o in k["relations"][kind]],
    }


@dataclasses.dataclass
class RawAnswer:
    """A response body sent as it is, with its content type and extra headers."""

    body: bytes
    content_type: str = "application/json"
    headers: dict = dataclasses.field(default_factory=dict)


def bad_answer(kind: str, name: str):
    """(http status, message content or error payload) for a scripted failure."""
    k = knowledge_for(name)
    if kind == "malformed":
        return 200, '{"objects": ["bow", "arrow"'                      # truncated JSON
    if kind == "missing_fields":
        return 200, json.dumps({"objects": k["objects"]})
    if kind == "wrong_counts":
        return 200, json.dumps({**k, "objects": k["objects"][:3]})     # 3 < 5 objects
    if kind == "bad_prompts":
        p = prompts_for(name)
        return 200, json.dumps({"spatial": ["A nice video."] + p["spatial"][1:], "temporal": p["temporal"]})
    if kind == "few_prompts":
        p = prompts_for(name)
        return 200, json.dumps({"spatial": p["spatial"][:1], "temporal": p["temporal"]})
    if kind.startswith("429-after-"):  # 429 with Retry-After: N seconds
        error = {"error": {"message": "slow down", "type": "rate_limit", "code": "429"}}
        return 429, RawAnswer(json.dumps(error).encode(), headers={"Retry-After": kind.rsplit("-", 1)[1]})
    if kind == "no_choices":
        return 200, RawAnswer(json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                          "choices": []}).encode())
    if kind == "not_json":
        return 200, RawAnswer(b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    if kind == "paper_shape":  # the paper's graph: the class a node; one relation to an entity in neither list
        relations = k["relations"]
        relations["action_object"].append([name, "requires", k["objects"][0]])
        relations["action_action"].insert(0, [name.upper(), "starts with", k["sub_actions"][0]])
        relations["object_object"].append([k["objects"][2], "worn for", "safety"])
        return 200, json.dumps(k)
    if kind == "echo_key":  # a server that puts the caller's key into its answer
        return 200, json.dumps(knowledge_for(name)).replace("floor mat", f"floor mat {API_KEY}")
    if kind in ("429", "500", "401", "400"):
        return int(kind), {"error": {"message": f"scripted {kind}", "type": "scripted", "code": kind}}
    raise ValueError(kind)


class ScriptedServer:
    """OpenAI chat-completions endpoint on 127.0.0.1 with per-(class, stage) scripts."""

    def __init__(self, script: dict | None = None, default: str = "valid", delay_s: float = 0.0):
        self.script = {key: list(actions) for key, actions in (script or {}).items()}
        self.default = default
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server.answer(self.path, self.headers, body)
                raw = payload if isinstance(payload, RawAnswer) else RawAnswer(json.dumps(payload).encode())
                data = raw.body
                self.send_response(status)
                self.send_header("Content-Type", raw.content_type)
                self.send_header("Content-Length", str(len(data)))
                for header, value in raw.headers.items():
                    self.send_header(header, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client process was killed mid-request (resume test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def parse(body: dict) -> tuple[str, str]:
        first_user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        name = re.search(r"^Action class: (.+)$", first_user, flags=re.M).group(1)
        stage = "stage2" if "Relation triples" in first_user else "stage1"
        return name, stage

    def count(self, name: str | None = None, stage: str | None = None) -> int:
        return sum(1 for r in self.requests
                   if (name is None or r["class"] == name) and (stage is None or r["stage"] == stage))

    def answer(self, path: str, headers, body: dict):  # headers: the request's (case-insensitive)
        name, stage = self.parse(body)
        with self.lock:  # recorded on arrival, so a request whose client died still counts
            self.requests.append({"class": name, "stage": stage, "path": path, "body": body,
                                  "authorization": headers.get("Authorization")})
            actions = self.script.get((name, stage))
            action = actions.pop(0) if actions else self.default
        if self.delay_s:
            time.sleep(self.delay_s)
        if action == "echo_headers":  # an error that shows the request's path and headers (as some proxies do)
            return 500, {"error": {"message": f"upstream refused {path}; request headers: {json.dumps(dict(headers))}",
                                   "type": "scripted", "code": "500"}}
        if action == "valid":
            content = json.dumps(knowledge_for(name) if stage == "stage1" else prompts_for(name))
            status = 200
        else:
            status, content = bad_answer(action, name)
        if status != 200 or isinstance(content, RawAnswer):
            return status, content
        return 200, {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                     "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}


@pytest.fixture
def server_factory():
    servers = []

    def make(**kwargs):
        server = ScriptedServer(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def make_builder(server, **overrides) -> AskgBuilder:
    config = dict(model="test-model", base_url=server.base_url, concurrency=2, retries=3,
                  backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=10.0)
    config.update(overrides)
    return AskgBuilder(AskgConfig(**config), api_key=API_KEY)


def assert_key_absent(out_dir: Path, *texts: str) -> None:
    for path in out_dir.rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(encoding="utf-8", errors="replace"), path
    for text in texts:
        assert API_KEY not in text


# ------------------------------------------------------------------ tests

def test_valid_answers_build_validated_graphs_and_prompt_lists(server_factory, tmp_path, capsys):
    server = server_factory()
    report = make_builder(server).build(CLASSES, tmp_path / "out", dataset="custom")
    assert report.ok and sorted(report.built) == sorted(CLASSES) and report.cached == []
    assert server.count() == 2 * len(CLASSES) == report.requests
    # The key reached the endpoint (the client used it) ...
    assert {r["authorization"] for r in server.requests} == {f"Bearer {API_KEY}"}
    body = server.requests[0]["body"]
    assert body["model"] == "test-model" and body["temperature"] == askg_lib.DEFAULT_TEMPERATURE
    assert body["response_format"] == {"type": "json_object"}

    merged = tmp_path / "out" / "askg.json"
    assert validate_askg_file(merged) == []
    document = json.loads(merged.read_text())
    assert list(document["classes"]) == CLASSES  # class order, not completion order
    assert document["provenance"]["prompt_version"] == askg_lib.PROMPT_VERSION
    assert document["provenance"]["base_url"] == server.base_url
    for name in CLASSES:
        assert document["classes"][name]["objects"] == knowledge_for(name)["objects"]
        assert document["classes"][name]["prompts"] == prompts_for(name)

    # prompts / inspect commands on the build directory and on the merged file.
    for source in (tmp_path / "out", merged):
        out = tmp_path / f"prompts_{source.name}.json"
        assert askg_cli.main(["prompts", "--graph", str(source), "--out", str(out), "--only", "ST"]) == 0
        prompts = json.loads(out.read_text())
        assert list(prompts) == CLASSES
        assert prompts["rowing"] == prompts_for("rowing")["spatial"] + prompts_for("rowing")["temporal"]
    assert askg_cli.main(["prompts", "--graph", str(merged), "--out", str(tmp_path / "t.json"), "--only", "T"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["archery"] == prompts_for("archery")["temporal"]
    capsys.readouterr()
    assert askg_cli.main(["inspect", "--graph", str(tmp_path / "out"), "--class", "juggling balls"]) == 0
    shown = capsys.readouterr().out
    assert "juggling frame" in shown and prompts_for("juggling balls")["temporal"][0] in shown
    assert_key_absent(tmp_path / "out")


def test_invalid_answers_and_http_errors_are_retried_with_feedback(server_factory, tmp_path):
    script = {
        ("archery", "stage1"): ["malformed", "missing_fields", "wrong_counts", "valid"],
        ("rowing", "stage1"): ["429", "500", "valid"],
        ("knitting", "stage2"): ["bad_prompts", "few_prompts", "valid"],
    }
    server = server_factory(script=script)
    report = make_builder(server, retries=3).build(CLASSES[:3], tmp_path / "out", dataset="custom")
    assert report.ok, report.failed
    assert server.count("archery", "stage1") == 4
    assert server.count("rowing", "stage1") == 3
    assert server.count("knitting", "stage2") == 3
    # After an invalid answer the model is shown its answer and the errors.
    retry = [r for r in server.requests if r["class"] == "archery" and r["stage"] == "stage1"][1]
    messages = retry["body"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "not valid JSON" in messages[3]["content"]
    third = [r for r in server.requests if r["class"] == "archery" and r["stage"] == "stage1"][3]
    assert "expected 5-10" in third["body"]["messages"][3]["content"]
    assert validate_askg_file(tmp_path / "out" / "askg.json") == []


@pytest.mark.parametrize("failure, expected", [
    ("malformed", "not valid JSON"),
    ("missing_fields", "missing fields"),
    ("wrong_counts", "expected 5-10"),
    ("429", "RateLimitError"),
    ("500", "InternalServerError"),
])
def test_exhausted_retries_give_a_per_class_error_and_cache_nothing(server_factory, tmp_path, failure, expected):
    server = server_factory(script={("rowing", "stage1"): [failure] * 10})
    out = tmp_path / "out"
    report = make_builder(server, retries=2).build(["archery", "rowing"], out, dataset="custom")
    assert report.built == ["archery"] and list(report.failed) == ["rowing"]
    assert "gave up after 3 attempts" in report.failed["rowing"] and expected in report.failed["rowing"]
    assert server.count("rowing") == 3  # 1 attempt + 2 retries, stage 2 never reached
    slug = class_slug("rowing")
    assert not (out / "stage1" / f"{slug}.json").exists() and not (out / "classes" / f"{slug}.json").exists()
    saved = json.loads((out / "report.json").read_text())
    assert saved["failed"]["rowing"] == report.failed["rowing"] and saved["missing"] == ["rowing"]
    assert list(json.loads((out / "askg.json").read_text())["classes"]) == ["archery"]
    assert not [p for p in out.rglob("*.tmp")]


def test_stage2_failure_keeps_stage1_and_resume_asks_only_stage2(server_factory, tmp_path):
    out = tmp_path / "out"
    failing = server_factory(script={("knitting", "stage2"): ["bad_prompts"] * 10})
    report = make_builder(failing, retries=1).build(["archery", "knitting"], out, dataset="custom")
    assert list(report.failed) == ["knitting"] and "stage 2" in report.failed["knitting"]
    assert "must start with" in report.failed["knitting"]
    assert (out / "stage1" / f"{class_slug('knitting')}.json").exists()
    assert not (out / "classes" / f"{class_slug('knitting')}.json").exists()

    healthy = server_factory()
    report = make_builder(healthy).build(["archery", "knitting"], out, dataset="custom")
    assert report.ok and report.cached == ["archery"] and report.built == ["knitting"]
    assert healthy.count() == 1 and healthy.count("knitting", "stage2") == 1


def test_keyboard_interrupt_then_resume_does_not_redo_finished_classes(server_factory, tmp_path):
    out = tmp_path / "out"
    server = server_factory()
    finished = []

    def interrupt_after_two(name, ok):
        finished.append(name)
        if len(finished) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, in the main thread

    report = make_builder(server, concurrency=1).build(CLASSES, out, dataset="custom",
                                                       on_class_done=interrupt_after_two)
    assert report.interrupted and not report.ok
    # Finished classes: those reported, plus a class whose last request was already in
    # flight at the interrupt (its worker completes it and caches it).
    done_first = {json.loads(p.read_text())["class"] for p in (out / "classes").glob("*.json")}
    assert set(finished) <= set(report.built) <= done_first and 2 <= len(done_first) < len(CLASSES)
    first_requests = server.count()

    report = make_builder(server, concurrency=2).build(CLASSES, out, dataset="custom")
    assert report.ok and set(report.cached) == done_first
    assert set(report.built) == set(CLASSES) - done_first
    for name in done_first:  # no request at all for classes finished before the interrupt
        assert server.count(name) == 2
    for name in set(CLASSES) - done_first:
        # Nothing asked twice: a stage-1 answer received before the interrupt was cached.
        assert server.count(name, "stage1") == 1 and server.count(name, "stage2") == 1
    assert server.count() - first_requests <= 2 * len(set(CLASSES) - done_first)
    assert validate_askg_file(out / "askg.json") == []


def test_killed_process_resumes_from_cache(server_factory, tmp_path):
    """A build process killed with SIGKILL mid-run: the rerun asks only for unfinished classes."""
    server = server_factory(delay_s=0.15)
    out = tmp_path / "out"
    classes_file = tmp_path / "my_classes.txt"
    classes_file.write_text("\n".join(CLASSES) + "\n")
    env = {**os.environ, "ASKG_TEST_KEY": API_KEY, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "stdd.askg", "build", "--classes", str(classes_file), "--out", str(out),
               "--model", "test-model", "--base-url", server.base_url, "--api-key-env", "ASKG_TEST_KEY",
               "--concurrency", "1", "--backoff", "0.001"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(list((out / "classes").glob("*.json"))) >= 2 if (out / "classes").exists() else False:
            break
        if process.poll() is not None:
            pytest.fail(f"build exited early: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    stdout, stderr = process.communicate()
    finished = {json.loads(p.read_text())["class"] for p in (out / "classes").glob("*.json")}
    assert 2 <= len(finished) < len(CLASSES)
    before = {name: server.count(name) for name in CLASSES}

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in finished:
        assert server.count(name) == before[name] == 2
    unfinished = set(CLASSES) - finished
    for name in unfinished:
        assert server.count(name, "stage2") >= 1
        # At most the one request in flight when the process died is asked again.
        assert server.count(name) <= 3
    assert sum(server.count(n) - before[n] for n in unfinished) <= 2 * len(unfinished)
    assert validate_askg_file(out / "askg.json") == []
    assert_key_absent(out, stdout.decode(), stderr.decode(), result.stdout, result.stderr)


def test_cli_reports_failures_and_never_logs_the_key(server_factory, tmp_path, monkeypatch, capsys, caplog):
    server = server_factory(script={("rowing", "stage1"): ["500"] * 10, ("archery", "stage1"): ["malformed"]})
    monkeypatch.setenv("MY_LLM_KEY", API_KEY)
    out = tmp_path / "out"
    classes_file = tmp_path / "cls.txt"
    classes_file.write_text("# my classes\narchery\n\nrowing\n")
    with caplog.at_level(logging.DEBUG):
        code = askg_cli.main(["-v", "build", "--classes", str(classes_file), "--out", str(out), "--model", "m",
                              "--base-url", server.base_url, "--api-key-env", "MY_LLM_KEY",
                              "--retries", "1", "--backoff", "0.001"])
    captured = capsys.readouterr()
    assert code == 1
    assert "rowing" in captured.err and "InternalServerError" in captured.err
    assert "archery" in json.loads((out / "report.json").read_text())["built"]
    log_text = (out / "build.log").read_text()
    assert "attempt 1/2" in log_text  # retries are logged ...
    assert_key_absent(out, captured.out, captured.err, caplog.text)  # ... the key never is


def test_unauthorized_endpoint_stops_the_run(server_factory, tmp_path):
    server = server_factory(default="401")
    with pytest.raises(FatalEndpointError, match="AuthenticationError"):
        make_builder(server, concurrency=1).build(CLASSES, tmp_path / "out", dataset="custom")
    assert server.count() == 1  # not retried, and no further class is tried
    assert_key_absent(tmp_path / "out")


def test_bad_request_is_not_retried_and_hints_at_json_mode(server_factory, tmp_path):
    server = server_factory(script={("rowing", "stage1"): ["400"]})
    report = make_builder(server).build(["archery", "rowing"], tmp_path / "out", dataset="custom")
    assert report.built == ["archery"] and server.count("rowing") == 1
    assert "BadRequestError" in report.failed["rowing"] and "--no-json-mode" in report.failed["rowing"]
    report = make_builder(server, json_mode=False).build(["rowing"], tmp_path / "out2", dataset="custom")
    assert report.ok and "response_format" not in server.requests[-1]["body"]


def test_missing_key_and_bad_arguments_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(AskgError, match="NO_SUCH_KEY_VAR is not set"):
        AskgBuilder(AskgConfig(api_key_env="NO_SUCH_KEY_VAR"))
    assert askg_cli.main(["build", "--classes", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="concurrency"):
        AskgConfig(concurrency=0)
    assert askg_cli.main(["prompts", "--graph", str(tmp_path / "missing"), "--out", str(tmp_path / "p.json")]) == 2


def test_cache_from_another_prompt_version_or_invalid_is_rebuilt(server_factory, tmp_path):
    out = tmp_path / "out"
    server = server_factory()
    make_builder(server).build(["archery", "rowing"], out, dataset="custom")
    stale = out / "classes" / f"{class_slug('archery')}.json"
    entry = json.loads(stale.read_text())
    entry["provenance"]["prompt_version"] = "askg-v0"
    stale.write_text(json.dumps(entry))
    broken = out / "classes" / f"{class_slug('rowing')}.json"
    broken.write_text('{"class": "rowing", "result": {"objects": []')  # torn write from elsewhere
    before = server.count()
    report = make_builder(server).build(["archery", "rowing"], out, dataset="custom")
    assert report.ok and sorted(report.built) == ["archery", "rowing"]
    # stage 1 results are still valid and of this version: only stage 2 is asked again
    assert server.count() - before == 2


def test_damaged_cache_files_are_set_aside_and_rebuilt(server_factory, tmp_path):
    """A cache entry that is not an entry in JSON (cut short, replaced) is renamed <name>.corrupt, reported, and
    its stage asked again; the stages that are intact are not."""
    out = tmp_path / "out"
    server = server_factory()
    names = ["archery", "rowing", "knitting"]
    assert make_builder(server).build(names, out, dataset="custom").ok
    final = {name: out / "classes" / f"{class_slug(name)}.json" for name in names}
    stage1 = {name: out / "stage1" / f"{class_slug(name)}.json" for name in names}
    cut = final["archery"].read_text()[:200]
    final["archery"].write_text(cut)  # a copy that stopped: stage 1 intact
    final["rowing"].unlink()
    stage1["rowing"].write_bytes(b"\xff\xfe not text")  # and its stage 1 damaged
    final["knitting"].write_text(json.dumps(["knitting", "not an entry"]))
    before = {(name, stage): server.count(name, stage) for name in names for stage in ("stage1", "stage2")}

    report = make_builder(server).build(names, out, dataset="custom")
    assert report.ok and sorted(report.built) == sorted(names)
    asked = {key: server.count(*key) - count for key, count in before.items()}
    assert asked == {("archery", "stage1"): 0, ("archery", "stage2"): 1, ("rowing", "stage1"): 1,
                     ("rowing", "stage2"): 1, ("knitting", "stage1"): 0, ("knitting", "stage2"): 1}
    assert final["archery"].with_name(final["archery"].name + ".corrupt").read_text() == cut
    assert stage1["rowing"].with_name(stage1["rowing"].name + ".corrupt").read_bytes().startswith(b"\xff")
    saved = json.loads((out / "report.json").read_text())["cache_files_set_aside"]
    assert sorted(saved) == sorted(report.set_aside) and len(saved) == 3
    for path, problem in ((final["archery"], "not valid JSON"), (stage1["rowing"], "not UTF-8"),
                          (final["knitting"], "expected an object")):
        assert any(str(path) in line and problem in line and "set aside as" in line for line in saved), saved
    assert validate_askg_file(out / "askg.json") == []
    # the rebuilt entries are used as they are; nothing is set aside again
    report = make_builder(server).build(names, out, dataset="custom")
    assert sorted(report.cached) == sorted(names) and report.set_aside == [] and report.requests == 0


def test_helpers_redact_and_parse():
    assert askg_lib.redact_url("https://user:pw@example.com:8443/v1?key=abc#x") == "https://example.com:8443/v1"
    assert askg_lib.parse_json_answer('Sure!\n```json\n{"a": 1}\n```') == {"a": 1}
    assert askg_lib.parse_json_answer('Here: {"a": [1, 2]} done') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="not valid JSON"):
        askg_lib.parse_json_answer("{'a': 1")
    with pytest.raises(ValueError, match="empty"):
        askg_lib.parse_json_answer("  ")
    assert class_slug("passing American football (not in game)") != class_slug("passing american football (not in game)")
    # Case/spacing variants of entities in triples are mapped to the listed spelling.
    answer = knowledge_for("archery")
    answer["relations"]["object_object"][0][0] = "  ARCHERY   handle "
    fixed = askg_lib.canonicalize_stage1(answer)
    assert fixed["relations"]["object_object"][0][0] == "archery handle"
    graph = {"class": "archery", **fixed, "prompts": prompts_for("archery")}
    assert validate_graph(graph, "custom", "archery") == []


def test_credentials_in_the_base_url_are_not_recorded(server_factory, tmp_path):
    server = server_factory()
    with_credentials = server.base_url.replace("http://", "http://alice:url-secret-77@")
    out = tmp_path / "out"
    report = make_builder(server, base_url=with_credentials).build(["archery"], out, dataset="custom")
    assert report.ok
    for path in out.rglob("*.json"):
        text = path.read_text()
        assert "url-secret-77" not in text and "alice" not in text, path
    assert json.loads((out / "askg.json").read_text())["provenance"]["base_url"] == server.base_url


class RecordingStop(threading.Event):
    """The builder's stop event, recording each backoff wait it is asked for."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return super().wait(0)  # the wait itself is not what is tested


def test_retry_after_is_honoured(server_factory, tmp_path):
    server = server_factory(script={("archery", "stage1"): ["429-after-3"]})
    builder = make_builder(server, concurrency=1)
    builder._stop = RecordingStop()
    report = builder.build(["archery"], tmp_path / "out", dataset="custom")
    assert report.ok and server.count("archery", "stage1") == 2
    assert len(builder._stop.waits) == 1 and builder._stop.waits[0] >= 3.0  # not the 0.01 s backoff
    capped = make_builder(server_factory(script={("archery", "stage1"): ["429-after-3600"]}), concurrency=1,
                          retry_after_max_s=5.0)
    capped._stop = RecordingStop()
    assert capped.build(["archery"], tmp_path / "out2", dataset="custom").ok
    assert capped._stop.waits == [5.0]


def test_empty_choices_and_non_json_bodies_are_retried(server_factory, tmp_path):
    server = server_factory(script={("archery", "stage1"): ["no_choices", "not_json"]})
    report = make_builder(server, concurrency=1).build(["archery"], tmp_path / "out", dataset="custom")
    assert report.ok and server.count("archery", "stage1") == 3


def test_the_class_as_a_node_is_accepted_and_unlisted_entities_are_reported(server_factory, tmp_path):
    """Stage 1 answers in the paper's shape are valid at once (not retried); relations naming an entity in
    neither list are listed in report.json. The prompt asks for that shape."""
    server = server_factory(script={("archery", "stage1"): ["paper_shape"]})
    out = tmp_path / "out"
    report = make_builder(server, concurrency=1).build(["archery", "rowing"], out, dataset="custom")
    assert report.ok and server.count("archery", "stage1") == 1
    graph = json.loads((out / "askg.json").read_text())["classes"]["archery"]
    assert graph["relations"]["action_action"][0] == ["ARCHERY", "starts with", "gripping the archery handle"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["relations_to_unlisted_entities"] == {"archery": [
        "class 'archery'.relations.object_object[3]: object 'safety' is in neither objects nor sub_actions "
        "(nor the class)"]}
    assert validate_askg_file(out / "askg.json") == []
    asked = server.requests[0]["body"]["messages"][1]["content"]
    assert '["archery", "starts with", "<the first sub-action>"]' in asked and 'or be the action "archery"' in asked


def test_a_key_echoed_in_an_answer_is_never_written(server_factory, tmp_path):
    server = server_factory(script={("archery", "stage1"): ["echo_key"]})
    out = tmp_path / "out"
    report = make_builder(server, concurrency=1).build(["archery"], out, dataset="custom")
    assert report.ok
    assert "floor mat ***" in (out / "askg.json").read_text()
    assert_key_absent(out)


def test_cli_log_lines_carry_no_url_credentials_or_tokens(server_factory, tmp_path):
    """A real process with -v: the HTTP client's request lines and ours are redacted everywhere."""
    server = server_factory()
    base_url = server.base_url.replace("http://", "http://alice:url-secret-77@") + "?token=query-secret-88"
    classes_file = tmp_path / "cls.txt"
    classes_file.write_text("archery\n")
    out = tmp_path / "out"
    env = dict(os.environ, MY_LLM_KEY=API_KEY)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import logging, sys; from stdd.askg import cli; logging.basicConfig(level=logging.DEBUG); "
            "sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, "-v", "build", "--classes", str(classes_file), "--out", str(out),
         "--model", "m", "--base-url", base_url, "--api-key-env", "MY_LLM_KEY", "--backoff", "0.001"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = result.stderr + (out / "build.log").read_text()
    for secret in ("url-secret-77", "query-secret-88", API_KEY):
        assert secret not in logged
        for path in out.rglob("*"):
            assert path.is_dir() or secret not in path.read_text(errors="replace"), path


@pytest.mark.parametrize("password, written", [("hunter2pw", "hunter2pw"), ("p@ss/w:rd!", "p%40ss%2Fw%3Ard%21")])
def test_credentials_a_server_echoes_are_never_written(server_factory, tmp_path, password, written):
    """A real build process against a server whose errors echo the request's headers: the Basic credentials
    the client made of the URL's user:password reach neither stderr, build.log, report.json nor any file,
    plain, percent-encoded or base64-encoded."""
    server = server_factory(script={("archery", "stage1"): ["echo_headers"] * 5})
    base_url = server.base_url.replace("http://", f"http://user:{written}@")
    classes_file = tmp_path / "cls.txt"
    classes_file.write_text("archery\nrowing\n")
    out = tmp_path / "out"
    env = dict(os.environ, MY_LLM_KEY=API_KEY)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "stdd.askg", "build", "--classes", str(classes_file), "--out", str(out), "--model",
         "m", "--base-url", base_url, "--api-key-env", "MY_LLM_KEY", "--retries", "1", "--backoff", "0.001",
         "--concurrency", "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]  # archery failed, rowing was built
    credentials = f"user:{password}"
    basic = base64.b64encode(credentials.encode()).decode()
    # the server did receive them, and did echo them: what is tested is that they go no further
    assert {r["authorization"] for r in server.requests if r["class"] == "archery"} == {f"Basic {basic}"}
    report = (out / "report.json").read_text()
    assert "request headers" in json.loads(report)["failed"]["archery"] and "Basic ***" in report
    assert "Basic ***" in result.stderr and "Basic ***" in (out / "build.log").read_text()
    forms = {password, written, credentials, quote(password, safe=""), quote(credentials, safe=""), basic,
             basic.rstrip("="), base64.urlsafe_b64encode(credentials.encode()).decode(), API_KEY}
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    texts.update({str(path): path.read_text(errors="replace") for path in out.rglob("*") if path.is_file()})
    for where, text in texts.items():
        for form in forms:
            assert form not in text, (where, form)


def test_authorization_values_and_encoded_secrets_are_redacted():
    redact = askg_lib._Redactor(askg_lib.url_secrets("http://user:p%40ss@host/v1?token=qs+secret%2B1") + [API_KEY])
    text = redact('{"Authorization": "Basic dXNlcjpwQHNz", "headers": {"authorization": "bearer other-token.1"}} '
                  "Proxy-Authorization: Token zz9 / key " + base64.b64encode(API_KEY.encode()).decode() +
                  " / url user%3Ap%40ss / form token=qs+secret%2B1, path /qs%20secret%2B1/ "
                  "/ basic sword techniques, the flag bearer")
    for secret in ("dXNlcjpwQHNz", "other-token.1", "zz9", "p@ss", "p%40ss", "qs+secret%2B1", "qs%20secret%2B1",
                   base64.b64encode(API_KEY.encode()).decode()):
        assert secret not in text, (secret, text)
    assert '"Authorization": "Basic ***"' in text and '"authorization": "bearer ***"' in text
    assert "basic sword techniques, the flag bearer" in text  # ordinary words are left alone


def test_http_client_request_lines_are_redacted(server_factory, tmp_path, caplog):
    """The library path (no CLI): the client's own request lines reach the log, without credentials."""
    server = server_factory()
    base_url = server.base_url.replace("http://", "http://alice:url-secret-77@") + "?token=query-secret-88"
    for name in askg_lib.HTTP_CLIENT_LOGGERS:  # the CLI of an earlier test may have quietened them
        caplog.set_level(logging.DEBUG, logger=name)
    with caplog.at_level(logging.DEBUG):
        report = make_builder(server, base_url=base_url, concurrency=1).build(["archery"], tmp_path / "out",
                                                                              dataset="custom")
    assert report.ok
    requests = [r.getMessage() for r in caplog.records if "HTTP Request" in r.getMessage() and "127.0.0.1" in r.getMessage()]
    assert requests, caplog.text[-2000:]
    for secret in ("url-secret-77", "query-secret-88", API_KEY):
        assert secret not in caplog.text
