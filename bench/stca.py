"""STCA throughput: the gather/scatter ops and a 12-block ViT-B/16 stack, every backend.

    python bench/stca.py                      # GPU: ViT-B/16, T=8, bf16 (see defaults below)
    python bench/stca.py --tiny               # CPU smoke run in seconds (CI)
    python bench/stca.py --device cpu --op-batch 2 --skip-stack   # ViT-B/16 op shapes on CPU
    python bench/stca.py --out bench/results/stca_<machine>.json

Two sections, each printed as a table and written to ``--out`` (JSON, and CSV
next to it) with the device name, torch/triton/CUDA versions, date and git commit:

1. Ops. For every backend in ``stdd_kernels.registered_backends()`` that
   supports the device and dtype: ``mix_gather`` and ``pad_scatter`` (with the
   residual fused), forward and backward, on ViT-B/16 shapes
   (``x (B*T, 197, 768)``, scales (1, 2), window (2, 2), mask ratio 0.5).
   "public" rows call the validating public op (backward: ``torch.autograd.grad``
   through it), so they include Python validation, dispatch and autograd
   overhead; "kernel" rows call the Triton launchers directly (what the
   bandwidth target is about). GB/s counts the bytes the op must move at least:
     mix_gather fwd:  read the CLS + kept tokens of x, write mixed;
     mix_gather bwd:  read d_mixed, write d_x (all of it, zeros included);
     pad_scatter fwd: read full's non-kept tokens, mixed and residual, write out;
     pad_scatter bwd: read d_out, write d_full and d_mixed (d_residual is d_out).
   "copy" is ``dst.copy_(src)`` moving the same number of bytes on the same
   device (half read, half written); "of copy" is the op's GB/s over copy's.

2. Stack: 12 ViT-B/16 blocks (width 768, 12 heads, MLP 3072), T=8, 197 tokens,
   inference (``torch.no_grad``, B=32 clips) and training step (forward +
   backward of every parameter, B=16), bf16 on GPU:
   - ``plain``: open_clip ``ResidualAttentionBlock`` as is (nn.MultiheadAttention);
   - ``plain-sdpa``: the same blocks computed with the attention function the
     STCA block uses (``stdd.model.multi_head_self_attention``, torch SDPA), to
     separate the attention implementation from STCA's own cost;
   - ``free-glue``: the floor for any STCA implementation. Per block it does
     exactly the LayerNorm/attention/MLP/residual work of ``STCABlock`` on the
     same shapes -- ``full = x + ls_1(attn(ln_1(x)))`` on ``(B*T, 197, D)``,
     ``m = m + ls_1(attn(ln_1(m)))`` on all scales in one ``(S*B*T, 1+N_keep, D)``
     call, ``y = full + ls_2(mlp(ln_2(full)))`` -- but the gather and scatter are
     zero-cost: the mixed tokens ``m`` are carried from block to block as their
     own stream (built once from the input, outside the timing), and the
     scatter is replaced by the residual add that ``pad_scatter`` fuses (so the
     floor moves no glue bytes at all). Training backpropagates from both
     streams, so every attention/MLP backward of the STCA block runs too.
   - ``stca[<backend>]``: ``stdd.model.STCABlock`` (scales (1, 2), window (2, 2),
     mask ratio 0.5, continual mixing) with that op backend; explicit phases
     (eval phases for inference, seeded random per-clip phases for training),
     checked once outside the timing.
   Ratios are to ``plain`` and to ``free-glue`` (issue 3's target: STCA at most
   1.10x the floor).

Timing: on GPU, CUDA events around each run after warm-up, median (and
p10/p90) of ``--repeats`` runs; on CPU, ``time.perf_counter`` the same way.
A timing means something only with its device: GPU numbers for this project
are not measured yet (no GPU was available when this script was written; run
``bench/gpu_check.sh`` on one).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

import stdd_kernels  # noqa: E402
from stdd_kernels.geometry import make_geometry  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def measure(fn, device: torch.device, warmup: int, repeats: int) -> Timing:
    """Median wall time of ``fn()`` per run: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), pick(0.1), pick(0.9), len(times))


# ---------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------


@dataclass
class Shapes:
    width: int
    heads: int
    grid: int
    frames: int
    layers: int
    op_batch: int
    infer_batch: int
    train_batch: int
    scales: tuple = (1, 2)
    window: tuple = (2, 2)
    mask_ratio: float = 0.5
    channel_fold: int = 32
    mixing: str = "continual"


def backends_for(device: torch.device, dtype: torch.dtype, wanted) -> list[str]:
    names = []
    for name, backend in sorted(stdd_kernels.registered_backends().items()):
        if wanted and name not in wanted:
            continue
        if backend.supports(device, dtype) is None:
            names.append(name)
    return names


def op_rows(shapes: Shapes, device, dtype, backends, warmup, repeats) -> list[dict]:
    T, B = shapes.frames, shapes.op_batch
    rows_, tokens, D, S = B * T, 1 + shapes.grid**2, shapes.width, len(shapes.scales)
    geometry = make_geometry(
        num_tokens=tokens, channels=D, rows=rows_, num_frames=T, window=shapes.window,
        mask_ratio=shapes.mask_ratio, scales=shapes.scales, channel_fold=shapes.channel_fold,
        mixing=shapes.mixing, tensor_name="x",
    )
    kept = 1 + geometry.num_kept
    size = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    x, full, residual = rand(rows_, tokens, D), rand(rows_, tokens, D), rand(rows_, tokens, D)
    mixed_in, d_mixed = rand(S, rows_, kept, D), rand(S, rows_, kept, D)
    d_out = rand(rows_, tokens, D)
    phase = stdd_kernels.mask_phase(B, T, window=shapes.window, mode="train", generator=gen, device=device)
    settings = dict(window=shapes.window, mask_ratio=shapes.mask_ratio, phase=phase, validate=False)
    mix_settings = dict(settings, scales=shapes.scales, channel_fold=shapes.channel_fold, mixing=shapes.mixing)
    x_tokens, full_tokens = rows_ * tokens * D, rows_ * tokens * D
    bytes_moved = {
        ("mix_gather", "fwd"): (rows_ * kept * D + S * rows_ * kept * D) * size,
        ("mix_gather", "bwd"): (S * rows_ * kept * D + x_tokens) * size,
        ("pad_scatter", "fwd"): (rows_ * (tokens - kept) * D + S * rows_ * kept * D + 2 * full_tokens) * size,
        ("pad_scatter", "bwd"): (full_tokens * 2 + S * rows_ * kept * D) * size,
    }
    copy_gbps = {}
    for key, nbytes in bytes_moved.items():
        src = torch.empty(nbytes // (2 * size), dtype=dtype, device=device).normal_()
        dst = torch.empty_like(src)
        timing = measure(lambda dst=dst, src=src: dst.copy_(src), device, warmup, repeats)
        copy_gbps[key] = nbytes / timing.median_ms / 1e6
        del src, dst

    cases = []
    for name in backends:
        mix = lambda t, name=name: stdd_kernels.mix_gather(t, T, backend=name, **mix_settings)  # noqa: E731
        pad = lambda f, m, r, name=name: stdd_kernels.pad_scatter(  # noqa: E731
            f, m, T, residual=r, backend=name, **settings
        )
        leaf_x = x.clone().requires_grad_(True)
        mix_out = mix(leaf_x)
        leaves = [t.clone().requires_grad_(True) for t in (full, mixed_in, residual)]
        pad_out = pad(*leaves)
        cases += [
            (name, "public", "mix_gather", "fwd", lambda mix=mix: mix(x)),
            (name, "public", "mix_gather", "bwd",
             lambda o=mix_out, l=leaf_x: torch.autograd.grad(o, l, d_mixed, retain_graph=True)),
            (name, "public", "pad_scatter", "fwd", lambda pad=pad: pad(full, mixed_in, residual)),
            (name, "public", "pad_scatter", "bwd",
             lambda o=pad_out, l=leaves: torch.autograd.grad(o, l, d_out, retain_graph=True)),
        ]
    if "triton" in backends:
        from stdd_kernels.mix_gather import mix_gather_backward, mix_gather_forward
        from stdd_kernels.pad_scatter import pad_scatter_backward, pad_scatter_forward

        scatter_geometry = geometry
        cases += [
            ("triton", "kernel", "mix_gather", "fwd", lambda: mix_gather_forward(x, phase, geometry)),
            ("triton", "kernel", "mix_gather", "bwd", lambda: mix_gather_backward(d_mixed, phase, geometry)),
            ("triton", "kernel", "pad_scatter", "fwd",
             lambda: pad_scatter_forward(full, mixed_in, phase, scatter_geometry, residual)),
            ("triton", "kernel", "pad_scatter", "bwd",
             lambda: pad_scatter_backward(d_out, phase, scatter_geometry, S)),
        ]
    results = []
    for backend, level, op, direction, fn in cases:
        timing = measure(fn, device, warmup, repeats)
        nbytes = bytes_moved[(op, direction)]
        gbps = nbytes / timing.median_ms / 1e6
        results.append(
            dict(
                section="ops", backend=backend, level=level, op=op, direction=direction,
                batch=B, frames=T, width=D, dtype=str(dtype).replace("torch.", ""),
                median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, runs=timing.runs,
                bytes=nbytes, gbps=gbps, copy_gbps=copy_gbps[(op, direction)],
                of_copy=gbps / copy_gbps[(op, direction)],
            )
        )
    return results


# ---------------------------------------------------------------------------
# Stacks
# ---------------------------------------------------------------------------


def make_blocks(shapes: Shapes, device, dtype):
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        [ResidualAttentionBlock(shapes.width, shapes.heads, batch_first=True) for _ in range(shapes.layers)]
    )
    return blocks.to(device=device, dtype=dtype)


class PlainStack(torch.nn.Module):
    """open_clip blocks as they are: ``x -> block(x)`` twelve times."""

    def __init__(self, blocks, sdpa: bool):
        super().__init__()
        self.blocks, self.sdpa = blocks, sdpa

    def forward(self, x):
        from stdd.model import multi_head_self_attention

        for block in self.blocks:
            if self.sdpa:  # the attention function STCABlock uses
                x = x + block.ls_1(multi_head_self_attention(block.attn, block.ln_1(x), training=self.training))
                x = x + block.ls_2(block.mlp(block.ln_2(x)))
            else:
                x = block(x)
        return x


class FreeGlueStack(torch.nn.Module):
    """STCA's attention/MLP work with zero-cost gather and scatter (see the module docstring).

    ``forward(x (B*T, 1+N, D), mixed (S*B*T, 1+N_keep, D)) -> (y, mixed)``.
    """

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, x, mixed):
        from stdd.model import multi_head_self_attention

        for block in self.blocks:
            attend = lambda t, b=block: b.ls_1(  # noqa: E731
                multi_head_self_attention(b.attn, b.ln_1(t), training=self.training)
            )
            full = x + attend(x)
            mixed = mixed + attend(mixed)
            x = full + block.ls_2(block.mlp(block.ln_2(full)))
        return x, mixed


class STCAStack(torch.nn.Module):
    def __init__(self, blocks, shapes: Shapes, backend: str):
        super().__init__()
        from stdd.model import STCABlock, STCASettings

        self.blocks = torch.nn.ModuleList(
            [
                STCABlock(
                    block,
                    STCASettings(
                        window=shapes.window, mask_ratio=shapes.mask_ratio, scales=shapes.scales,
                        channel_fold=shapes.channel_fold, mixing=shapes.mixing, backend=backend,
                    ),
                    num_frames=shapes.frames,
                )
                for block in blocks
            ]
        )

    def forward(self, x, phase):
        for block in self.blocks:
            x = block(x, phase, validate=False)
        return x


def stack_rows(shapes: Shapes, device, dtype, backends, warmup, repeats, log) -> list[dict]:
    blocks = make_blocks(shapes, device, dtype)
    T, tokens, D = shapes.frames, 1 + shapes.grid**2, shapes.width
    geometry = make_geometry(
        num_tokens=tokens, channels=D, rows=T, num_frames=T, window=shapes.window,
        mask_ratio=shapes.mask_ratio, scales=shapes.scales, channel_fold=shapes.channel_fold,
        mixing=shapes.mixing, tensor_name="x",
    )
    kept, S = 1 + geometry.num_kept, len(shapes.scales)
    variants = [("plain", PlainStack(blocks, sdpa=False)), ("plain-sdpa", PlainStack(blocks, sdpa=True)),
                ("free-glue", FreeGlueStack(blocks))]
    variants += [(f"stca[{name}]", STCAStack(blocks, shapes, name)) for name in backends]
    results = []
    for mode, batch in (("infer", shapes.infer_batch), ("train", shapes.train_batch)):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(batch * T, tokens, D, generator=gen).to(device, dtype)
        mixed = x[:, :kept].repeat(S, 1, 1).contiguous()  # the floor's mixed stream, built once
        if mode == "infer":
            phase = stdd_kernels.mask_phase(batch, T, window=shapes.window, device=device)
        else:
            phase = stdd_kernels.mask_phase(batch, T, window=shapes.window, mode="train", generator=gen, device=device)
        grad_y = torch.randn(x.shape, generator=gen).to(device, dtype)
        grad_mixed = torch.randn(mixed.shape, generator=gen).to(device, dtype)
        for name, module in variants:
            module.train(mode == "train")
            blocks.requires_grad_(mode == "train")

            def run(name=name, module=module):
                if name == "free-glue":
                    return module(x, mixed)
                if name.startswith("stca"):
                    return module(x, phase)
                return module(x)

            if mode == "infer":
                def step(run=run):
                    with torch.no_grad():
                        run()
            else:
                def step(run=run, name=name):
                    for parameter in blocks.parameters():
                        parameter.grad = None
                    out = run()
                    if name == "free-glue":
                        torch.autograd.backward(out, (grad_y, grad_mixed))
                    else:
                        out.backward(grad_y)
            try:
                timing = measure(step, device, warmup, repeats)
            except Exception as error:  # one failing variant must not hide the others
                log(f"  {mode} {name}: FAILED {type(error).__name__}: {error}")
                results.append(dict(section="stack", variant=name, mode=mode, batch=batch, error=str(error)))
                continue
            results.append(
                dict(
                    section="stack", variant=name, mode=mode, batch=batch, frames=T, layers=shapes.layers,
                    width=D, dtype=str(dtype).replace("torch.", ""), median_ms=timing.median_ms,
                    p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, runs=timing.runs,
                )
            )
            log(f"  {mode:5s} {name:20s} {timing.median_ms:9.3f} ms")
    for mode in ("infer", "train"):
        base = {r["variant"]: r.get("median_ms") for r in results if r["mode"] == mode}
        for r in results:
            if r["mode"] == mode and "median_ms" in r:
                r["vs_plain"] = r["median_ms"] / base["plain"] if base.get("plain") else None
                r["vs_free_glue"] = r["median_ms"] / base["free-glue"] if base.get("free-glue") else None
    return results


# ---------------------------------------------------------------------------
# Record
# ---------------------------------------------------------------------------


def git_commit() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--", "stdd_kernels", "bench", "stdd/model"))}


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "backends_registered": sorted(stdd_kernels.registered_backends()),
        "backends_unavailable": stdd_kernels.unavailable_backends(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = props.name
        info["device_capability"] = f"{props.major}.{props.minor}"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
        info["torch_threads"] = torch.get_num_threads()
    return info


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temp, path)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temp, path)


def format_tables(ops: list[dict], stack: list[dict]) -> str:
    lines = []
    if ops:
        lines.append(f"{'backend':10s} {'level':7s} {'op':12s} {'dir':4s} {'ms':>9s} {'GB/s':>8s} {'copy GB/s':>10s} {'of copy':>8s}")
        for r in ops:
            lines.append(
                f"{r['backend']:10s} {r['level']:7s} {r['op']:12s} {r['direction']:4s} {r['median_ms']:9.4f} "
                f"{r['gbps']:8.1f} {r['copy_gbps']:10.1f} {r['of_copy']:8.2f}"
            )
    if stack:
        lines.append("")
        lines.append(f"{'mode':5s} {'variant':20s} {'batch':>5s} {'ms':>10s} {'vs plain':>9s} {'vs floor':>9s}")
        for r in stack:
            if "median_ms" not in r:
                lines.append(f"{r['mode']:5s} {r['variant']:20s} {r['batch']:5d}   FAILED: {r['error'][:60]}")
                continue
            ratio = lambda v: f"{v:9.2f}" if v else f"{'-':>9s}"  # noqa: E731
            lines.append(
                f"{r['mode']:5s} {r['variant']:20s} {r['batch']:5d} {r['median_ms']:10.3f} "
                f"{ratio(r.get('vs_plain'))} {ratio(r.get('vs_free_glue'))}"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few runs: a CPU smoke test in seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (CSV written next to it)")
    parser.add_argument("--backends", nargs="*", default=None, help="subset of the registered backends")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-stack", action="store_true")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=14, help="patches per side (14: ViT-B/16 at 224 px)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--op-batch", type=int, default=None, help="clips for the op section (default 32 GPU, 2 CPU)")
    parser.add_argument("--infer-batch", type=int, default=None, help="default 32 GPU, 1 CPU")
    parser.add_argument("--train-batch", type=int, default=None, help="default 16 GPU, 1 CPU")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if args.tiny:
        shapes = Shapes(width=64, heads=4, grid=4, frames=4, layers=2, op_batch=2, infer_batch=2, train_batch=1)
        warmup, repeats = args.warmup or 1, args.repeats or 2
    else:
        shapes = Shapes(
            width=args.width, heads=args.heads, grid=args.grid, frames=args.frames, layers=args.layers,
            op_batch=args.op_batch or (32 if gpu else 2),
            infer_batch=args.infer_batch or (32 if gpu else 1),
            train_batch=args.train_batch or (16 if gpu else 1),
        )
        warmup, repeats = args.warmup or (10 if gpu else 1), args.repeats or (50 if gpu else 3)
    backends = backends_for(device, dtype, args.backends)
    if args.backends:
        missing = sorted(set(args.backends) - set(backends))
        if missing:
            raise SystemExit(f"--backends {missing}: not registered or cannot run on {device} / {dtype}")
    env = environment(device)
    out = args.out or ROOT / "bench" / "results" / f"stca_{'tiny_' if args.tiny else ''}{device.type}.json"
    log = lambda message: print(message, flush=True)  # noqa: E731
    log(f"device: {env['device']}; dtype {dtype}; backends: {backends}; torch {env['torch']}, triton {env['triton']}")
    log(f"shapes: {shapes}")
    ops, stack = [], []
    if not args.skip_ops:
        log("ops ...")
        ops = op_rows(shapes, device, dtype, backends, warmup, repeats if args.tiny else 4 * repeats)
    if not args.skip_stack:
        log("stack ...")
        stack = stack_rows(shapes, device, dtype, backends, warmup, repeats, log)
    table = format_tables(ops, stack)
    print(table)
    record = dict(environment=env, shapes=vars(shapes), dtype=str(dtype), warmup=warmup, repeats=repeats,
                  tiny=args.tiny, ops=ops, stack=stack)
    write_atomic(out, json.dumps(record, indent=2, default=str) + "\n")
    write_csv(out.with_suffix(".csv"), ops + stack)
    log(f"wrote {out} and {out.with_suffix('.csv')}")
    failed = [r for r in stack if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
