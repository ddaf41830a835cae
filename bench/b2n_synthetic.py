"""The base-to-novel pipeline on synthetic motion videos, on the CPU: does STDD recognise motions it was not
trained on better than the frame-only model?

    python bench/b2n_synthetic.py --machine cpu_2core [--seeds 1 2 3] [--wait-idle] [--work-dir DIR]
        [--out bench/results/b2n_synthetic_<machine>.json] [key=value ...]

What it runs, as a user runs the published protocol (``python -m stdd.train`` per seed, then one
``python -m stdd.eval --protocol base2novel`` over the seeds' models), for STDD and for the frame-only
baseline (``model.stca.enabled=false``):

1. four of the demo's motion classes (``stdd.data.synthetic``), split into base classes -- moving left,
   moving right -- and novel classes -- moving up, moving down -- written as a split folder
   (``split.json``, ``stdd.data.annotations.write_split_folder``): per seed a training list that draws
   ``--per-class`` videos of every base class from a pool, a base and a novel validation list;
2. training on a seed's list with the base classes' prompts only (``data.dataset=published``), the demo
   preset's tiny model from random weights (its STCA, 4-frame clips), ``run.seed`` = the split seed, for
   :data:`RECIPE` (20 epochs of batches of 16: on seed 1's list of 128 videos a class, 15 epochs of
   batches of 32 taught this model left from right to 65.6% base top-1, 20 epochs of 16 to 87.5%, on
   16 validation videos a class);
3. scoring every seed's model on the base classes (base videos, base prompts) and on the novel classes
   (novel videos, novel prompts), then the seed average and HM = 2BN / (B + N).

The text side. A model from random weights has no text tower that knows what the words mean, and the
demo's ``text.features: orthogonal`` gives every class a vector unrelated to every other's: with it no
model can score a class it was not trained on (its vector was never a target). Transfer needs class
features that share structure between base and novel classes, so this benchmark describes each class by
two attribute words and uses ``text.features: words`` (each prompt the mean of fixed random word
vectors): the axis of the motion (horizontal, vertical) and its direction in image coordinates
(increasing, decreasing). "vertical decreasing" (moving up) shares "decreasing" with "horizontal
decreasing" (moving left). The base classes differ only in their direction, and so do the novel ones:
scoring them needs the direction of a motion, which the frame-only model cannot see, and for the novel
classes the direction learnt on horizontal motion applied to vertical motion, an axis never trained
on. Chance is 50% on either.

What it can show: whether the direction STDD learns transfers, through the shared word, to motion along
an unseen axis, at this scale; and that the protocol runs end to end (split folder, per-seed training,
evaluation, seed average, HM). What it cannot show: anything about STDD with a pretrained CLIP on real
videos, where the text tower's knowledge carries the transfer and novel classes differ from base ones
in much more than one attribute; nor the 16-shot regime (a from-scratch ViT needs more videos per class
to learn motion at all: ``--per-class``, default 96), nor, with one synthetic split and three seeds, a
difference of a few points.

Writes one JSON record (both models' evaluation reports, per seed and averaged; the commands; times;
machine, date, commit) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from provenance import git_commit  # noqa: E402

from stdd.files import atomic_write  # noqa: E402

BASE_CLASSES = ("moving left", "moving right")
NOVEL_CLASSES = ("moving up", "moving down")
# axis word + direction word; "increasing": x or y grows (image y grows downwards)
ATTRIBUTE_PROMPTS = {
    "moving left": ["horizontal decreasing"],
    "moving right": ["horizontal increasing"],
    "moving up": ["vertical decreasing"],
    "moving down": ["vertical increasing"],
}
VARIANTS = {"stdd": "model.stca.enabled=true", "frame_only": "model.stca.enabled=false"}
RECIPE = ("optim.epochs=20", "data.batch_size=16")  # on top of the demo preset; see step 2 above


def make_split(work: Path, *, seeds, pool_per_class: int, per_class: int, val_per_class: int, size: int = 32,
               frames: int = 16, data_seed: int = 0):
    """Generate the videos under ``work/videos`` and write the split folder ``work/split``; returns
    ``(split folder, video root)``. Each seed's list draws ``per_class`` of the ``pool_per_class``
    training videos of every base class (numpy's generator seeded by the seed)."""
    import numpy as np

    from stdd.data import generate_synthetic_dataset
    from stdd.data.annotations import write_split_folder

    if per_class > pool_per_class:
        raise SystemExit(f"--per-class {per_class} > --pool-per-class {pool_per_class}")
    classes = [*BASE_CLASSES, *NOVEL_CLASSES]
    generated = generate_synthetic_dataset(
        work / "videos", videos_per_class={"train": pool_per_class, "val": val_per_class}, classes=classes,
        num_frames=frames, height=size, width=size, seed=data_seed)

    def entries(split):  # (relative path, class name) of a generated list
        lines = generated.annotation_files[split].read_text().splitlines()
        return [(path, classes[int(label)]) for path, label in (line.rsplit(maxsplit=1) for line in lines)]

    pool, val = entries("train"), entries("val")
    train = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        chosen = []
        for label, name in enumerate(BASE_CLASSES):
            videos = [path for path, cls in pool if cls == name]
            chosen += [(videos[i], label) for i in sorted(rng.choice(len(videos), per_class, replace=False))]
        train[seed] = chosen
    split = write_split_folder(
        work / "split", protocol="base2novel", classes={"base": BASE_CLASSES, "novel": NOVEL_CLASSES},
        train_key="seed", train_part="base", train=train,
        val={part: [(path, names.index(cls)) for path, cls in val if cls in names]
             for part, names in (("base", BASE_CLASSES), ("novel", NOVEL_CLASSES))},
        prompts=ATTRIBUTE_PROMPTS)
    return split.folder, generated.root


def train_command(split: Path, root: Path, run_dir: Path, seed: int, variant: str, overrides=()) -> list[str]:
    """``python -m stdd.train`` of one seed: the demo preset's tiny model on the split's list of ``seed``."""
    return [sys.executable, "-m", "stdd.train", "--config", "demo", "data.dataset=published",
            "data.published.protocol=base2novel", f"data.published.dataset={split}", f"data.published.seed={seed}",
            f"data.root={root}", "text.prompts=dataset", "text.features=words", f"run.seed={seed}",
            f"run.output_dir={run_dir}", "run.tensorboard=false", VARIANTS[variant], *RECIPE, *overrides]


def eval_command(split: Path, root: Path, checkpoints, out: Path, overrides=()) -> list[str]:
    """One ``python -m stdd.eval --protocol base2novel`` over every seed's model."""
    return [sys.executable, "-m", "stdd.eval", "--protocol", "base2novel", "--dataset", str(split), "--root",
            str(root), "--checkpoint", *map(str, checkpoints), "--out-dir", str(out), "--quiet", *overrides]


def _run(command, log) -> float:
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    log.append({"command": "python " + " ".join(command[1:]), "seconds": round(time.time() - start, 1)})
    return time.time() - start


def run_pipeline(work: Path, *, seeds, pool_per_class: int, per_class: int, val_per_class: int,
                 overrides=(), eval_overrides=()) -> dict:
    """Both models through the whole protocol under ``work``; returns their evaluation reports and the commands."""
    start = time.time()
    split, root = make_split(work, seeds=seeds, pool_per_class=pool_per_class, per_class=per_class,
                             val_per_class=val_per_class)
    generation = time.time() - start
    commands, reports = [], {}
    for variant in VARIANTS:
        checkpoints = []
        for seed in seeds:
            run_dir = work / f"{variant}_s{seed}"
            _run(train_command(split, root, run_dir, seed, variant, overrides), commands)
            checkpoints.append(run_dir / "final.pt")
        out = work / f"eval_{variant}"
        _run(eval_command(split, root, checkpoints, out, eval_overrides), commands)
        reports[variant] = json.loads((out / "results.json").read_text())
    return {"reports": reports, "commands": commands, "data_generation_seconds": round(generation, 1),
            "seconds": round(time.time() - start, 1)}


def table(record: dict) -> str:
    lines = ["| model | seed | base top-1 | novel top-1 | HM |", "|---|---|---|---|---|"]
    for variant, report in record["reports"].items():
        for run in report["runs"]:
            lines.append(f"| {variant} | {run['seed']} | {run['base']['top1']:.1f} | {run['novel']['top1']:.1f} | "
                         f"{run['hm']:.1f} |")
        lines.append(f"| {variant} | mean | {report['base_top1_mean']:.1f} | {report['novel_top1_mean']:.1f} | "
                     f"{report['hm']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machine", required=True, help="a short name of this machine for the record (cpu_2core)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="split seeds (one training list each)")
    parser.add_argument("--pool-per-class", type=int, default=112, help="generated training videos per base class")
    parser.add_argument("--per-class", type=int, default=96, help="videos per base class in a seed's training list")
    parser.add_argument("--val-per-class", type=int, default=64,
                        help="validation videos per class (64: chance-level top-1 on 128 novel videos has a "
                             "binomial standard error of 4.4 points)")
    parser.add_argument("--wait-idle", action="store_true", help="wait (at most 10 minutes) for a 1-minute load "
                                                                 "average below 0.5 before starting")
    parser.add_argument("--work-dir", help="where the runs go (default: a temporary directory, deleted after)")
    parser.add_argument("--out", help="the record (default: bench/results/b2n_synthetic_<machine>.json)")
    parser.add_argument("overrides", nargs="*", help="training config overrides key=value (every run)")
    args = parser.parse_args(argv)
    out = Path(args.out or REPO / "bench" / "results" / f"b2n_synthetic_{args.machine}.json")
    waited = 0.0
    if args.wait_idle:
        begin = time.time()
        while os.getloadavg()[0] >= 0.5 and time.time() - begin < 600:
            time.sleep(5)
        waited = round(time.time() - begin, 1)
    load_before = os.getloadavg()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="stdd-b2n-synthetic-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_pipeline(work, seeds=args.seeds, pool_per_class=args.pool_per_class, per_class=args.per_class,
                              val_per_class=args.val_per_class, overrides=list(args.overrides))
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    reports = result["reports"]
    record = {
        "what": "base-to-novel on synthetic motion classes: STDD vs frame-only, one training run per split seed, "
                "then python -m stdd.eval --protocol base2novel over the seeds' models",
        "base_classes": list(BASE_CLASSES), "novel_classes": list(NOVEL_CLASSES), "prompts": ATTRIBUTE_PROMPTS,
        "text_features": "words", "seeds": args.seeds, "pool_per_class": args.pool_per_class,
        "per_class": args.per_class, "val_per_class": args.val_per_class, "overrides": list(args.overrides),
        "summary": {variant: {"base": report["base_top1_mean"], "novel": report["novel_top1_mean"],
                              "hm": report["hm"]} for variant, report in reports.items()},
        "stdd_minus_frame_only": {key: round(reports["stdd"][name] - reports["frame_only"][name], 2)
                                  for key, name in (("base", "base_top1_mean"), ("novel", "novel_top1_mean"),
                                                    ("hm", "hm"))},
        **result,
        "waited_for_idle_seconds": waited,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine_name": args.machine,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git": git_commit(("stdd", "stdd_kernels", "bench", "csrc")),
    }
    atomic_write(out, json.dumps(record, indent=1) + "\n")
    print(table(record))
    print(f"whole pipeline {result['seconds']:.0f} s; record written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
