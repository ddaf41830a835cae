"""`python -m stdd.askg`: build ASKG graphs with an LLM, export prompt lists, inspect, validate, import the release.

  build     --classes <file|ucf101|hmdb51|k400|k600|k600_new> --out DIR [--model M]
            [--base-url URL] [--concurrency N] [--retries N] [--api-key-env NAME]
            Two-stage pipeline (stdd.askg.builder); resumable: rerun the same command
            after a crash or Ctrl-C and only unfinished classes are requested.
            Exit status 0 when every class was built, 1 when some failed (see
            DIR/report.json), 2 on a usage / endpoint error, 130 when interrupted.
  prompts   --graph <DIR|file.json|ucf101|hmdb51|k400|k600_new> --out prompts.json [--only S|T|ST]
            Writes {"<class>": ["sentence", ...]} in class order (what the model's
            text side consumes).
  inspect   --graph ... --class NAME [--json]
  validate  FILE_OR_SET...   (schema check; the shipped sets by name)
            Exit status 0 when every file is valid (notes about relations to unlisted
            entities are printed, not errors), 1 when some are not, 2 when a file cannot
            be read or is not JSON.
  import-release --askg classes_ASKG_<set>.yml --xprompt classes_xprompt_<set>.yml
            [--labels classes_label_<set>.yml] --set ucf101|hmdb51|k400 --out DIR [--templates N]
            The authors' released knowledge files (stdd.askg.release) -> DIR/askg.json
            (graphs), DIR/prompts.json (their prompts: templates x (plain + oo/ao/aa
            clauses), for --prompts), prompts_spatial.json, prompts_temporal.json and
            report.json (entries matched by label, normalised name or position, unmatched
            classes, malformed triples). Exit status 0 when every class of the set got
            prompts, 1 when some did not, 2 on a usage / file error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..cli import ArgumentParser, cli_main
from ..knowledge.prompts import format_graph, load_graphs, prompt_lists
from ..knowledge.schema import AskgError, read_json_file, validate_askg_document
from ..resources import ASKG_SETS, askg_path
from . import builder as askg_lib
from .builder import AskgBuilder, AskgConfig
from .release import RELEASE_SETS, RELEASE_TEMPLATE_COUNT, describe_match, import_release, write_release_import


def _graph_source(spec: str) -> Path:
    return askg_path(spec) if spec.lower() in ASKG_SETS and not Path(spec).exists() else Path(spec)


def _cmd_build(args) -> int:
    dataset, names = askg_lib.resolve_classes(args.classes)
    if args.dataset:
        dataset = args.dataset
    if args.limit:
        names = names[: args.limit]
    config = AskgConfig(model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
                        temperature=args.temperature, concurrency=args.concurrency, retries=args.retries,
                        backoff_base_s=args.backoff, timeout_s=args.timeout, json_mode=not args.no_json_mode)
    builder = AskgBuilder(config)  # fails on a missing key before anything is written
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A log file next to the results (the key is never formatted into any message).
    file_handler = logging.FileHandler(out_dir / "build.log", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    askg_lib.install_log_redaction(file_handler)
    logging.getLogger("stdd").addHandler(file_handler)
    try:
        report = builder.build(names, out_dir, dataset=dataset)
    finally:
        logging.getLogger("stdd").removeHandler(file_handler)
        file_handler.close()
    if report.set_aside:
        print(f"{len(report.set_aside)} unreadable cache files set aside as <name>.corrupt and their stage asked "
              f"again (listed in {out_dir / 'report.json'})", file=sys.stderr)
    if report.interrupted:
        print(f"interrupted; {len(report.built) + len(report.cached)}/{len(names)} classes done; "
              f"rerun the same command to resume", file=sys.stderr)
        return 130
    if report.failed:
        print(f"{len(report.failed)} of {len(names)} classes failed (details in {out_dir / 'report.json'}):",
              file=sys.stderr)
        for name, error in list(report.failed.items())[:20]:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    print(f"built {len(report.built)}, cached {len(report.cached)}, {report.requests} requests -> "
          f"{out_dir / 'askg.json'}")
    return 0


def _cmd_prompts(args) -> int:
    dataset, graphs = load_graphs(_graph_source(args.graph), allow_missing=args.allow_missing)
    prompts = prompt_lists(graphs, args.only)
    askg_lib.atomic_write_json(Path(args.out), prompts)
    count = sum(len(v) for v in prompts.values())
    print(f"{len(prompts)} classes, {count} prompts ({args.only.upper()}) -> {args.out}")
    return 0


def _cmd_inspect(args) -> int:
    _, graphs = load_graphs(_graph_source(args.graph), allow_missing=True)
    graph = graphs.get(args.class_name)
    if graph is None:
        lowered = {k.lower(): k for k in graphs}
        key = lowered.get(args.class_name.lower())
        if key is None:
            close = [k for k in graphs if args.class_name.lower() in k.lower()][:10]
            raise AskgError(f"--class {args.class_name!r}: not in {args.graph}"
                            + (f"; similar: {close}" if close else ""))
        graph, args.class_name = graphs[key], key
    if args.json:
        print(json.dumps(graph, ensure_ascii=False, indent=1))
    else:
        print(format_graph(args.class_name, graph))
    return 0


def _cmd_validate(args) -> int:
    # Every file is read first: one that cannot be read or is not JSON is bad input (exit 2, one line).
    documents = [(path, read_json_file(path)) for path in map(_graph_source, args.files)]
    status = 0
    for path, document in documents:
        notes: list[str] = []
        errors = validate_askg_document(document, str(path), require_complete=not args.partial, notes=notes)
        if errors:
            status = 1
            print(f"{path}: {len(errors)} error(s)")
            for error in errors[: args.max_errors]:
                print(f"  {error}")
            if len(errors) > args.max_errors:
                print(f"  ... {len(errors) - args.max_errors} more")
        else:
            print(f"{path}: OK")
        if notes:  # valid: relations naming an entity in neither list of their graph
            print(f"{path}: {len(notes)} relation(s) name an entity in neither list (valid)")
            for note in notes[: args.max_errors]:
                print(f"  note: {note}")
            if len(notes) > args.max_errors:
                print(f"  ... {len(notes) - args.max_errors} more")
    return status


def _cmd_import_release(args) -> int:
    result = import_release(args.askg, args.xprompt, dataset=args.set, labels=args.labels,
                            num_templates=args.templates)
    written = write_release_import(result, args.out)
    report = result.report
    prompts = result.prompts["prompts.json"]
    print(f"{args.set}: {report['classes_with_prompts']}/{report['project_classes']} classes with prompts, "
          f"{report['classes_with_graphs']} with graphs; {sum(len(v) for v in prompts.values())} prompts "
          f"({len(report['templates'])} templates, {report['template_source']}) -> {written.get('prompts.json')}")
    malformed = sum(report["malformed_triples"].values())
    if malformed:
        print(f"{malformed} malformed triples left out ({report['malformed_triples']}); examples in "
              f"{written['report.json']}")
    outside = report["classes_outside_the_graph_schema"]
    if outside:
        print(f"{len(outside)} graphs do not meet this project's ASKG schema (see report.json; "
              f"python -m stdd.askg validate {written['askg.json']})")
    unlisted = report["relations_to_unlisted_entities"]
    if unlisted:
        print(f"{sum(len(v) for v in unlisted.values())} relations of {len(unlisted)} graphs name an entity in "
              f"neither of their lists (valid; listed in report.json)")
    for argument, items in report["release_entries_matched_inexactly"].items():
        if items:
            print(f"{argument}: {len(items)} entries matched other than by their exact name "
                  f"(release_entries_matched_inexactly in report.json):", file=sys.stderr)
            for item in items:
                print(f"  {describe_match(item)}", file=sys.stderr)
    for argument, names in report["release_classes_unmatched"].items():
        if names:
            hint = "" if args.labels else " (with --labels they are also matched by position, as the release pairs them)"
            print(f"{argument}: {len(names)} classes match no {args.set} class: {names[:10]}{hint}", file=sys.stderr)
    if report["label_classes_unmatched"]:
        print(f"--labels: {len(report['label_classes_unmatched'])} classes match no {args.set} class: "
              f"{report['label_classes_unmatched'][:10]}", file=sys.stderr)
    if report["xprompt_entries_out_of_label_order"]:
        print(f"{len(report['xprompt_entries_out_of_label_order'])} --xprompt entries are not at their --labels "
              f"position (the release pairs them by position; here each is matched to its class by name first)",
              file=sys.stderr)
    if result.missing:
        print(f"{len(result.missing)} {args.set} classes have no prompts: {result.missing[:10]}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m stdd.askg", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every retry")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build graphs + prompts with an LLM endpoint")
    build.add_argument("--classes", required=True, help="class-list file (one name per line) or a set name")
    build.add_argument("--out", required=True, help="output directory (cache; rerun to resume)")
    build.add_argument("--dataset", help="display-name rule / dataset label for a class file "
                                         "(ucf101: CamelCase split, hmdb51: underscores; default: names as written)")
    build.add_argument("--model", default=askg_lib.DEFAULT_MODEL)
    build.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    build.add_argument("--api-key-env", default=askg_lib.DEFAULT_API_KEY_ENV,
                       help="name of the environment variable holding the API key (the key itself is never a flag)")
    build.add_argument("--concurrency", type=int, default=4)
    build.add_argument("--retries", type=int, default=3, help="retries per stage after the first attempt")
    build.add_argument("--temperature", type=float, default=askg_lib.DEFAULT_TEMPERATURE)
    build.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds (doubles each retry)")
    build.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    build.add_argument("--no-json-mode", action="store_true",
                       help="do not send response_format=json_object (servers that reject it)")
    build.add_argument("--limit", type=int, default=0, help="only the first N classes (trial runs)")
    build.set_defaults(func=_cmd_build)

    prompts = sub.add_parser("prompts", help="write {class: [prompt, ...]} from graphs")
    prompts.add_argument("--graph", required=True, help="build directory, ASKG json, or shipped set name")
    prompts.add_argument("--out", required=True)
    prompts.add_argument("--only", default="ST", choices=["S", "T", "ST", "s", "t", "st"],
                         help="S: spatial, T: temporal, ST: both (default)")
    prompts.add_argument("--allow-missing", action="store_true", help="accept a partly built directory")
    prompts.set_defaults(func=_cmd_prompts)

    inspect = sub.add_parser("inspect", help="print one class's graph and prompts")
    inspect.add_argument("--graph", required=True)
    inspect.add_argument("--class", dest="class_name", required=True)
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=_cmd_inspect)

    validate = sub.add_parser("validate", help="schema-check ASKG files")
    validate.add_argument("files", nargs="+", help="ASKG json files or shipped set names")
    validate.add_argument("--partial", action="store_true", help="do not require every class")
    validate.add_argument("--max-errors", type=int, default=50, help="errors listed per file (default 50)")
    validate.set_defaults(func=_cmd_validate)

    release = sub.add_parser("import-release", help="read the authors' released knowledge files (YAML)")
    release.add_argument("--askg", required=True, help="classes_ASKG_<set>.yml (objects, sub-actions, triples)")
    release.add_argument("--xprompt", required=True, help="classes_xprompt_<set>.yml (xprompt_oo/ao/aa clauses)")
    release.add_argument("--labels", help="classes_label_<set>.yml (templates; default: this project's templates)")
    release.add_argument("--set", required=True, choices=RELEASE_SETS, help="the class list to map the names onto")
    release.add_argument("--out", required=True, help="output directory")
    release.add_argument("--templates", type=int, default=RELEASE_TEMPLATE_COUNT,
                         help=f"use the first N templates (default {RELEASE_TEMPLATE_COUNT}, the release's runs)")
    release.set_defaults(func=_cmd_import_release)
    return parser


def run(argv: list[str] | None = None) -> int:
    """The command line's work; errors are raised (:func:`main` reports them)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "build" else logging.WARNING,
                        format="%(levelname)s %(message)s")
    # The HTTP client logs every request URL at INFO: keep the console about the ASKG run, and
    # redact whatever any logger prints (secrets, URL credentials and query strings).
    for name in askg_lib.HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    askg_lib.install_log_redaction(*logging.getLogger().handlers)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m stdd.askg``: exit status as in the module docstring (:func:`stdd.cli.cli_main`)."""
    return cli_main(run, argv)
