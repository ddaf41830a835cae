"""The demo over several seeds, as a user runs it: one fresh ``python -m stdd.demo`` process per seed.

    python bench/demo_seeds.py --machine cpu_2core [--variant paper] [--seeds 0 1 2] [--wait-idle]
        [--work-dir DIR] [--out bench/results/demo_<variant>_<machine>.json] [key=value ...]

Each seed runs ``python -m stdd.demo --variant V --work-dir DIR/seed<N> --out ... run.seed=N`` in a new
process and an empty work directory, so its time includes what a first run on a fresh clone pays:
starting Python and torch, generating the synthetic videos, decoding them. ``wall_seconds`` is that whole
time, measured here; ``total_seconds`` is the demo's own count (from its start to its table).
``--wait-idle`` waits before each seed until the 1-minute load average is below 0.5 (at most 10 minutes)
and records the load averages before and after each seed either way: a time means something only with the
load it was measured under.

Writes one JSON record: every seed's full demo summary, the margin (STDD minus frame-only top-1) per seed,
its median and range, the machine, date and commit; and prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from provenance import git_commit  # noqa: E402

from stdd.engine.comparison import DEFAULT_VARIANT, DEMO_VARIANTS  # noqa: E402
from stdd.files import atomic_write  # noqa: E402


def wait_until_idle(limit_seconds: float = 600.0, threshold: float = 0.5) -> float:
    """Seconds waited for the 1-minute load average to drop below ``threshold`` (gives up after the limit)."""
    start = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - start < limit_seconds:
        time.sleep(5)
    return round(time.time() - start, 1)


def run_seed(seed: int, variant: str, work: Path, overrides: list[str], wait_idle: bool) -> dict:
    waited = wait_until_idle() if wait_idle else 0.0
    load_before = os.getloadavg()
    summary_file = work / f"summary_seed{seed}.json"
    command = [sys.executable, "-m", "stdd.demo", "--variant", variant, "--work-dir", str(work / f"seed{seed}"),
               "--quiet", "--out", str(summary_file), f"run.seed={seed}", *overrides]
    start = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"seed {seed}: the demo failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    print("\n".join(summary["table"][:4]), flush=True)
    return {
        "seed": seed,
        "command": "python -m stdd.demo " + " ".join(command[3:]),
        "wall_seconds": round(wall, 1),
        "waited_for_idle_seconds": waited,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "margin": summary["stca_minus_frame_only_top1"],
        "stdd_top1": summary["results"]["stdd"]["top1"],
        "frame_only_top1": summary["results"]["frame_only"]["top1"],
        "summary": summary,
    }


def markdown_table(record: dict) -> str:
    lines = ["| seed | STDD top-1 | frame-only top-1 | margin | whole demo (wall) | load before / after |",
             "|---|---|---|---|---|---|"]
    for row in record["seeds"]:
        lines.append(f"| {row['seed']} | {row['stdd_top1']:.1f} | {row['frame_only_top1']:.1f} | "
                     f"{row['margin']:+.1f} | {row['wall_seconds']:.0f} s | "
                     f"{row['load_average_before'][0]:.2f} / {row['load_average_after'][0]:.2f} |")
    margins = record["margin"]
    lines.append(f"\nmargin: median {margins['median']:+.1f}, range {margins['min']:+.1f} to {margins['max']:+.1f} "
                 f"points top-1; wall time {record['wall_seconds']['min']:.0f}-{record['wall_seconds']['max']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machine", required=True, help="a short name of this machine for the record (cpu_2core)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(DEMO_VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--wait-idle", action="store_true", help="wait for an idle machine before each seed")
    parser.add_argument("--work-dir", help="where the runs go (default: a temporary directory, deleted after)")
    parser.add_argument("--out", help="the record (default: bench/results/demo_<variant>_<machine>.json)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides key=value (every seed)")
    args = parser.parse_args(argv)
    out = Path(args.out or REPO / "bench" / "results" / f"demo_{args.variant.replace('-', '_')}_{args.machine}.json")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="stdd-demo-seeds-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        seeds = [run_seed(seed, args.variant, work, list(args.overrides), args.wait_idle) for seed in args.seeds]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    margins = [row["margin"] for row in seeds]
    walls = [row["wall_seconds"] for row in seeds]
    record = {
        "what": f"python -m stdd.demo --variant {args.variant}, one fresh process and work directory per seed",
        "variant": args.variant,
        "overrides": list(args.overrides),
        "margin": {"median": statistics.median(margins), "min": min(margins), "max": max(margins)},
        "wall_seconds": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
        "seeds": seeds,
        "machine_name": args.machine,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git": git_commit(("stdd", "stdd_kernels", "bench", "csrc")),
    }
    atomic_write(out, json.dumps(record, indent=1) + "\n")
    print(markdown_table(record))
    print(f"record written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
