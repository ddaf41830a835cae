"""Training-phase policies of STCA on the demo task: the paper's shared per-clip draw vs the release's.

    python bench/phase_policy.py --out bench/results/phase_policy_<machine>.json [--work-dir DIR]
        [--policies paper,shuffle,release] [key=value ...]

Trains an STDD model of the demo task (tiny open_clip ViT, synthetic motion classes) once per
policy, with window-shift masking on, same seed, data and budget, and evaluates each with the
deterministic evaluation phases ``t mod K``. The model is pinned to the one the recorded run used
(``MASKING``: the ``demo`` preset of that time with masking switched on: the 4x4-grid
``STDD-Tiny-ViT``, ``mask_ratio=0.5``, ``channel_fold=4``, text features from the frozen tower).
Policies:

- ``paper``: a random per-clip offset shared by every block (``shuffle_phases=false``,
  ``per_block_phases=false``; the ``k400_vitb16`` preset);
- ``shuffle``: the offset, then the clip's frame phases permuted, still shared by the blocks;
- ``release``: shuffled and drawn independently in every block (the authors' release,
  ``k400_vitb16_official``).

Also times one draw of training phases at ViT-B/16 shape (12 blocks, batch 4, 8 frames) per
policy: the per-batch cost of the sampler. Timings depend on the machine and its load; the JSON
carries both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from provenance import git_commit  # noqa: E402

POLICIES = {
    "paper": {"model.stca.shuffle_phases": "false", "model.stca.per_block_phases": "false"},
    "shuffle": {"model.stca.shuffle_phases": "true", "model.stca.per_block_phases": "false"},
    "release": {"model.stca.shuffle_phases": "true", "model.stca.per_block_phases": "true"},
}
MASKING = ["model.clip_name=STDD-Tiny-ViT", "model.stca.mask_ratio=0.5", "model.stca.channel_fold=4",
           "text.features=encoder", "optim.epochs=28"]


def sampler_seconds(policy: str, repeats: int = 50) -> float:
    """Seconds per training-phase draw of a ViT-B/16 batch (12 blocks, 4 clips, 8 frames)."""
    from stdd.model import STCASettings
    from stdd.model.phases import PhaseSampler

    values = POLICIES[policy]
    settings = STCASettings(shuffle_phases=values["model.stca.shuffle_phases"] == "true",
                            per_block_phases=values["model.stca.per_block_phases"] == "true")
    sampler = PhaseSampler(settings, seed=0, num_blocks=12)
    sampler(range(4), epoch=0, num_frames=8)  # warm-up
    start = time.perf_counter()
    for step in range(repeats):
        sampler(range(4 * step, 4 * step + 4), epoch=0, num_frames=8)
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--work-dir", default="runs/phase_policy", help="videos and runs go here")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of " + ",".join(POLICIES))
    parser.add_argument("overrides", nargs="*", help="demo config overrides key=value (every run)")
    args = parser.parse_args()
    from stdd.engine.comparison import train_and_evaluate
    from stdd.engine.config import apply_overrides, load_config
    from stdd.engine.task import prepare_synthetic

    work = Path(os.path.expanduser(args.work_dir))
    base = load_config("demo", [f"data.root={work / 'data'}", *MASKING, *args.overrides])
    prepare_synthetic(base)
    results = {}
    for policy in args.policies.split(","):
        cfg = apply_overrides(base, [f"{k}={v}" for k, v in POLICIES[policy].items()]
                              + [f"run.output_dir={work / policy}", "run.tensorboard=false"])
        load = os.getloadavg()[0]
        results[policy] = {
            **train_and_evaluate(cfg, quiet=True),
            "load_average_1min_at_start": round(load, 2), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "sampler_ms_per_vitb16_batch": round(1e3 * sampler_seconds(policy), 3),
        }
        print(policy, json.dumps(results[policy]), flush=True)
    record = {
        "what": "demo STDD with mask_ratio=0.5, channel_fold=4, one training per phase policy; "
                "evaluation phases t mod K",
        "overrides": [*MASKING, *args.overrides], "seed": int(base.run.seed), "epochs": int(base.optim.epochs),
        "results": results,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git_commit": git_commit(("stdd", "stdd_kernels", "bench"))["commit"],
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
