"""STCA throughput: the gather/scatter ops and a 12-block ViT-B/16 stack, every backend.

    python bench/stca.py                      # GPU: ViT-B/16, T=8, bf16 (see defaults below)
    python bench/stca.py --tiny               # CPU smoke run in seconds (CI)
    python bench/stca.py --device cpu --op-batch 2 --skip-stack   # ViT-B/16 op shapes on CPU
    python bench/stca.py --out bench/results/stca_<machine>.json

Results go to ``--out`` (JSON, and CSV next to it; default: a new temporary
directory, printed at the start) with the device name, torch/triton/CUDA
versions, date and git commit (``STDD_GIT_COMMIT`` when there is no git
checkout). Every row is printed as soon as it is measured and both files are
rewritten after every row, so a run that is killed keeps what it measured.
``--budget-s`` stops starting new measurements once that many seconds have
passed (the rows not run are recorded as skipped).

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
   device (half read, half written), timed interleaved with the op (one op
   run, one copy run, ... on buffers allocated and warmed once), so both see
   the same machine state; "of copy" is the op's GB/s over copy's. An op
   cannot move its bytes faster than a plain copy of them: a ratio above 1
   means the copy timing was disturbed, and is recorded as missing
   (``of_copy: null``, ``copy_note``), never printed as a result.

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
   - ``free-glue-shared``: the same floor for the shared projections (docs/stca.md
     section 6), what ``stca[*]`` computes by default: per block LN1 + the in-projection
     on the ``(B*T, 197, D)`` tokens only, the rank-``(2I+2)`` product of the mixed paths
     (``coefficients @ basis^T``, the coefficients carried as their own stream, built once
     outside the timing), one attention call over all scales, the mean over scales and ONE
     ``out_proj`` for it, the full path's ``out_proj``, the MLP and the residual add;
     ``mix_project``'s gathers and statistics and ``pad_scatter`` cost nothing.
   - ``stca[<backend>]``: ``stdd.model.STCABlock`` with its default settings (shared
     projections; scales (1, 2), window (2, 2), mask ratio 0.5, continual mixing or
     ``--mixing``) with that op backend; explicit phases (eval phases for inference,
     seeded random per-clip phases for training), checked once outside the timing.
   - ``stca-per-path[<backend>]``: the same with ``projection="per_path"`` (step 3 as
     written: every mixed path through LN1 and the in-projection).
   - ``boolean-mask``: the formulation a user would otherwise run, written
     from the description of the authors' code (:class:`BooleanMaskSTCABlock`):
     sequence-first tokens, boolean keep-masks, ``x[~mask]`` gathers,
     per-scale channel-slice copies, ``torch.cat``, clone + masked assignment.
     Same attention function and the same work as ``stca[*]``.
   - ``plain+inductor`` / ``stca[triton]+inductor``: every block compiled with
     ``torch.compile`` (default inductor backend; one compiled block reused by
     all 12), to show whether inductor's fusion of the LayerNorm/residual glue
     brings the stack toward the free-glue floor. Compile time (the first call)
     is reported in ``compile_s`` and excluded from the timing. These run last.
   Ratios are to ``plain`` and to the floor of the row's formulation (``vs floor``:
   ``free-glue-shared`` for ``stca[*]``, ``free-glue`` for ``stca-per-path[*]`` and the
   boolean-mask peer).

Timing: on GPU, CUDA events around each run after warm-up, median (and
p10/p90) of the repeats; on CPU, ``time.perf_counter`` the same way. The stack
variants of one mode and batch size run interleaved (one run of each in turn,
``repeats`` times), so their ratios come from the same machine state; their
rows are printed when the whole group is measured. A timing
means something only with its device: see ``bench/results/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))  # its helper modules, also when loaded from a file by the tests

import torch  # noqa: E402

from provenance import COMMIT_ENV_VAR, git_commit  # noqa: E402,F401  (COMMIT_ENV_VAR: in the record docs)
import stdd_kernels  # noqa: E402
from stdd_kernels.geometry import MIXING_MODES, make_geometry  # noqa: E402
from stdd_kernels.reference import factor_dtype as reference_factor_dtype  # noqa: E402

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


def _summary(times: list[float]) -> Timing:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return Timing(statistics.median(times), pick(0.1), pick(0.9), len(times))


def measure_interleaved(fns, device: torch.device, warmup: int, repeats: int) -> list[Timing]:
    """Median wall time per run of each function in ``fns``, run in turn (f0, f1, f0, f1, ...).

    Interleaving gives every function the same machine state (clocks, other
    load, cache temperature), which makes their ratio meaningful. CUDA events
    on GPU, ``perf_counter`` on CPU.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [
            [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
            for _ in range(repeats)
        ]
        for run in events:
            for fn, (start, end) in zip(fns, run):
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize(device)
        for run in events:
            for i, (start, end) in enumerate(run):
                times[i].append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - start) * 1e3)
    return [_summary(t) for t in times]


def of_copy(gbps: float, copy_gbps: float) -> float | None:
    """The op's bandwidth as a fraction of a copy's; None when above 1 (a disturbed copy timing)."""
    ratio = gbps / copy_gbps
    return ratio if ratio <= 1.0 else None


# ---------------------------------------------------------------------------
# Results: printed and written as they come
# ---------------------------------------------------------------------------


class Recorder:
    """Holds the record; every ``add`` prints the row and rewrites ``out`` (JSON) and its CSV."""

    def __init__(self, out: Path, header: dict, budget_s: float | None):
        self.out, self.header, self.rows = out, header, []
        self.started = time.monotonic()
        self.budget_s = budget_s

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started > self.budget_s

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()
        print(format_row(row), flush=True)

    def write(self, status: str = "running") -> None:
        record = dict(self.header, status=status, elapsed_s=round(time.monotonic() - self.started, 1),
                      ops=[r for r in self.rows if r["section"] == "ops"],
                      stack=[r for r in self.rows if r["section"] == "stack"])
        write_atomic(self.out, json.dumps(record, indent=2, default=str) + "\n")
        write_csv(self.out.with_suffix(".csv"), self.rows)


def _not_measured(r: dict, width: int = 80) -> str:
    return r.get("skipped") or "FAILED: " + r.get("error", "")[:width]


def _of_copy_text(r: dict) -> str:
    return f"{r['of_copy']:8.2f}" if r.get("of_copy") is not None else f"{'n/a':>8s}"


def format_row(r: dict) -> str:
    if r["section"] == "ops":
        head = f"ops   {r['backend']:10s} {r['level']:7s} {r['op']:12s} {r['direction']:4s}"
        if "median_ms" not in r:
            return f"{head} {_not_measured(r)}"
        return (f"{head} {r['median_ms']:9.4f} ms {r['gbps']:8.1f} GB/s  copy {r['copy_gbps']:8.1f} GB/s  "
                f"of copy {_of_copy_text(r)}" + (f"  ({r['copy_note']})" if r.get("copy_note") else ""))
    head = f"stack {r['mode']:5s} {r['variant']:24s} B={r['batch']:<3d}"
    if "median_ms" not in r:
        return f"{head} {_not_measured(r)}"
    extra = f"  (compile {r['compile_s']:.1f} s)" if r.get("compile_s") is not None else ""
    return f"{head} {r['median_ms']:10.3f} ms{extra}"


def format_tables(ops: list[dict], stack: list[dict]) -> str:
    lines = []
    if ops:
        lines.append(f"{'backend':10s} {'level':7s} {'op':12s} {'dir':4s} {'ms':>9s} {'GB/s':>8s} {'copy GB/s':>10s} {'of copy':>8s}")
        for r in ops:
            head = f"{r['backend']:10s} {r['level']:7s} {r['op']:12s} {r['direction']:4s}"
            if "median_ms" not in r:
                lines.append(f"{head} {_not_measured(r, 60)}")
                continue
            lines.append(f"{head} {r['median_ms']:9.4f} {r['gbps']:8.1f} {r['copy_gbps']:10.1f} {_of_copy_text(r)}")
    if stack:
        lines.append("")
        lines.append(f"{'mode':5s} {'variant':24s} {'batch':>5s} {'ms':>10s} {'vs plain':>9s} {'vs floor':>9s}")
        for r in stack:
            if "median_ms" not in r:
                lines.append(f"{r['mode']:5s} {r['variant']:24s} {r['batch']:5d}   {_not_measured(r, 60)}")
                continue
            ratio = lambda v: f"{v:9.2f}" if v else f"{'-':>9s}"  # noqa: E731
            lines.append(
                f"{r['mode']:5s} {r['variant']:24s} {r['batch']:5d} {r['median_ms']:10.3f} "
                f"{ratio(r.get('vs_plain'))} {ratio(r.get('vs_floor'))}"
            )
    return "\n".join(lines)


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
    infer_batch: tuple  # one stack measurement per batch size
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


def op_rows(shapes: Shapes, device, dtype, backends, warmup, repeats, recorder: Recorder) -> None:
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
    # One warmed pair of copy buffers per byte count, reused by every case of that op.
    copies = {}
    for key, nbytes in bytes_moved.items():
        src = torch.empty(nbytes // (2 * size), dtype=dtype, device=device).normal_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        copies[key] = lambda dst=dst, src=src: dst.copy_(src)

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
        from stdd_kernels.triton_mix_gather import mix_gather_backward, mix_gather_forward
        from stdd_kernels.triton_pad_scatter import pad_scatter_backward, pad_scatter_forward

        cases += [
            ("triton", "kernel", "mix_gather", "fwd", lambda: mix_gather_forward(x, phase, geometry)),
            ("triton", "kernel", "mix_gather", "bwd", lambda: mix_gather_backward(d_mixed, phase, geometry)),
            ("triton", "kernel", "pad_scatter", "fwd",
             lambda: pad_scatter_forward(full, mixed_in, phase, geometry, residual)),
            ("triton", "kernel", "pad_scatter", "bwd", lambda: pad_scatter_backward(d_out, phase, geometry, S)),
        ]
    for backend, level, op, direction, fn in cases:
        row = dict(section="ops", backend=backend, level=level, op=op, direction=direction,
                   batch=B, frames=T, width=D, dtype=str(dtype).replace("torch.", ""))
        if recorder.over_budget():
            recorder.add(dict(row, skipped="skipped: time budget spent"))
            continue
        try:
            timing, copy_timing = measure_interleaved([fn, copies[(op, direction)]], device, warmup, repeats)
        except Exception as error:  # one failing case must not hide the others
            recorder.add(dict(row, error=f"{type(error).__name__}: {error}"))
            continue
        nbytes = bytes_moved[(op, direction)]
        gbps, copy_gbps = nbytes / timing.median_ms / 1e6, nbytes / copy_timing.median_ms / 1e6
        ratio = of_copy(gbps, copy_gbps)
        row.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, runs=timing.runs,
                   bytes=nbytes, gbps=gbps, copy_gbps=copy_gbps, copy_median_ms=copy_timing.median_ms,
                   of_copy=ratio)
        if ratio is None:
            row["copy_note"] = f"copy measured slower than the op ({gbps / copy_gbps:.2f}x): not a valid baseline"
        recorder.add(row)


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


class SDPABlock(torch.nn.Module):
    """An open_clip block computed with the attention function STCABlock uses (torch SDPA)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        from stdd.model import multi_head_self_attention

        b = self.block
        x = x + b.ls_1(multi_head_self_attention(b.attn, b.ln_1(x), training=self.training))
        return x + b.ls_2(b.mlp(b.ln_2(x)))


class PlainStack(torch.nn.Module):
    """``x -> block(x)`` for every block (open_clip blocks, SDPA blocks or compiled ones)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
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


class FreeGlueSharedStack(torch.nn.Module):
    """The shared projections' work with zero-cost gathers, statistics and scatter (module docstring).

    ``forward(x (B*T, 1+N, D), coefficients (S, B*T, 1+N_keep, 2I+2)) -> (y, mixed_sum)``:
    ``mixed_sum`` adds up every block's mixed output ``(B*T, 1+N_keep, D)``, so that training
    backpropagates through the mixed paths as well.
    """

    def __init__(self, blocks, borrowed_channels: int):
        super().__init__()
        self.blocks = blocks
        self.borrowed = borrowed_channels

    def forward(self, x, coefficients):
        from stdd.model.stca_block import attention_heads, output_projection
        from stdd_kernels.reference import projection_basis

        n_scales, rows, kept, _ = coefficients.shape
        mixed_sum = None
        for block in self.blocks:
            attn, norm = block.attn, block.ln_1
            basis = projection_basis(norm.weight, norm.bias, attn.in_proj_weight, attn.in_proj_bias, self.borrowed)
            qkv = torch.nn.functional.linear(norm(x), attn.in_proj_weight, attn.in_proj_bias)
            qkv_mixed = (coefficients.reshape(n_scales * rows, kept, -1) @ basis.T).to(qkv.dtype)
            heads = attention_heads(attn, qkv_mixed, training=self.training)
            heads = heads.reshape(n_scales, rows, kept, -1).mean(dim=0)
            mixed = block.ls_1(output_projection(attn, heads))
            full = x + block.ls_1(output_projection(attn, attention_heads(attn, qkv, training=self.training)))
            x = full + block.ls_2(block.mlp(block.ln_2(full)))
            mixed_sum = mixed if mixed_sum is None else mixed_sum + mixed
        return x, mixed_sum


def stca_blocks(blocks, shapes: Shapes, backend: str, **changes) -> list:
    """``STCABlock`` wrappers of ``blocks`` with the default settings, the shapes' and ``changes``."""
    from stdd.model import STCABlock, STCASettings

    settings = STCASettings(
        window=shapes.window, mask_ratio=shapes.mask_ratio, scales=shapes.scales,
        channel_fold=shapes.channel_fold, mixing=shapes.mixing, backend=backend, **changes,
    )
    return [STCABlock(block, settings, num_frames=shapes.frames) for block in blocks]


class STCAStack(torch.nn.Module):
    """``x -> block(x, phase)`` for every block (STCABlocks, boolean-mask blocks or compiled ones)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, phase):
        for block in self.blocks:
            x = block(x, phase, validate=False)
        return x


class BooleanMaskSTCABlock(torch.nn.Module):
    """An STCA block in the authors' formulation, written from its description (a benchmark peer).

    Tokens are sequence-first, ``x (1+N, B*T, D)``. Per block: the patch tokens
    are rearranged (einops style: permute + reshape) into a window view
    ``(B, T, cells, K, D)``; a boolean mask per frame marks the masked cells of
    each window (phase ``o`` masks cell ``c`` iff ``(c - o) mod K < m``);
    ``view[~mask]`` gathers the kept tokens ``(B, T, N_keep, D)``; per scale a
    ``zeros_like`` buffer is filled by channel-slice copies from the shifted
    frames (the release's rule: for ``i < s``, ``d = I >> i`` channels from
    ``t - (i+1)`` and ``t + (i+1)``, later ``i`` overwriting), ``torch.cat``
    puts CLS in front, and each scale runs its own attention; after attention
    the full path is cloned and the mean of the scales is assigned into it
    through the mask, then rearranged back. It computes exactly the STCA block
    with ``mixing="official"`` (``docs/stca.md``; tests/test_bench_stca.py), and
    for scales ``(1,)`` the default continual block too; for ``(1, 2)`` the
    release's mixing differs from continual mixing at the clip edges only, with
    the same amount of work (``--mixing official`` times both on the same rule).

    ``forward(x, phase (B, T), validate=...) -> (1+N, B*T, D)``; ``validate``
    is accepted for the stack's signature and ignored.
    """

    def __init__(self, block, *, num_frames: int, grid: int, window=(2, 2), mask_ratio=0.5, scales=(1, 2),
                 channel_fold=32):
        super().__init__()
        self.block, self.num_frames, self.grid = block, num_frames, grid
        self.window, self.scales = tuple(window), tuple(scales)
        self.cells = window[0] * window[1]
        self.masked = int(mask_ratio * self.cells)  # the release floors
        self.mix = block.attn.embed_dim // channel_fold

    def _windows(self, tokens, batch):
        """``(N, B*T, D)`` patch tokens -> ``(B, T, cells, K, D)`` (rearrange, a copy)."""
        w1, w2 = self.window
        P, D = self.grid, tokens.shape[-1]
        view = tokens.reshape(P // w1, w1, P // w2, w2, batch, self.num_frames, D)
        return view.permute(4, 5, 0, 2, 1, 3, 6).reshape(batch, self.num_frames, -1, self.cells, D)

    def _unwindows(self, windows):
        """Inverse of :meth:`_windows`: ``(B, T, cells, K, D)`` -> ``(N, B*T, D)``."""
        w1, w2 = self.window
        P = self.grid
        B, T, _, _, D = windows.shape
        view = windows.reshape(B, T, P // w1, P // w2, w1, w2, D)
        return view.permute(2, 4, 3, 5, 0, 1, 6).reshape(P * P, B * T, D)

    def _attend(self, tokens):
        """``ls_1(attn(ln_1(tokens)))`` on sequence-first ``(L, R, D)`` tokens."""
        from stdd.model import multi_head_self_attention

        b = self.block
        out = multi_head_self_attention(b.attn, b.ln_1(tokens).transpose(0, 1), training=self.training)
        return b.ls_1(out).transpose(0, 1)

    def forward(self, x, phase, validate: bool = True):
        rows, D, I, T = x.shape[1], x.shape[2], self.mix, self.num_frames
        batch = rows // T
        cell = torch.arange(self.cells, device=x.device)
        masked = (cell - phase[..., None]) % self.cells < self.masked  # (B, T, K)
        mask = masked[:, :, None, :].expand(batch, T, (self.grid // self.window[0]) * (self.grid // self.window[1]),
                                           self.cells)
        windows = self._windows(x[1:], batch)
        kept = windows[~mask].reshape(batch, T, -1, D)  # (B, T, N_keep, D)
        full = x + self._attend(x)
        mixed_sum = None
        for s in self.scales:
            buffer = torch.zeros_like(kept)
            buffer[..., 2 * I:] = kept[..., 2 * I:]
            for i in range(s):
                d = I >> i
                buffer[:, i + 1:, :, :d] = kept[:, : T - (i + 1), :, :d]
                buffer[:, : T - (i + 1), :, 2 * I - d: 2 * I] = kept[:, i + 1:, :, 2 * I - d: 2 * I]
            sequence = buffer.reshape(rows, -1, D).transpose(0, 1)  # 'b t n d -> n (b t) d'
            mixed = torch.cat([x[:1], sequence], dim=0)
            mixed = mixed + self._attend(mixed)
            mixed_sum = mixed if mixed_sum is None else mixed_sum + mixed
        average = mixed_sum / len(self.scales)
        pad = self._windows(full[1:], batch).clone()
        pad[~mask] = average[1:].transpose(0, 1).reshape(-1, D)
        pad = torch.cat([average[:1], self._unwindows(pad)], dim=0)
        b = self.block
        return pad + b.ls_2(b.mlp(b.ln_2(full)))


def compiled_blocks(blocks) -> list:
    """Each block wrapped by ``torch.compile`` (inductor); one compiled graph serves all of them."""
    return [torch.compile(block, fullgraph=True) for block in blocks]


def stack_rows(shapes: Shapes, device, dtype, backends, warmup, repeats, recorder: Recorder, compiled=True) -> None:
    blocks = make_blocks(shapes, device, dtype)
    T, tokens, D = shapes.frames, 1 + shapes.grid**2, shapes.width
    geometry = make_geometry(
        num_tokens=tokens, channels=D, rows=T, num_frames=T, window=shapes.window,
        mask_ratio=shapes.mask_ratio, scales=shapes.scales, channel_fold=shapes.channel_fold,
        mixing=shapes.mixing, tensor_name="x",
    )
    kept, S = 1 + geometry.num_kept, len(shapes.scales)
    boolean = [
        BooleanMaskSTCABlock(block, num_frames=T, grid=shapes.grid, window=shapes.window,
                             mask_ratio=shapes.mask_ratio, scales=shapes.scales, channel_fold=shapes.channel_fold)
        for block in blocks
    ]
    # (name, module, input kind); eager variants first, compiled ones last (their compile time is long).
    variants = [("plain", PlainStack(blocks), "plain"), ("plain-sdpa", PlainStack([SDPABlock(b) for b in blocks]), "plain"),
                ("free-glue", FreeGlueStack(blocks), "free-glue"),
                ("free-glue-shared", FreeGlueSharedStack(blocks, geometry.borrowed_channels), "free-glue-shared")]
    variants += [(f"stca[{name}]", STCAStack(stca_blocks(blocks, shapes, name)), "stca") for name in backends]
    variants += [(f"stca-per-path[{name}]", STCAStack(stca_blocks(blocks, shapes, name, projection="per_path")), "stca")
                 for name in backends]
    variants += [("boolean-mask", STCAStack(boolean), "sequence-first")]
    # Built when their turn comes (a compiled module compiles on its first call).
    inductor = [("plain+inductor", lambda: PlainStack(compiled_blocks(blocks)), "plain")]
    if "triton" in backends:
        inductor.append(
            ("stca[triton]+inductor", lambda: STCAStack(compiled_blocks(stca_blocks(blocks, shapes, "triton"))), "stca")
        )
    results = []
    for group in (variants, inductor) if compiled else (variants,):
        for mode, batch in [("infer", b) for b in shapes.infer_batch] + [("train", shapes.train_batch)]:
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch * T, tokens, D, generator=gen).to(device, dtype)
            x_sequence_first = x.transpose(0, 1).contiguous()
            mixed = x[:, :kept].repeat(S, 1, 1).contiguous()  # the floor's mixed stream, built once
            # the shared floor's coefficient stream, built once: [u (2I), 1 - a, k] of plausible size
            coefficients = 0.1 * torch.randn(S, batch * T, kept, geometry.borrowed_channels + 2, generator=gen)
            coefficients = coefficients.to(device, reference_factor_dtype(dtype))
            if mode == "infer":
                phase = stdd_kernels.mask_phase(batch, T, window=shapes.window, device=device)
            else:
                phase = stdd_kernels.mask_phase(batch, T, window=shapes.window, mode="train", generator=gen,
                                                device=device)
            grad_y = torch.randn(x.shape, generator=gen).to(device, dtype)
            grad_mixed = torch.randn(mixed.shape, generator=gen).to(device, dtype)
            grad_mixed_sum = torch.randn(batch * T, kept, D, generator=gen).to(device, dtype)
            prepared = []  # (row, step, compile_s) of the variants that ran once
            for name, module, kind in group:
                row = dict(section="stack", variant=name, mode=mode, batch=batch, frames=T, layers=shapes.layers,
                           width=D, dtype=str(dtype).replace("torch.", ""))
                if recorder.over_budget():
                    recorder.add(dict(row, skipped="skipped: time budget spent"))
                    continue
                try:
                    started = time.monotonic()
                    module = module() if callable(module) and not isinstance(module, torch.nn.Module) else module
                    step = _prepare_variant(module, kind, mode, blocks, x, x_sequence_first, mixed, coefficients,
                                            phase, grad_y, grad_mixed, grad_mixed_sum)
                    step()  # first call: compiles the compiled variants; the same one-off cost for all
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    prepared.append((row, step, time.monotonic() - started))
                except Exception as error:  # one failing variant must not hide the others
                    recorder.add(dict(row, error=f"{type(error).__name__}: {error}"))
            if not prepared:
                continue
            # All variants of one (mode, batch) in turn, run after run, so that their ratios are taken in
            # the same machine state (a CPU's clock and load drift over the minutes a group takes).
            blocks.requires_grad_(mode == "train")
            timings = measure_interleaved([step for _, step, _ in prepared], device, max(0, warmup - 1), repeats)
            for (row, _, compile_s), timing in zip(prepared, timings):
                row.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms,
                           runs=timing.runs, compile_s=compile_s if group is inductor else None)
                results.append(row)
                _add_ratios(row, results)
                recorder.add(row)


def _prepare_variant(module, kind, mode, blocks, x, x_sequence_first, mixed, coefficients, phase, grad_y, grad_mixed,
                     grad_mixed_sum):
    """The timed step of one stack variant: an inference forward under ``no_grad``, or a training step
    (forward + backward of every parameter)."""
    module.train(mode == "train")
    blocks.requires_grad_(mode == "train")

    def run():
        if kind == "free-glue":
            return module(x, mixed)
        if kind == "free-glue-shared":
            return module(x, coefficients)
        if kind == "stca":
            return module(x, phase)
        if kind == "sequence-first":
            return module(x_sequence_first, phase)
        return module(x)

    if mode == "infer":
        def step():
            with torch.no_grad():
                run()
    else:
        grad = grad_y.transpose(0, 1).contiguous() if kind == "sequence-first" else grad_y

        def step():
            for parameter in blocks.parameters():
                parameter.grad = None
            out = run()
            if kind == "free-glue":
                torch.autograd.backward(out, (grad_y, grad_mixed))
            elif kind == "free-glue-shared":
                torch.autograd.backward(out, (grad_y, grad_mixed_sum))
            else:
                out.backward(grad)

    return step


def floor_of(variant: str) -> str | None:
    """The free-glue floor of a stack variant's formulation (None for the floors and plain stacks)."""
    if variant.startswith("stca["):
        return "free-glue-shared"
    if variant.startswith("stca-per-path[") or variant == "boolean-mask":
        return "free-glue"
    return None


def _add_ratios(row: dict, results: list[dict]) -> None:
    base = {r["variant"]: r["median_ms"] for r in results if (r["mode"], r["batch"]) == (row["mode"], row["batch"])}
    row["vs_plain"] = row["median_ms"] / base["plain"] if base.get("plain") else None
    floor = floor_of(row["variant"].removesuffix("+inductor"))
    row["floor"] = floor
    row["vs_floor"] = row["median_ms"] / base[floor] if floor and base.get(floor) else None


# ---------------------------------------------------------------------------
# Record
# ---------------------------------------------------------------------------




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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few runs: a CPU smoke test in seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (CSV written next to it); default: a new temporary directory")
    parser.add_argument("--backends", nargs="*", default=None, help="subset of the registered backends")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--skip-stack", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out the torch.compile stack variants")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new measurement after this many seconds (the rest is recorded as skipped)")
    parser.add_argument("--mixing", choices=MIXING_MODES, default="continual",
                        help="channel mixing of the ops and stca[*] blocks (official: the authors' release's rule)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--grid", type=int, default=14, help="patches per side (14: ViT-B/16 at 224 px)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--op-batch", type=int, default=None, help="clips for the op section (default 32 GPU, 2 CPU)")
    parser.add_argument("--infer-batch", type=int, nargs="+", default=None,
                        help="clips per inference batch, one stack measurement each (default 32 GPU, 1 CPU)")
    parser.add_argument("--train-batch", type=int, default=None, help="default 16 GPU, 1 CPU")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="stack repeats; the ops use 4x as many")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if args.tiny:
        shapes = Shapes(width=64, heads=4, grid=4, frames=4, layers=2, op_batch=2, infer_batch=(2,), train_batch=1,
                        mixing=args.mixing)
        warmup, repeats = args.warmup or 1, args.repeats or 2
    else:
        shapes = Shapes(
            width=args.width, heads=args.heads, grid=args.grid, frames=args.frames, layers=args.layers,
            op_batch=args.op_batch or (32 if gpu else 2),
            infer_batch=tuple(args.infer_batch or [32 if gpu else 1]),
            train_batch=args.train_batch or (16 if gpu else 1), mixing=args.mixing,
        )
        warmup, repeats = args.warmup or (5 if gpu else 1), args.repeats or (25 if gpu else 3)
    backends = backends_for(device, dtype, args.backends)
    if args.backends:
        missing = sorted(set(args.backends) - set(backends))
        if missing:
            raise SystemExit(f"--backends {missing}: not registered or cannot run on {device} / {dtype}")
    env = environment(device)
    out = args.out or Path(tempfile.mkdtemp(prefix="stca_bench_")) / (
        f"stca_{'tiny_' if args.tiny else ''}{device.type}.json"
    )
    print(f"device: {env['device']}; dtype {dtype}; backends: {backends}; torch {env['torch']}, "
          f"triton {env['triton']}; commit {env['git']['commit']}", flush=True)
    print(f"shapes: {shapes}\nwriting {out} and {out.with_suffix('.csv')} after every row", flush=True)
    recorder = Recorder(out, dict(environment=env, shapes=vars(shapes), dtype=str(dtype), warmup=warmup,
                                  repeats=repeats, tiny=args.tiny), args.budget_s)
    status = "done"
    try:
        if not args.skip_ops:
            op_rows(shapes, device, dtype, backends, warmup, repeats if args.tiny else 4 * repeats, recorder)
        if not args.skip_stack:
            stack_rows(shapes, device, dtype, backends, warmup, repeats, recorder,
                       compiled=not args.skip_compiled)
    except KeyboardInterrupt:  # e.g. the caller's timeout (SIGINT): keep what was measured
        status = "interrupted"
    recorder.write(status)
    ops = [r for r in recorder.rows if r["section"] == "ops"]
    stack = [r for r in recorder.rows if r["section"] == "stack"]
    print(format_tables(ops, stack))
    print(f"{status}: wrote {out} and {out.with_suffix('.csv')}", flush=True)
    if status == "interrupted":
        return 130
    return 1 if any("error" in r for r in recorder.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
