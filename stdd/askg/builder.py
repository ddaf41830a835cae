"""ASKG construction: an LLM builds an Action Semantic Knowledge Graph per class, then prompts.

Two stages per class, against any OpenAI-compatible chat-completions endpoint
(the `openai` client; hosted or a local server via --base-url):

  stage 1  "knowledge": objects (5-10), ordered sub-actions (3-10) and the
           relation triples object-object / action-object / action-action,
           the action class itself a node with edges to its objects and
           sub-actions, as in the paper's ASKG (the paper's "Return the object
           entity list ..." and "Find the proper predicate names ..." prompts,
           asked for JSON);
  stage 2  "prompts": one sentence per triple, "This is a video of <class>, ...":
           spatial prompts from object-object triples, temporal prompts from the
           action triples ("Try to complete the whole sentence according to each
           relation triple").

Every answer is parsed as JSON and validated (`stdd.knowledge.schema`); an invalid
answer, HTTP 429/5xx, a timeout or a dropped connection is retried with
exponential backoff (the retry of an invalid answer shows the model its errors),
up to `retries` times, after which the class is reported as failed and the run
goes on. Relations naming an entity in neither list are valid (not retried) and
listed in ``report.json``. Only validated results are written:
`<out>/stage1/<slug>.json` after stage 1 and `<out>/classes/<slug>.json` after
stage 2, each atomically (temp file + rename), so a crashed or interrupted run
resumes where it stopped and never reads a half-written or invalid file. A cache file damaged some other way
(cut short by a copy, changed on disk: not an entry in JSON) is set aside as
``<name>.corrupt``, said in a warning naming it and what is wrong, listed in
``report.json`` (``cache_files_set_aside``), and its stage asked again. Provenance
(model, prompt version, temperature, base URL without credentials, time) is
stored with every result.

The API key is read from an environment variable (OPENAI_API_KEY unless
--api-key-env names another) and is never logged or written; error texts,
answers and log lines are scrubbed of it and of the base URL's credentials
(plain, percent-encoded and base64-encoded, as a Basic Authorization header
carries them), of every Authorization header value (Basic, Bearer, any case)
and of the ``user:password@`` and query string of every URL, before they reach
a log, a cache or the report.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit, urlunsplit

from ..files import atomic_write
from ..resources import CLASS_COUNTS, display_name
from ..knowledge.schema import (
    OBJECTS_MAX, OBJECTS_MIN, SCHEMA_VERSION, SUB_ACTIONS_MAX, SUB_ACTIONS_MIN, AskgError, AskgFileError,
    class_slug, normalize_entity, read_json_file, validate_graph, validate_stage1,
)

log = logging.getLogger("stdd.askg")

# Bump PROMPT_VERSION whenever a prompt text or the temperature changes: it is
# recorded with every cached result, and a cache built with another version is
# not reused (see `_cached`).
PROMPT_VERSION = "askg-v2"  # v2: the action class is a node of its graph
DEFAULT_TEMPERATURE = 0.2
DEFAULT_MODEL = "gpt-3.5-turbo"  # the paper used GPT-3.5; any chat model works
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"

SYSTEM_PROMPT = (
    "You are an expert in human actions and video understanding. You build Action Semantic "
    "Knowledge Graphs (ASKG) that decompose an action class into the static objects seen in "
    "its videos and the dynamic sub-actions it is made of, and the relations between them. "
    "Be specific to the given action: name real objects and real phases of the action, never "
    "generic filler. Answer with one JSON object only, no prose and no code fences."
)

STAGE1_PROMPT = """Action class: {class_name}
Action (plain words): {display}

1. Return the object entity list containing Top K ({objects_min} <= K <= {objects_max}) most relevant objects involved in action: "{display}". Objects are concrete things visible in a video of it (equipment, body parts in use, clothing, places).
2. Return the sub-action entity list containing Top K ({actions_min} <= K <= {actions_max}) most relevant sub-actions involved in action: "{display}", in the temporal order in which they happen. Write each sub-action as a short gerund phrase (e.g. "drawing the bowstring").
3. Find the proper predicate names that concisely describe the relationship between each object / sub-action pair chosen from the entity lists, as [subject, predicate, object] triples. The action itself, written "{display}", is a node of the graph too, linked to its objects and sub-actions:
   - "object_object": at least 3 triples [object, predicate, object] (static spatial relations, e.g. ["arrow", "rests on", "bow"]);
   - "action_object": at least 1 triple [the action or a sub-action, predicate, object] (e.g. ["{display}", "requires", "<an object>"], ["drawing the bowstring", "pulls back", "bowstring"]);
   - "action_action": at least 2 triples [the action or a sub-action, predicate, sub-action] (temporal order, e.g. ["{display}", "starts with", "<the first sub-action>"], ["aiming at the target", "comes before", "releasing the arrow"]).
   Subjects and objects of the triples must be copied exactly from the entity lists, or be the action "{display}".

Return JSON of exactly this form:
{{"objects": ["..."], "sub_actions": ["..."], "relations": {{"object_object": [["...", "...", "..."]], "action_object": [["...", "...", "..."]], "action_action": [["...", "...", "..."]]}}}}"""

STAGE2_PROMPT = """Action class: {class_name}
Action (plain words): {display}

Relation triples of the action's knowledge graph:
object_object (static appearance): {object_object}
action_object (dynamic motion): {action_object}
action_action (dynamic motion): {action_action}

Try to complete the whole sentence according to each relation triple: "This is a video of {display}, ..."
- "spatial": one sentence for each object_object triple;
- "temporal": one sentence for each action_action triple and each action_object triple.
Every sentence is a single sentence that starts exactly with "This is a video of {display}, ", ends with a period, and uses the entity names of its triple word for word (e.g. "This is a video of archery, where aiming at the target comes before releasing the arrow.").

Return JSON of exactly this form:
{{"spatial": ["..."], "temporal": ["..."]}}"""

REPAIR_PROMPT = """Your answer was not valid:
{errors}
Answer again with the complete corrected JSON object only."""


class FatalEndpointError(AskgError):
    """The endpoint refuses every request (bad key, unknown model): stop the run."""


@dataclasses.dataclass(frozen=True)
class AskgConfig:
    model: str = DEFAULT_MODEL
    base_url: str | None = None           # None: the openai client default (api.openai.com)
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = DEFAULT_TEMPERATURE
    concurrency: int = 4
    retries: int = 3                      # retries after the first attempt, per stage
    backoff_base_s: float = 1.0           # wait before retry r: base * 2**r (capped), +-25% jitter
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0      # a server's Retry-After is honoured up to this many seconds
    timeout_s: float = 120.0
    json_mode: bool = True                # send response_format={"type": "json_object"}
    max_tokens: int = 1500

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}: expected >= 1")
        if self.retries < 0:
            raise ValueError(f"retries={self.retries}: expected >= 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: expected 0..2")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.retry_after_max_s < 0:
            raise ValueError("backoff times must be >= 0")


@dataclasses.dataclass
class BuildReport:
    out_dir: Path
    dataset: str
    built: list[str]                      # built by this run
    cached: list[str]                     # already finished by an earlier run
    failed: dict[str, str]                # class -> error
    requests: int                         # chat-completion requests sent by this run
    interrupted: bool = False
    set_aside: list[str] = dataclasses.field(default_factory=list)  # unreadable cache entries renamed .corrupt

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "built": self.built, "cached": self.cached,
                "failed": self.failed, "requests": self.requests, "interrupted": self.interrupted,
                "cache_files_set_aside": self.set_aside}


# ---------------------------------------------------------------- helpers

def redact_url(url: str | None) -> str | None:
    """URL without user:password, query or fragment (where credentials may hide)."""
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(?P<url>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#\"'<>]+)[?#][^\s\"'<>]*")
# The value of an Authorization header however a server echoes it ("Authorization: Basic ...",
# '"authorization": "Bearer ..."', "Proxy-Authorization=..."): its scheme is kept, its credentials are not.
_AUTHORIZATION = re.compile(
    r"(?P<name>\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?\s*)"
    r"(?P<scheme>(?:basic|bearer|digest|token|apikey)\s+)?[^\s\"',;}\]]+", re.IGNORECASE)


def url_secrets(url: str | None) -> list[str]:
    """The parts of ``url`` that may be credentials: user, password and query values, as written and
    percent-decoded, and ``user:password`` (what HTTP clients send base64-encoded as Basic credentials)."""
    if not url:
        return []
    parts = urlsplit(url)
    user, password = parts.username, parts.password
    found = [user, password, *(v for _, v in parse_qsl(parts.query))]
    if user is not None or password is not None:
        for u, p in ((user or "", password or ""), (unquote(user or ""), unquote(password or ""))):
            found += [u, p, f"{u}:{p}"]
    return list(dict.fromkeys(s for s in found if s and len(s) >= 4))


def secret_forms(secret: str) -> set[str]:
    """The forms in which ``secret`` may appear in a text: as it is, percent-encoded (as in a URL or a
    form) and base64-encoded (as in a Basic Authorization header; standard and URL-safe alphabets,
    with and without padding)."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        token = encode(secret.encode("utf-8")).decode("ascii")
        forms.update((token, token.rstrip("=")))
    return {form for form in forms if form}


class _Redactor:
    """Replaces the secrets it holds (the API key, credentials of the base URL), in every form
    :func:`secret_forms` gives, with ``***`` in a text, and the value of every Authorization header,
    the ``user:password@`` and the query string of every URL in it."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets: set[str] = set()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        self.secrets.update(form for s in secrets if s for form in secret_forms(s))

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        text = _AUTHORIZATION.sub(r"\g<name>\g<scheme>***", text)
        text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
        return _URL_QUERY.sub(r"\g<url>?***", text)


class RedactingLogFilter(logging.Filter):
    """Rewrites each record's message through the builders' redactor (secrets, URL credentials)."""

    def __init__(self, redactor: _Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redactor(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# One redactor for every log line: each builder adds its secrets. The HTTP client logs request URLs
# (under these names, which differ between client versions); the CLI also filters its handlers.
LOG_REDACTOR = _Redactor()
LOG_FILTER = RedactingLogFilter(LOG_REDACTOR)
HTTP_CLIENT_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "openai._base_client")


def install_log_redaction(*handlers: logging.Handler) -> None:
    """Put :data:`LOG_FILTER` on stdd's and the HTTP client's loggers and on ``handlers`` (idempotent)."""
    targets = [logging.getLogger(name) for name in ("stdd", *HTTP_CLIENT_LOGGERS)] + list(handlers)
    for target in targets:
        if LOG_FILTER not in target.filters:
            target.addFilter(LOG_FILTER)


def retry_after_seconds(exc: Exception) -> float | None:
    """The wait a ``429``/``5xx`` answer asks for (``Retry-After``: seconds or an HTTP date; ``retry-after-ms``)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if not headers:
        return None
    try:
        milliseconds = headers.get("retry-after-ms")
        if milliseconds:
            return max(0.0, float(milliseconds) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError, OverflowError):
        return None


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as UTF-8 JSON to ``path`` atomically (:func:`stdd.files.atomic_write`)."""
    atomic_write(path, json.dumps(payload, ensure_ascii=False, indent=1) + "\n")


def parse_json_answer(content: str | None) -> Any:
    """The JSON object in a model answer (tolerates ```json fences and text around it)."""
    if content is None or not content.strip():
        raise ValueError("empty answer")
    text = content.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.S)
    if fence:
        text = fence.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                pass
        raise ValueError(f"answer is not valid JSON: {content[:200]!r}") from None


def _clean_strings(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [_clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_strings(v) for k, v in value.items()}
    return value


def canonicalize_stage1(answer: dict) -> dict:
    """Whitespace-clean the answer and spell triple entities as in the entity lists."""
    answer = _clean_strings(answer)
    spelling = {}
    for key in ("sub_actions", "objects"):  # objects win when a name is in both lists
        for entity in answer.get(key, []) if isinstance(answer.get(key), list) else []:
            if isinstance(entity, str):
                spelling[normalize_entity(entity)] = entity
    relations = answer.get("relations")
    if isinstance(relations, dict):
        for kind, triples in relations.items():
            if not isinstance(triples, list):
                continue
            fixed = []
            for triple in triples:
                if isinstance(triple, list) and len(triple) == 3 and all(isinstance(t, str) for t in triple):
                    triple = [spelling.get(normalize_entity(triple[0]), triple[0]), triple[1],
                              spelling.get(normalize_entity(triple[2]), triple[2])]
                fixed.append(triple)
            relations[kind] = fixed
    return answer


def render_stage1(class_name: str, display: str) -> str:
    return STAGE1_PROMPT.format(class_name=class_name, display=display,
                                objects_min=OBJECTS_MIN, objects_max=OBJECTS_MAX,
                                actions_min=SUB_ACTIONS_MIN, actions_max=SUB_ACTIONS_MAX)


def render_stage2(class_name: str, display: str, knowledge: dict) -> str:
    relations = knowledge["relations"]
    return STAGE2_PROMPT.format(
        class_name=class_name, display=display,
        **{kind: json.dumps(relations[kind], ensure_ascii=False)
           for kind in ("object_object", "action_object", "action_action")})


def resolve_classes(spec: str) -> tuple[str, list[str]]:
    """(dataset name, class names) for a shipped set name or a class-list file.

    Files are read by the data package's class-list reader (`stdd.data.annotations.read_class_names`:
    one name per line, or UCF101's "<id> <name>" classInd.txt). The dataset name of a file is its stem.
    """
    # Imported here, not at the top: the data package imports torch (seconds), which
    # `python -m stdd.askg` needs for nothing else (its --help and other commands start in 0.1 s).
    from ..data.annotations import resolve_class_names

    names = resolve_class_names(spec, where="--classes")
    return (spec.lower() if spec.lower() in CLASS_COUNTS else Path(spec).stem), names


# ---------------------------------------------------------------- the builder

class _Stopped(Exception):
    pass


class _UnusableAnswer(Exception):
    """A 200 answer without a usable completion (no choices, a body that is not a completion): retried."""


class AskgBuilder:
    """Runs the two-stage pipeline over classes with a thread pool and a disk cache."""

    def __init__(self, config: AskgConfig, *, api_key: str | None = None, client: Any = None):
        self.config = config
        if client is None:
            if api_key is None:
                api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise AskgError(
                    f"no API key: environment variable {config.api_key_env} is not set "
                    f"(name another with --api-key-env; for a local server that ignores keys, set it to any value)")
            import openai  # optional package: only talking to an endpoint needs it

            client = openai.OpenAI(api_key=api_key, base_url=config.base_url,
                                   max_retries=0, timeout=config.timeout_s)
        self.client = client
        # Scrub the key and the credentials of the base URL from every error text, answer and log line.
        secrets = [api_key or "", *url_secrets(config.base_url)]
        self.redact = _Redactor(secrets)
        LOG_REDACTOR.add(secrets)
        install_log_redaction()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._set_aside_files: list[str] = []
        self.requests = 0

    # -- one request -------------------------------------------------------
    def _chat(self, messages: list[dict]) -> str:
        kwargs = dict(model=self.config.model, messages=messages,
                      temperature=self.config.temperature, max_tokens=self.config.max_tokens)
        if self.config.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        with self._lock:
            self.requests += 1
        response = self.client.chat.completions.create(**kwargs)
        if isinstance(response, (str, bytes)):  # the client hands back a body it could not parse as JSON
            raise _UnusableAnswer(f"answer is not a chat completion (body starts {str(response)[:60]!r})")
        if not getattr(response, "choices", None):
            raise _UnusableAnswer("answer has no choices")
        # The answer goes into caches and askg.json: a secret echoed by the server never does.
        return self.redact(response.choices[0].message.content or "")

    def _sleep_backoff(self, retry_index: int, at_least: float | None = None) -> None:
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * (2 ** retry_index))
        delay *= random.uniform(0.75, 1.25)
        if at_least is not None:  # the server's Retry-After, up to retry_after_max_s
            delay = max(delay, min(at_least, self.config.retry_after_max_s))
        if self._stop.wait(delay):
            raise _Stopped()

    @staticmethod
    def _classify(exc: Exception) -> str:
        """'retry' (transient / invalid answer) or 'fatal' (the endpoint will refuse every class)."""
        import openai  # optional package: only the errors of an endpoint's client are classified here

        if isinstance(exc, (_UnusableAnswer, json.JSONDecodeError, openai.APIResponseValidationError)):
            return "retry"
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
            return "fatal"
        if isinstance(exc, openai.APIStatusError):
            return "retry" if exc.status_code == 429 or exc.status_code >= 500 else "final"
        if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
            return "retry"
        return "final"

    def _ask(self, class_name: str, stage: str, user_prompt: str,
             validate: Callable[[Any], tuple[Any, list[str]]]) -> tuple[Any, int]:
        """Ask until `validate` accepts the parsed answer; returns (result, attempts)."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": user_prompt}]
        last_error = "no attempt made"
        attempts = self.config.retries + 1
        wait_at_least = None  # the last answer's Retry-After
        for attempt in range(attempts):
            if self._stop.is_set():
                raise _Stopped()
            if attempt:
                self._sleep_backoff(attempt - 1, wait_at_least)
            try:
                content = self._chat(messages)
            except Exception as exc:  # noqa: BLE001 - classified below
                kind = self._classify(exc)
                wait_at_least = retry_after_seconds(exc)
                last_error = self.redact(f"{type(exc).__name__}: {exc}")
                if kind == "fatal":
                    # Stop the other workers now: every further request would be refused too.
                    self._stop.set()
                    raise FatalEndpointError(f"{stage}: {last_error}") from None
                if kind == "final":
                    if self.config.json_mode and getattr(exc, "status_code", None) == 400:
                        last_error += " (if the server rejects response_format, pass --no-json-mode)"
                    raise AskgError(f"{stage}: {last_error}") from None
                log.warning("%s: %s attempt %d/%d failed: %s", class_name, stage, attempt + 1, attempts, last_error)
                continue
            try:
                parsed = parse_json_answer(content)
                result, errors = validate(parsed)
            except ValueError as exc:
                result, errors = None, [str(exc)]
            if not errors:
                return result, attempt + 1
            last_error = self.redact("invalid answer: " + "; ".join(errors[:8]))
            log.warning("%s: %s attempt %d/%d: %s", class_name, stage, attempt + 1, attempts, last_error)
            # Show the model its answer and what was wrong with it (a repair turn).
            messages = messages[:2] + [
                {"role": "assistant", "content": content or ""},
                {"role": "user", "content": REPAIR_PROMPT.format(errors="\n".join(f"- {e}" for e in errors[:20]))},
            ]
        raise AskgError(f"{stage}: gave up after {attempts} attempts; last error: {last_error}")

    # -- one class ---------------------------------------------------------
    def _provenance(self, attempts: int) -> dict:
        return {"generator": "stdd.askg build", "model": self.config.model,
                "prompt_version": PROMPT_VERSION, "temperature": self.config.temperature,
                "base_url": redact_url(self.config.base_url) or "https://api.openai.com/v1",
                "attempts": attempts, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _cached(self, path: Path, class_name: str, check: Callable[[Any], list[str]]) -> Any | None:
        """A cache entry if it exists, is this class's, of this prompt version and valid.

        An entry that cannot be read as one (not UTF-8 JSON, e.g. a copy cut short or a damaged disk;
        not an entry object) is set aside as ``<name>.corrupt``, for inspection, with a warning naming
        it and what is wrong, and the stage is asked again; a readable entry of another class or prompt
        version, or one that fails the schema, is asked again and overwritten.
        """
        if not path.exists():
            return None
        try:
            entry = read_json_file(path, "cache file")
            if not isinstance(entry, dict) or "class" not in entry or "result" not in entry:
                raise AskgFileError(f"cache file {path}: expected an object {{\"class\", \"result\", "
                                    f"\"provenance\"}}, got {type(entry).__name__}"
                                    + (f" with fields {sorted(entry)}" if isinstance(entry, dict) else ""))
        except AskgFileError as error:
            self._set_aside(path, str(error), class_name)
            return None
        provenance = entry.get("provenance")
        version = provenance.get("prompt_version") if isinstance(provenance, dict) else None
        if entry["class"] != class_name or version != PROMPT_VERSION:
            log.info("%s: cache file %s is from another class or prompt version; rebuilding", class_name, path)
            return None
        if check(entry["result"]):
            log.warning("%s: cache file %s does not validate; rebuilding", class_name, path)
            return None
        return entry["result"]

    def _set_aside(self, path: Path, problem: str, class_name: str) -> None:
        """Rename an unreadable cache entry ``<name>.corrupt`` (replacing an older one) and record it."""
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as error:  # the rebuilt entry will be written over it
            message = f"{problem}; could not be set aside ({error.strerror or error}), rebuilding"
        else:
            message = f"{problem}; set aside as {aside.name}, rebuilding"
        log.warning("%s: %s", class_name, message)
        with self._lock:
            self._set_aside_files.append(message)

    def build_class(self, out_dir: Path, dataset: str, class_name: str) -> tuple[dict, bool]:
        """(graph, built_now) for one class: from the cache, or by asking the endpoint."""
        display = display_name(dataset, class_name)
        slug = class_slug(class_name)
        final_path = out_dir / "classes" / f"{slug}.json"
        stage1_path = out_dir / "stage1" / f"{slug}.json"

        graph = self._cached(final_path, class_name, lambda g: validate_graph(g, dataset, class_name))
        if graph is not None:
            return graph, False

        knowledge = self._cached(stage1_path, class_name, lambda k: validate_stage1(k, class_name, dataset))
        if knowledge is None:
            def check_stage1(parsed):
                if not isinstance(parsed, dict):
                    return None, [f"expected a JSON object, got {type(parsed).__name__}"]
                answer = canonicalize_stage1(parsed)
                return answer, validate_stage1(answer, class_name, dataset)

            knowledge, attempts = self._ask(class_name, "stage 1 (knowledge graph)",
                                            render_stage1(class_name, display), check_stage1)
            atomic_write_json(stage1_path, {"class": class_name, "result": knowledge,
                                            "provenance": self._provenance(attempts)})

        def check_stage2(parsed):
            if not isinstance(parsed, dict):
                return None, [f"expected a JSON object, got {type(parsed).__name__}"]
            unknown = sorted(set(parsed) - {"spatial", "temporal"})
            graph = {"class": class_name, **knowledge,
                     "prompts": {"spatial": _clean_strings(parsed.get("spatial", [])),
                                 "temporal": _clean_strings(parsed.get("temporal", []))}}
            errors = [f"unknown fields {unknown}"] if unknown else []
            return graph, errors + validate_graph(graph, dataset, class_name)

        graph, attempts = self._ask(class_name, "stage 2 (prompts)",
                                    render_stage2(class_name, display, knowledge), check_stage2)
        atomic_write_json(final_path, {"class": class_name, "result": graph,
                                       "provenance": self._provenance(attempts)})
        return graph, True

    # -- a run -------------------------------------------------------------
    def build(self, names: Sequence[str], out_dir: str | Path, *, dataset: str,
              on_class_done: Callable[[str, bool], None] | None = None) -> BuildReport:
        """Build every class of `names` into `out_dir`; resumable; never raises for one class.

        `on_class_done(class_name, ok)` runs in the calling thread after each class
        (a KeyboardInterrupt raised there or by Ctrl-C stops the run cleanly:
        finished classes stay cached, the report says `interrupted`).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        atomic_write_json(out_dir / "manifest.json", {
            "schema_version": SCHEMA_VERSION, "dataset": dataset, "classes": names,
            "provenance": self._run_provenance(dataset)})
        report = BuildReport(out_dir, dataset, built=[], cached=[], failed={}, requests=0)
        self._stop.clear()
        self._set_aside_files = []
        start_requests = self.requests
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency,
                                                     thread_name_prefix="askg")
        futures = {pool.submit(self.build_class, out_dir, dataset, name): name for name in names}
        pending = set(futures)
        fatal: FatalEndpointError | None = None
        try:
            while pending:
                # Short waits keep the main thread responsive to Ctrl-C.
                done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    name = futures[future]
                    ok = False
                    try:
                        _, built_now = future.result()
                        (report.built if built_now else report.cached).append(name)
                        ok = True
                    except _Stopped:
                        continue
                    except FatalEndpointError as exc:
                        report.failed[name] = str(exc)
                        if fatal is None:
                            fatal = exc
                            log.error("endpoint refuses requests, stopping the run: %s", exc)
                            self._stop.set()
                    except Exception as exc:  # noqa: BLE001 - one class never stops the run
                        report.failed[name] = self.redact(f"{exc}")
                        log.error("%s: failed: %s", name, report.failed[name])
                    if on_class_done is not None:
                        on_class_done(name, ok)
        except KeyboardInterrupt:
            report.interrupted = True
            log.warning("interrupted: finished classes are cached; run the same command again to resume")
            self._stop.set()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            report.requests = self.requests - start_requests
            report.set_aside = list(self._set_aside_files)
            self._finish(report, names, dataset)
        if fatal is not None:
            raise fatal
        return report

    def _run_provenance(self, dataset: str) -> dict:
        base = redact_url(self.config.base_url)
        regenerate = f"python -m stdd.askg build --classes {dataset} --out <dir> --model {self.config.model}"
        if base:
            regenerate += f" --base-url {base}"
        return {"generator": "stdd.askg build",
                "how": "two-stage LLM pipeline (knowledge graph, then prompts), JSON answers validated "
                       "against stdd.knowledge.schema",
                "model": self.config.model, "prompt_version": PROMPT_VERSION,
                "temperature": self.config.temperature,
                "base_url": base or "https://api.openai.com/v1",
                "date": datetime.now(timezone.utc).date().isoformat(),
                "regenerate": regenerate}

    def _finish(self, report: BuildReport, names: list[str], dataset: str) -> None:
        """Write report.json (with the relations of finished classes that name an entity in neither
        list) and askg.json (the finished classes, in class order)."""
        classes = {}
        for name in names:
            path = report.out_dir / "classes" / f"{class_slug(name)}.json"
            if path.exists() and name not in report.failed:
                try:
                    classes[name] = read_json_file(path)["result"]
                except (AskgFileError, KeyError, TypeError):  # written by this run or validated by it: not expected
                    log.warning("%s: cache file %s cannot be read back; left out of askg.json", name, path)
        document = {"schema_version": SCHEMA_VERSION, "dataset": dataset,
                    "provenance": self._run_provenance(dataset), "classes": classes}
        atomic_write_json(report.out_dir / "askg.json", document)
        missing = [n for n in names if n not in classes]
        unlisted = {}
        for name, graph in classes.items():
            notes: list[str] = []
            validate_graph(graph, dataset, name, notes=notes)
            if notes:
                unlisted[name] = notes
        atomic_write_json(report.out_dir / "report.json", {
            **report.to_json(), "complete": not missing, "missing": missing,
            "relations_to_unlisted_entities": unlisted})
        log.info("ASKG %s: %d built, %d from cache, %d failed, %d missing, %d requests -> %s",
                 dataset, len(report.built), len(report.cached), len(report.failed), len(missing),
                 report.requests, report.out_dir / "askg.json")
        if unlisted:
            log.info("%d classes have relations naming an entity in neither of their lists (valid; listed in %s)",
                     len(unlisted), report.out_dir / "report.json")
