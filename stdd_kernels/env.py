"""``python -m stdd_kernels.env [--json] [--require BACKENDS]``: what this machine can run.

Prints library versions, the GPU (if any), whether DALI / xformers / the C++
extension are importable, what the install built (the build record of
:mod:`stdd_kernels.build_info`), and which STCA backends are registered (and
why the missing ones are missing). Paste its output into bug reports.
``--require cpp,cuda`` exits with status 1 when one of those is unavailable.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else the error (some packages install but fail to import)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(error).__name__}: {error}"
    return None


def collect() -> dict:
    import torch

    import stdd_kernels
    from stdd_kernels.build_info import read_record

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    optional = {}
    for label, distribution, module in (
        ("triton", "triton", "triton"),
        ("open_clip", "open_clip_torch", "open_clip"),
        ("pyav", "av", "av"),
        ("dali", "nvidia-dali-cuda130", "nvidia.dali"),
        ("xformers", "xformers", "xformers"),
        ("openai", "openai", "openai"),
        ("omegaconf", "omegaconf", "omegaconf"),
    ):
        error = _importable(module)
        optional[label] = {"version": _version(distribution), "usable": error is None, "error": error}
    backends = {
        name: {"available": True, "description": backend.description, "auto": backend.auto_priority}
        for name, backend in stdd_kernels.registered_backends().items()
    }
    for name, reason in stdd_kernels.unavailable_backends().items():
        backends[name] = {"available": False, "reason": reason}
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "stdd_backend_env": os.environ.get(stdd_kernels.ENV_VAR),
        "packages": optional,
        "extension_build": read_record(),
        "backends": backends,
    }


def format_report(report: dict) -> str:
    lines = [
        f"python        {report['python']} ({report['platform']})",
        f"torch         {report['torch']} (CUDA build: {report['torch_cuda_build'] or 'none'})",
        f"CUDA GPU      "
        + (
            ", ".join(f"{g['name']} (sm_{g['capability']}, {g['memory_gib']} GiB)" for g in report["gpus"])
            if report["gpus"]
            else "none"
        ),
        f"TRITON_INTERPRET=1: {report['triton_interpret']}   STDD_BACKEND: {report['stdd_backend_env'] or '(unset: auto)'}",
        "",
        "packages:",
    ]
    for name, info in report["packages"].items():
        state = "ok" if info["usable"] else f"NOT USABLE ({info['error']})"
        lines.append(f"  {name:<10} {info['version'] or '-':<16} {state}")
    build = report["extension_build"]
    if build is None:
        state = "no build record (not installed by setup.py, e.g. built with CMake)"
    elif build.get("built"):
        state = f"built, {build.get('kind')}"
    else:
        state = f"not built: {build.get('reason')}"
    lines += ["", f"C++/CUDA extension build: {state}", "", "STCA backends:"]
    for name, info in report["backends"].items():
        if info["available"]:
            auto = ", ".join(f"{k}:{v}" for k, v in info["auto"].items()) or "explicit only"
            lines.append(f"  {name:<10} available   auto priority [{auto}]  {info['description']}")
        else:
            lines.append(f"  {name:<10} unavailable {info['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stdd_kernels.env", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--require", default="", metavar="BACKENDS",
        help="comma-separated backends (e.g. cpp,cuda): exit with status 1 unless all are available",
    )
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    required = [name.strip() for name in args.require.split(",") if name.strip()]
    missing = [name for name in required if not report["backends"].get(name, {}).get("available")]
    for name in missing:
        reason = report["backends"].get(name, {}).get("reason", "no such backend")
        print(f"required backend {name!r} is unavailable: {reason}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
