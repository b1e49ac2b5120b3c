"""LoRA shrink/expand kernels of both backends against two torch baselines, as achieved HBM
bandwidth and % of the ceiling measured in the same run.

For each LoRA group of a decoder layer (qkv, o, gate_up, down) and each workload (decode with 1,
8 or 32 adapters; prefill of 8 x 512 tokens over 8 adapters) it times y += scaling * (x A^T) B^T
in place, with the adapter pool's layout (ops/lora.py), by:

- "triton", "csgmv-16" (prefill also csgmv-32/64/128): apply_lora_triton with that backend and
  chunk size;
- "gather-bmm": every token's A and B gathered by its slot, then batched matmuls (no loop over
  segments; skipped when the gathered tensors would exceed 8 GiB);
- "loop": one torch matmul per adapter segment and slice;

and, for context, the base projection (x W^T, W: [N_total, in]). Device time per application:
K back-to-back applications captured in a CUDA graph, median over replays timed with CUDA events.
Bytes = the minimum one application must move: x read, the adapters' A and B rank rows read once,
t written and read, y read and written. Decode working sets fit in L2, so back-to-back replays
may beat the HBM ceiling there (rows marked "L2"); the microseconds are the figure that counts.
"LoRA ms per step" = the four groups' sum times the layer count. Before timing, every
implementation's y is checked against apply_lora_torch in fp32: max |y - ref| over the largest
|LoRA delta| of the reference must stay within 2e-2 (bf16), else the row is flagged MISMATCH.

    python -m benchmarks.lora_kernel_bench --out lora_kernels.json
    python -m benchmarks.lora_kernel_bench --quick   # CPU smoke (Triton, TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.dummy_model import SHAPES
from ops.lora import apply_lora_torch, apply_lora_triton, build_lora_batch_info

QUICK_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2}
# workload name -> tokens of each adapter (adapter i in slot i, its tokens contiguous)
WORKLOADS = {"decode_b1_a1": [1], "decode_b32_a8": [4] * 8, "decode_b32_a32": [1] * 32,
             # a step of the 1000-adapter serving run at a 256-adapter cap
             "decode_b240_a200": [2] * 40 + [1] * 160,
             "prefill_8x512_a8": [512] * 8}
LOOP_MAX_ADAPTERS = 64  # the per-adapter loop launches kernels per adapter: skipped past this
QUICK_WORKLOADS = {"decode_b1_a1": [1], "decode_b8_a4": [2] * 4, "prefill_2x32_a2": [32] * 2}
CHUNK_SIZES = (16, 32, 64, 128)
GATHER_LIMIT_BYTES = 8 << 30
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclasses.dataclass(frozen=True)
class Group:
    """One fused LoRA group: `in_dim` inputs, output slices of `widths` columns."""

    name: str
    in_dim: int
    widths: tuple[int, ...]

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.widths, initial=0))

    @property
    def out_dim(self) -> int:
        return sum(self.widths)


def layer_groups(shape: dict) -> list[Group]:
    """The LoRA groups of one decoder layer of `shape` (a dummy_model.SHAPES entry)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    return [Group("qkv", hidden, (q, kv, kv)), Group("o", q, (hidden,)),
            Group("gate_up", hidden, (inter, inter)), Group("down", inter, (hidden,))]


@dataclasses.dataclass
class Case:
    """One group's adapter pool and one workload's activations."""

    x: Tensor  # [T, in]
    y: Tensor  # [T, N_total], updated in place
    A: Tensor  # [num_slots, n*R, in], rows at or beyond a slot's rank zero
    B: Tensor  # [num_slots, N_total, R], columns at or beyond a slot's rank zero
    scalings: Tensor  # [num_slots, n] float32
    slot_ranks: Tensor  # [num_slots] int32
    token_slots: list[int]  # [T], -1 = base row
    slice_offsets: tuple[int, ...]

    @property
    def num_slices(self) -> int:
        return len(self.slice_offsets) - 1


def make_case(group: Group, ranks: list[int], rank_pad: int, token_slots: list[int],
              dtype: torch.dtype, device: str, seed: int = 0) -> Case:
    """Random pool of len(ranks) slots (rows beyond each rank zeroed, as the pool keeps them)."""
    g = torch.Generator(device).manual_seed(seed)
    n, num_slots, num_tokens = len(group.widths), len(ranks), len(token_slots)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, device=device)

    A = randn(num_slots, n, rank_pad, group.in_dim) / group.in_dim**0.5
    B = randn(num_slots, group.out_dim, rank_pad) / rank_pad**0.5
    for slot, rank in enumerate(ranks):
        A[slot, :, rank:] = 0
        B[slot, :, rank:] = 0
    return Case(
        x=randn(num_tokens, group.in_dim).to(dtype), y=randn(num_tokens, group.out_dim).to(dtype),
        A=A.reshape(num_slots, n * rank_pad, group.in_dim).to(dtype), B=B.to(dtype),
        scalings=torch.rand(num_slots, n, generator=g, device=device) + 0.5,
        slot_ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        token_slots=token_slots, slice_offsets=group.slice_offsets)


def segments(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, slot) of every adapter run; base runs (slot -1) left out."""
    out, lo = [], 0
    for slot, run in itertools.groupby(token_slots):
        hi = lo + sum(1 for _ in run)
        if slot >= 0:
            out.append((lo, hi, slot))
        lo = hi
    return out


def triton_impl(case: Case, backend: str, chunk_size: int) -> Callable[[], None]:
    """apply_lora_triton with the batch info built once, as the runner does before a step."""
    info = build_lora_batch_info(case.token_slots, case.slot_ranks, backend, chunk_size,
                                 case.x.device)
    return lambda: apply_lora_triton(case.x, case.A, case.B, case.y, case.slice_offsets,
                                     case.scalings, info)


def padded_impl(case: Case, rows_expand: bool) -> Callable[[], None]:
    """The csgmv application as a decode CUDA graph runs it (the table padded to the token
    count), with the row-block expand or the entry expand (ops.lora.ROWS_EXPAND_MAX_TOKENS
    forced for the call, so a graph captures the chosen kernel)."""
    import ops.lora

    fn = tuned_impl(case, 16, case.x.shape[0])
    limit = max(ops.lora.ROWS_EXPAND_MAX_TOKENS, case.x.shape[0]) if rows_expand else 0

    def run() -> None:
        saved, ops.lora.ROWS_EXPAND_MAX_TOKENS = ops.lora.ROWS_EXPAND_MAX_TOKENS, limit
        try:
            fn()
        finally:
            ops.lora.ROWS_EXPAND_MAX_TOKENS = saved

    return run


def gather_bmm_impl(case: Case) -> Callable[[], None]:
    """Per-token gathers of A and B by slot, then bmm; base rows get a zero scaling."""
    slots = torch.tensor(case.token_slots, device=case.x.device)
    idx, keep = slots.clamp(min=0), (slots >= 0)[:, None]
    rank_pad = case.B.shape[2]

    def run() -> None:
        t = torch.bmm(case.A[idx], case.x.unsqueeze(2))  # [T, n*R, 1]
        b = case.B[idx]  # [T, N_total, R]
        scale = (case.scalings[idx] * keep).to(case.y.dtype)  # [T, n]
        for i, (lo, hi) in enumerate(itertools.pairwise(case.slice_offsets)):
            delta = torch.bmm(b[:, lo:hi], t[:, i * rank_pad : (i + 1) * rank_pad])  # [T, w, 1]
            case.y[:, lo:hi].add_(delta.squeeze(2) * scale[:, i : i + 1])

    return run


def gather_bytes(case: Case) -> int:
    """Bytes of the gathered A and B of gather_bmm_impl."""
    per_token = case.A[0].numel() + case.B[0].numel()
    return len(case.token_slots) * per_token * case.A.element_size()


def loop_impl(case: Case) -> Callable[[], None]:
    """One shrink matmul per segment and one addmm per slice, over the slot's rank only."""
    segs = segments(case.token_slots)
    ranks, scale = case.slot_ranks.tolist(), case.scalings.tolist()  # host values, before capture
    rank_pad = case.B.shape[2]

    def run() -> None:
        for lo, hi, slot in segs:
            t = case.x[lo:hi] @ case.A[slot].T  # [len, n*R]
            rank = ranks[slot]
            for i, (n_lo, n_hi) in enumerate(itertools.pairwise(case.slice_offsets)):
                t_i = t[:, i * rank_pad : i * rank_pad + rank]
                case.y[lo:hi, n_lo:n_hi].addmm_(t_i, case.B[slot, n_lo:n_hi, :rank].T,
                                                alpha=scale[slot][i])

    return run


def reference(case: Case) -> Tensor:
    """apply_lora_torch on fp32 copies: the expected y, [T, N_total] float32."""
    info = build_lora_batch_info(case.token_slots, case.slot_ranks, "triton", 16, case.x.device)
    y = case.y.float().clone()  # .float() of an fp32 y would be y itself
    apply_lora_torch(case.x.float(), case.A.float(), case.B.float(), y, case.slice_offsets,
                     case.scalings, info)
    return y


def relative_error(fn: Callable[[], None], case: Case, expected: Tensor) -> float:
    """Apply once on a copy of y: max |y - expected| over the largest |LoRA delta| expected."""
    y0 = case.y.clone()
    fn()
    err = (case.y.float() - expected).abs().max()
    scale = (expected - y0.float()).abs().max().clamp_min(1e-30)
    case.y.copy_(y0)
    return (err / scale).item()


def min_bytes(num_tokens: int, in_dim: int, out_dim: int, num_slices: int, rank: int,
              num_adapters: int, elem_bytes: int) -> int:
    """Bytes one application must move: x read; each adapter's A (n*rank rows of in_dim) and B
    (out_dim rows of rank) read once; t [T, n*rank] written and read; y read and written."""
    x = num_tokens * in_dim
    weights = num_adapters * rank * (num_slices * in_dim + out_dim)
    t = 2 * num_tokens * num_slices * rank
    y = 2 * num_tokens * out_dim
    return (x + weights + t + y) * elem_bytes


def time_cuda(fn: Callable[[], None], iters: int, replays: int) -> float:
    """Microseconds per application: `iters` applications in one CUDA graph, median replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def time_cpu(fn: Callable[[], None], iters: int, replays: int) -> float:
    """Microseconds per application on the host clock (CPU tensors: no graphs, no streams)."""
    fn()
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(times)


def cpu_copy_bandwidth(nbytes: int = 64 << 20, iters: int = 5) -> float:
    """Host memory copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)


def tuned_impl(case: Case, chunk_size: int, pad_to: int | None = None,
               entry_programs: int | None = -1, block_n: int | None = None,
               fold: bool | None = None) -> Callable[[], None]:
    """The csgmv application with the kernels' tiling forced (a sweep point): the table padded
    to `pad_to` entries as a CUDA graph's is, `entry_programs` programs along entries (-1: the
    default for the table; None: one program an entry, the live count unused), the expand's
    output tile width and the shrink's slice folding."""
    from ops.lora import lora_row_table
    from ops.triton_lora_shrink import shrink_blocks

    info = build_lora_batch_info(case.token_slots, case.slot_ranks, "csgmv", chunk_size,
                                 case.x.device, pad_to=pad_to)
    if entry_programs is None:
        info = dataclasses.replace(info, seg_live=None, chunk_live=None, entry_programs=None)
    elif entry_programs > 0:
        info = dataclasses.replace(info, entry_programs=entry_programs)
    n = case.num_slices
    rank_pad = case.A.shape[1] // n
    blocks = None
    if fold is not None:
        _, block_k, _ = shrink_blocks(case.x.shape[0], rank_pad, case.x.shape[1],
                                      lora_row_table(info).block_m, n)
        blocks = (max(16, 1 << (n * rank_pad - 1).bit_length()) if fold else 16, block_k, fold)
    return lambda: apply_lora_triton(case.x, case.A, case.B, case.y, case.slice_offsets,
                                     case.scalings, info, shrink_blocks=blocks,
                                     expand_block_n=block_n)


def sweep_implementations(case: Case, workload: str) -> dict[str, Callable[[], None]]:
    """--sweep: tilings of the csgmv kernels. Decode: the table padded to its CUDA-graph bucket
    with one program an entry (as before live counts) or fewer programs looping over the real
    entries. Prefill: chunk size x expand tile width x shrink slice folding."""
    impls: dict[str, Callable[[], None]] = {}
    num_tokens = case.x.shape[0]
    if not workload.startswith("prefill"):
        if num_tokens > 1:
            impls[f"pad{num_tokens}-each"] = tuned_impl(case, 16, num_tokens, None)
            for ep in (32, 16, 8):
                if ep < num_tokens or ep == 32:
                    impls[f"pad{num_tokens}-ep{ep}"] = tuned_impl(case, 16, num_tokens, ep)
        return impls
    for chunk in CHUNK_SIZES:
        for block_n in (64, 128):
            for fold in (False, True):
                impls[f"c{chunk}-n{block_n}-{'fold' if fold else 'split'}"] = tuned_impl(
                    case, chunk, block_n=block_n, fold=fold)
    return impls


def implementations(case: Case, is_prefill: bool,
                    with_triton: bool) -> dict[str, Callable[[], None] | str]:
    """name -> the application to time, or why it is skipped."""
    impls: dict[str, Callable[[], None] | str] = {}
    if with_triton:
        impls["triton"] = triton_impl(case, "triton", 16)
        for chunk in CHUNK_SIZES if is_prefill else CHUNK_SIZES[:1]:
            impls[f"csgmv-{chunk}"] = triton_impl(case, "csgmv", chunk)
        if not is_prefill:  # decode as its CUDA graph runs it, with each expand kernel
            impls["pad-rows"] = padded_impl(case, rows_expand=True)
            impls["pad-entries"] = padded_impl(case, rows_expand=False)
    gathered = gather_bytes(case)
    impls["gather-bmm"] = (gather_bmm_impl(case) if gathered <= GATHER_LIMIT_BYTES else
                           f"skipped: gathered A and B take {gathered / 2**30:.1f} GiB > "
                           f"{GATHER_LIMIT_BYTES / 2**30:g} GiB")
    num_adapters = len({s for s in case.token_slots if s >= 0})
    impls["loop"] = (loop_impl(case) if num_adapters <= LOOP_MAX_ADAPTERS else
                     f"skipped: {num_adapters} adapters > {LOOP_MAX_ADAPTERS}")
    return impls


def base_gemm(x: Tensor, weight: Tensor) -> Callable[[], None]:
    """The base projection x W^T into a fixed buffer. x: [T, in]; weight: [N_total, in]."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return lambda: torch.mm(x, weight.T, out=out)


def bench_group(workload: str, lengths: list[int], group: Group, rank: int, settings: dict,
                timer: Callable, ceiling: float) -> list[dict]:
    """Rows (one per implementation) of one group under one workload."""
    dtype, device = getattr(torch, settings["dtype"]), settings["device"]
    token_slots = [slot for slot, n in enumerate(lengths) for _ in range(n)]
    num_slots, num_tokens = max(32, len(lengths)), len(token_slots)
    case = make_case(group, [rank] * num_slots, rank, token_slots, dtype, device)
    expected = reference(case)
    y_init = case.y.clone()  # timing accumulates into y: each check starts from this
    weight = torch.randn(group.out_dim, group.in_dim, device=device).to(dtype)
    base_us = timer(base_gemm(case.x, weight), settings["iters"], settings["replays"])
    nbytes = min_bytes(num_tokens, group.in_dim, group.out_dim, len(group.widths), rank,
                       len(lengths), case.x.element_size())
    impls = implementations(case, workload.startswith("prefill"), settings["with_triton"])
    if settings.get("sweep") and settings["with_triton"]:
        impls |= sweep_implementations(case, workload)
    rows = []
    for impl, fn in impls.items():
        row = {"workload": workload, "group": group.name, "impl": impl,
               "num_tokens": num_tokens, "num_adapters": len(lengths), "bytes": nbytes,
               "base_us": base_us, "fits_l2": nbytes < settings["l2_bytes"]}
        if isinstance(fn, str):
            rows.append(row | {"skipped": fn})
            continue
        case.y.copy_(y_init)
        err = relative_error(fn, case, expected)
        row["max_rel_err"], row["ok"] = err, err <= settings["tolerance"]
        if not row["ok"]:
            print(f"!!! MISMATCH {workload} {group.name} {impl}: relative error {err:.3g} > "
                  f"{settings['tolerance']:g}")
        us = timer(fn, settings["iters"], settings["replays"])
        gb_s = nbytes / us / 1e3
        rows.append(row | {"us": us, "gb_s": gb_s, "pct_ceiling": 100 * gb_s * 1e9 / ceiling,
                           "pct_base": 100 * us / base_us})
    return rows


def per_step(rows: list[dict], num_groups: int, num_layers: int) -> list[dict]:
    """LoRA ms per step (four groups x layers) of each workload and implementation, when every
    group was timed."""
    by_impl: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_impl.setdefault((r["workload"], r["impl"]), []).append(r)
    out = []
    for (workload, impl), impl_rows in by_impl.items():
        timed = [r for r in impl_rows if "us" in r]
        if len(timed) != num_groups:
            continue
        lora_ms = num_layers * sum(r["us"] for r in timed) / 1e3
        base_ms = num_layers * sum(r["base_us"] for r in timed) / 1e3
        out.append({"workload": workload, "impl": impl, "lora_ms_per_step": lora_ms,
                    "base_gemm_ms_per_step": base_ms, "pct_base": 100 * lora_ms / base_ms,
                    "all_ok": all(r["ok"] for r in timed)})
    return out


def print_tables(result: dict) -> None:
    """One table per workload (group x implementation), then the per-step totals."""
    for workload in result["settings"]["workloads"]:
        rows = [r for r in result["rows"] if r["workload"] == workload]
        print(f"\n== {workload}: {rows[0]['num_tokens']} tokens, {rows[0]['num_adapters']} "
              f"adapters, rank {result['settings']['rank']} ==")
        print(f"{'group':8} {'impl':11} {'us':>9} {'GB/s':>8} {'% ceil':>7} {'% base':>7}")
        for r in rows:  # layer order
            if "us" not in r:
                print(f"{r['group']:8} {r['impl']:11} {r['skipped']}")
                continue
            flags = (" L2" if r["fits_l2"] else "") + ("" if r["ok"] else " MISMATCH")
            print(f"{r['group']:8} {r['impl']:11} {r['us']:9.1f} {r['gb_s']:8.1f} "
                  f"{r['pct_ceiling']:7.1f} {r['pct_base']:7.1f}{flags}")
    print(f"\nLoRA ms per step ({result['settings']['num_layers']} layers x 4 groups):")
    for s in result["per_step"]:
        print(f"  {s['workload']:18} {s['impl']:11} {s['lora_ms_per_step']:8.3f} ms "
              f"({s['pct_base']:.1f}% of the base GEMMs' {s['base_gemm_ms_per_step']:.3f} ms)"
              + ("" if s["all_ok"] else "  MISMATCH"))
    print(f"\nceiling {result['ceiling_gb_s']:.0f} GB/s on {result['device']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--rank", type=int, default=None, help="adapter rank (16; --quick: 4)")
    ap.add_argument("--iters", type=int, default=None, help="applications per timed graph")
    ap.add_argument("--replays", type=int, default=None, help="timed replays (median taken)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shape on CPU in fp32; Triton only under TRITON_INTERPRET=1")
    ap.add_argument("--sweep", action="store_true",
                    help="also csgmv tilings: padded decode tables (and a batch-256 bucket), "
                         "prefill chunk size x expand tile x shrink folding")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        shape, workloads, device, dtype = QUICK_SHAPE, QUICK_WORKLOADS, "cpu", torch.float32
        with_triton = os.environ.get("TRITON_INTERPRET") == "1"
        timer, ceiling, device_name, l2_bytes = time_cpu, cpu_copy_bandwidth(), "cpu", 0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (use --quick for a CPU smoke run)")
        from benchmarks.step_bench import hbm_bandwidth

        shape, workloads, device, dtype = SHAPES[a.shape], WORKLOADS, "cuda", torch.bfloat16
        timer, ceiling, with_triton = time_cuda, hbm_bandwidth(), True
        device_name = torch.cuda.get_device_name()
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    rank = a.rank or (4 if a.quick else 16)
    settings = {"shape": "quick" if a.quick else a.shape,
                "dtype": str(dtype).removeprefix("torch."), "device": device, "rank": rank,
                "iters": a.iters or (1 if a.quick else 20),
                "replays": a.replays or (3 if a.quick else 20), "tolerance": TOLERANCE[dtype],
                "with_triton": with_triton, "num_layers": shape["num_hidden_layers"],
                "workloads": list(workloads), "l2_bytes": l2_bytes, "quick": a.quick,
                "sweep": a.sweep}
    if a.sweep and not a.quick:
        workloads = {**workloads, "decode_b256_a32": [8] * 32}
        settings["workloads"] = list(workloads)
    groups = layer_groups(shape)
    rows = []
    for name, lengths in workloads.items():
        for group in groups:
            rows += bench_group(name, lengths, group, rank, settings, timer, ceiling)
            if device == "cuda":
                torch.cuda.empty_cache()  # the gathers' and graphs' memory of this group
    result = {"device": device_name, "ceiling_bytes_per_s": ceiling,
              "ceiling_gb_s": ceiling / 1e9, "settings": settings,
              "groups": [dataclasses.asdict(g) for g in groups], "rows": rows,
              "per_step": per_step(rows, len(groups), settings["num_layers"]),
              "mismatches": [r for r in rows if r.get("ok") is False]}
    print_tables(result)
    if result["mismatches"]:
        print(f"!!! {len(result['mismatches'])} implementation(s) disagree with the reference")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
