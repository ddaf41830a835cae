"""Table 4 of the paper (the STCA operations x the adaptation method) on the CPU demo task, over seeds.

    python bench/ablations.py --machine cpu_2core [--seeds 0 1 2] [--work-dir DIR]
        [--out bench/results/ablations_table4_<machine>.json] [key=value ...]

The paper's rows start from CLIP, an image model that has never seen two frames together. The demo task
has no such model (nothing is downloaded here), so each seed first trains one: the demo's frame-only run
(``python -m stdd.demo``'s baseline: the tiny ViT, open_clip's own blocks, the demo's budget) on the
synthetic motion set, exported as an open_clip CLIP weights file. It learns what single frames show
(shape, colour, size), so it can tell growing from shrinking only by chance and left from right not at
all. Then, for that seed, every row of Table 4 starts from that file (``model.pretrained``):

- ``frozen``: the file's model as it is, scored on the held-out videos (preset ``table4_frozen``);
- ``prompt-based``: the tower frozen, STCA on, only the prompt generators train (``model.adaptation:
  prompt``), with window-shift masking off / on and multi-scale channel mixing separate / continual
  (presets ``table4_prompt_*``);
- ``fully-tuned``: the same four with every weight trained (presets ``table4_full_*``).

Each row takes from its preset exactly the keys a Table 4 row is about (:data:`ROW_KEYS`: adaptation,
prompt settings, masking, mixing, temporal kind, raw-CLIP averaging); everything else is the demo's
(``stdd/configs/demo.yaml``: data, model size, 10 epochs, lr 3e-3 for every row), so the rows differ only
in what the table compares. Runs go in-process, one after the other; a seed's runs share the decoded
videos (``data.frame_cache_mb``). Writes one JSON record (every run's top-1, top-5, per-class top-1 and
times; per row the median and range over seeds; the machine, date, commit) and prints the table in Table
4's layout, with the commands that run the same grid on Kinetics-400 -> UCF101 at full scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from provenance import git_commit  # noqa: E402

from stdd.engine.checkpoint import load_weights  # noqa: E402
from stdd.engine.comparison import train_and_evaluate  # noqa: E402
from stdd.engine.config import PRESET_DIR, load_config  # noqa: E402
from stdd.engine.metrics import confusion_matrix, per_class_accuracy  # noqa: E402
from stdd.engine.trainer import Trainer  # noqa: E402
from stdd.files import atomic_write  # noqa: E402
from stdd.model import load_clip  # noqa: E402

# Table 4's rows, in its order: (row label, preset). The presets are the rows' one home.
ROWS = (
    ("Frozen", "table4_frozen"),
    ("Prompt-based: MCM separate", "table4_prompt_mcm_separate"),
    ("Prompt-based: MCM continual", "table4_prompt_mcm_continual"),
    ("Prompt-based: WSM + MCM separate", "table4_prompt_wsm_mcm_separate"),
    ("Prompt-based: WSM + MCM continual", "table4_prompt_wsm_mcm_continual"),
    ("Fully-tuned: MCM separate", "table4_full_mcm_separate"),
    ("Fully-tuned: MCM continual", "table4_full_mcm_continual"),
    ("Fully-tuned: WSM + MCM separate", "table4_full_wsm_mcm_separate"),
    ("Fully-tuned: WSM + MCM continual", "table4_full_wsm_mcm_continual"),
)
# The keys a Table 4 row is about: taken from its preset; every other key is the demo's.
ROW_KEYS = ("model.temporal", "model.adaptation", "model.prompt.tokens", "model.prompt.hidden",
            "model.stca.mask_ratio", "model.stca.mixing", "averaging.include_raw_clip")
BASE = "demo"
DIRECTIONS = ("moving left", "moving right", "moving up", "moving down")  # what only motion tells apart


def row_overrides(preset: str) -> list[str]:
    """``key=value`` of :data:`ROW_KEYS` as the preset sets them."""
    cfg = load_config(preset)
    out = []
    for key in ROW_KEYS:
        value = OmegaConf.select(cfg, key)
        out.append(f"{key}={'null' if value is None else value}")
    return out


def export_clip(weights_file: Path, clip_name: str, out: Path, seed: int) -> Path:
    """The image tower of a frame-only run (``final.pt``) as an open_clip CLIP weights file ``out``: the text
    tower is the seed's random one (the demo's text side is a fixed orthonormal class feature; it reads no
    tower)."""
    state = load_weights(weights_file)["model"]
    prefix = "video_encoder.visual."
    visual = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, _ = load_clip(clip_name, None, allow_random_init=True)
    clip.visual.load_state_dict(visual, strict=True)
    torch.save(clip.state_dict(), out)
    return out


def evaluate_only(cfg) -> dict:
    """Top-1 of the configured weights on the held-out videos, nothing trained (the frozen row)."""
    start = time.time()
    trainer = Trainer(cfg, quiet=True)
    try:
        evaluation = trainer.evaluate(details=True)
        class_names = list(trainer.task.class_names)
    finally:
        trainer.close()
    return _result(evaluation, class_names, time.time() - start)


def _result(evaluation: dict, class_names, seconds: float) -> dict:
    """The row of an evaluation, with its per-class top-1 as ``train_and_evaluate`` gives it."""
    matrix = confusion_matrix(torch.tensor(evaluation["val_labels"]), torch.tensor(evaluation["val_predictions"]),
                              len(class_names))
    accuracy, counts = per_class_accuracy(matrix)
    per_class = {name: round(float(value), 2) for name, value, count in zip(class_names, accuracy, counts) if count}
    return {"top1": evaluation["val_top1"], "top5": evaluation["val_top5"], "per_class_top1": per_class,
            "seconds": round(seconds, 1)}


def directions_top1(per_class: dict) -> float:
    values = [per_class[name] for name in DIRECTIONS if name in per_class]
    return round(sum(values) / len(values), 2) if values else float("nan")


def run_seed(seed: int, work: Path, extra: list[str], say) -> dict:
    common = [f"run.seed={seed}", f"data.root={work / 'data'}", "run.tensorboard=false", *extra]
    seed_dir = work / f"seed{seed}"
    say(f"seed {seed}: the image-model stand-in (frame-only, the demo's budget)")
    standin_cfg = load_config(BASE, [*common, "model.temporal=none", f"run.output_dir={seed_dir / 'clip_standin'}"])
    standin = train_and_evaluate(standin_cfg, quiet=True)
    clip_file = export_clip(seed_dir / "clip_standin" / "final.pt", str(standin_cfg.model.clip_name),
                            seed_dir / "clip_standin.pt", seed)
    rows = {"clip_standin": {key: standin[key] for key in ("top1", "top5", "per_class_top1", "seconds")}}
    for label, preset in ROWS:
        overrides = [*common, f"model.pretrained={clip_file}", *row_overrides(preset),
                     f"run.output_dir={seed_dir / preset}"]
        cfg = load_config(BASE, overrides)
        if preset == "table4_frozen":
            result = evaluate_only(cfg)
        else:
            trained = train_and_evaluate(cfg, quiet=True)
            result = {key: trained[key] for key in ("top1", "top5", "per_class_top1", "seconds")}
        result["directions_top1"] = directions_top1(result["per_class_top1"])
        result["overrides"] = overrides
        rows[preset] = result
        say(f"seed {seed}: {label}: top-1 {result['top1']:.2f} (directions {result['directions_top1']:.2f}) "
            f"in {result['seconds']:.0f} s")
    return rows


def summary_table(seeds: dict) -> tuple[dict, list[str]]:
    summary, lines = {}, ["| Table 4 row | top-1 median (min-max) | four directions: top-1 median (min-max) |",
                          "|---|---|---|"]
    for label, preset in ROWS:
        top1 = [seeds[s][preset]["top1"] for s in seeds]
        directions = [seeds[s][preset]["directions_top1"] for s in seeds]
        summary[preset] = {"row": label, "top1": _spread(top1), "directions_top1": _spread(directions)}
        lines.append(f"| {label} | {_text(summary[preset]['top1'])} | {_text(summary[preset]['directions_top1'])} |")
    return summary, lines


def _spread(values) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "values": [round(v, 2) for v in values]}


def _text(spread: dict) -> str:
    return f"{spread['median']:.1f} ({spread['min']:.1f}-{spread['max']:.1f})"


def full_scale_commands() -> list[str]:
    """The same grid on Kinetics-400 -> UCF101 (EP3) at full scale: what each preset's header says."""
    evaluate = ("--protocol ep3 --format ucf101 --classes ucf101 --root /data/ucf101/videos "
                "--annotations testlist01.txt testlist02.txt testlist03.txt")
    lines = []
    for _, preset in ROWS:
        if preset == "table4_frozen":
            lines.append(f"python -m stdd.eval --config {preset} {evaluate} --out-dir runs/{preset}")
        else:
            lines.append(f"torchrun --nproc_per_node=8 -m stdd.train --config {preset} data.root=/data/k400 "
                         "data.train_annotations=/data/k400/train.csv data.val_annotations=/data/k400/val.csv && "
                         f"python -m stdd.eval --checkpoint runs/{preset}/averaged.pt {evaluate} "
                         f"--out-dir runs/{preset}/eval_ucf101")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", required=True, help="a name for this machine in the record (e.g. cpu_2core)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", help="where the videos and runs go (default: a new temporary directory)")
    parser.add_argument("--out", help="the JSON record (default bench/results/ablations_table4_<machine>.json)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. optim.epochs=2 for a quick look)")
    args = parser.parse_args(argv)
    for preset in (p for _, p in ROWS):
        if not (PRESET_DIR / f"{preset}.yaml").is_file():
            parser.error(f"the preset {preset} is missing from {PRESET_DIR}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="stdd-ablations-"))
    out = Path(args.out or REPO / "bench" / "results" / f"ablations_table4_{args.machine}.json")
    start = time.time()
    seeds = {}
    for seed in args.seeds:
        seeds[seed] = run_seed(seed, work, list(args.overrides), lambda text: print(text, flush=True))
    summary, lines = summary_table(seeds)
    record = {
        "what": "Table 4 (STCA operations x adaptation) on the CPU demo task: every row from the seed's frame-only "
                "image-model stand-in, the demo's budget otherwise (bench/ablations.py docstring)",
        "base_preset": BASE, "row_keys": list(ROW_KEYS), "overrides": list(args.overrides),
        "seeds": list(args.seeds), "summary": summary, "runs": {str(s): seeds[s] for s in seeds},
        "full_scale_commands": full_scale_commands(),
        "wall_seconds": round(time.time() - start, 1),
        "machine_name": args.machine, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                  "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"), "git": git_commit(("stdd", "stdd_kernels", "bench", "csrc")),
    }
    atomic_write(out, json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    print(f"image-model stand-in (frame-only) top-1: "
          f"{_text(_spread([seeds[s]['clip_standin']['top1'] for s in seeds]))}; seeds {args.seeds}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
