"""The LoRA expand alone at prefill, over its tilings, against the read-modify-write ceiling.

Prefill of 8 x 512 tokens over 8 rank-16 adapters (one adapter a sequence), each LoRA group of a
Llama-3.1-8B layer: t as the shrink leaves it (one split, in the activations' dtype), then
y += s * t B^T in place by the entry expand (ops/triton_lora_expand.py) with

- the table: chunks of up to C rows (c<C>b<BLOCK_M>m<m_progs>: m_progs programs a chunk, each
  looping over its BLOCK_M-row tiles; c32b32m1 is how the engine prefilled), or the segments
  (s<BLOCK_M>x<m_progs>);
- the output tile width, warps and pipeline stages;

against torch's y.mul_(1) (the same bytes of y read and written, nothing else) as the ceiling a
read-modify-write of y reaches. Each point's y is checked against a torch reference first.
"ms a step" = the four groups x 32 layers. Every time: 20 applications in a CUDA graph, median
of 20 replays (benchmarks/lora_kernel_bench.time_cuda).

    python -m benchmarks.expand_sweep --out expand_sweep.json
    python -m benchmarks.expand_sweep --quick   # CPU smoke run (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.dummy_model import SHAPES
from benchmarks.lora_kernel_bench import (
    QUICK_SHAPE,
    Case,
    layer_groups,
    make_case,
    relative_error,
    time_cpu,
    time_cuda,
)
from ops.lora import (
    LoraRowTable,
    _chunks,
    _segments,
    build_lora_batch_info,
    lora_expand_torch,
    lora_row_table,
)
from ops.triton_lora_expand import ExpandTuning, triton_lora_expand


@dataclasses.dataclass(frozen=True)
class Point:
    """One tiling of the expand."""

    table: str  # "c<chunk>b<block_m>m<m_progs>" (chunks) or "s<block_m>x<m_progs>" (segments)
    block_n: int
    tuning: ExpandTuning

    @property
    def name(self) -> str:
        t = self.tuning
        return f"{self.table}-n{self.block_n}-w{t.num_warps}-s{t.num_stages}"

    @classmethod
    def parse(cls, name: str) -> Point:
        """The point a name like c256b32m2-n128-w4-s2 stands for."""
        table, n, w, st = name.split("-")
        return cls(table, int(n[1:]), ExpandTuning(int(w[1:]), int(st[1:])))


def parse_table(table: str) -> tuple[int, int, int, int]:
    """(chunk rows, 0 for segments; block_m; m_progs; chunks a program, 0 for one) of a table
    name: c<chunk>b<block_m>m<m_progs>[e<k>] or s<block_m>x<m_progs>."""
    table, _, per_prog = table.partition("e")
    if table.startswith("c"):
        chunk, rest = table[1:].split("b")
        block_m, m_progs = rest.split("m")
        return int(chunk), int(block_m), int(m_progs), int(per_prog or 0)
    block_m, m_progs = table[1:].split("x")
    return 0, int(block_m), int(m_progs), int(per_prog or 0)


def row_table(case: Case, table: str) -> LoraRowTable:
    """The row table of `table` for the case's tokens: chunks of <chunk> rows, each swept by
    m_progs programs of block_m-row tiles (c...), or the segments (s...)."""
    chunk, block_m, m_progs, per_prog = parse_table(table)
    if chunk:
        indptr, slots = _segments(case.token_slots)
        chunk_indptr, chunk_slots = _chunks(indptr, slots, chunk)
        device = case.x.device
        return LoraRowTable(
            torch.tensor(chunk_indptr, dtype=torch.int32, device=device),
            torch.tensor(chunk_slots, dtype=torch.int32, device=device),
            len(chunk_slots), block_m, m_progs,
            entry_progs=-(-len(chunk_slots) // per_prog) if per_prog else 0,
        )
    info = build_lora_batch_info(case.token_slots, case.slot_ranks, "triton", 16, case.x.device)
    return dataclasses.replace(lora_row_table(info), block_m=block_m, m_progs=m_progs)


TABLES = ("c32b32m1", "c64b64m1", "c128b64m1", "c128b64m2", "c256b64m1", "c256b64m2",
          "c256b64m4", "c256b32m2", "c256b32m4", "c512b64m2", "s64x2", "s32x2")
QUICK_TABLES = ("c32b32m1", "c64b16m2", "s16x2")


def points(quick: bool) -> list[Point]:
    """Tables x tile widths x warps, two stages."""
    out = []
    for table, block_n, warps in itertools.product(
        QUICK_TABLES if quick else TABLES, (64, 128) if quick else (128, 256),
        (4,) if quick else (4, 8),
    ):
        block_m = parse_table(table)[1]
        if block_m * block_n > 4096 * warps:  # the fp32 accumulator alone past 128 registers
            continue
        out.append(Point(table, block_n, ExpandTuning(warps, 2)))
    return out


def expected(case: Case, t: torch.Tensor) -> torch.Tensor:
    """y + s * t B^T per segment and slice, in fp32 (the torch reference expand)."""
    y = case.y.float().clone()
    info = build_lora_batch_info(case.token_slots, case.slot_ranks, "triton", 16, y.device)
    lora_expand_torch(t, case.B, y, case.slice_offsets, case.scalings, info)
    return y


def run(shape: dict, lengths: list[int], rank: int, dtype: torch.dtype, device: str,
        quick: bool, iters: int, replays: int, names: list[str] | None = None) -> dict:
    timer = time_cpu if device == "cpu" else time_cuda
    groups = layer_groups(shape)
    token_slots = [slot for slot, n in enumerate(lengths) for _ in range(n)]
    cases = {g.name: make_case(g, [rank] * len(lengths), rank, token_slots, dtype, device, seed=i)
             for i, g in enumerate(groups)}
    # one split, as the shrink leaves it at prefill: t in the activations' dtype
    ts = {name: (torch.randn(len(token_slots), c.A.shape[1], device=device) / 4).to(dtype)
          for name, c in cases.items()}
    rows: list[dict] = []
    for name, case in cases.items():
        nbytes = 2 * case.y.numel() * case.y.element_size()
        us = timer(lambda case=case: case.y.mul_(1.0), iters, replays)
        rows.append({"group": name, "impl": "torch-rmw", "us": us, "y_bytes": nbytes})
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    refs = {name: expected(case, ts[name]) for name, case in cases.items()}
    for point in [Point.parse(n) for n in names] if names else points(quick):
        for name, case in cases.items():
            table, t = row_table(case, point.table), ts[name]

            def fn(case: Case = case, table: LoraRowTable = table, t: torch.Tensor = t,
                   point: Point = point) -> None:
                triton_lora_expand(t, case.B, case.y, case.slice_offsets, case.scalings,
                                   case.slot_ranks, table.indptr, table.slots, table.num_entries,
                                   table.block_m, table.m_progs, block_n=point.block_n,
                                   entry_progs=table.entry_progs, tuning=point.tuning)

            y0 = case.y.clone()
            err = relative_error(fn, case, refs[name])
            row = {"group": name, "impl": point.name, "table": point.table,
                   "block_n": point.block_n, **dataclasses.asdict(point.tuning),
                   "max_rel_err": err, "ok": err <= tol}
            if not row["ok"]:
                print(f"!!! MISMATCH {point.name} {name}: relative error {err:.3g}")
            row["us"] = timer(fn, iters, replays)
            case.y.copy_(y0)
            rows.append(row)
    return {"rows": rows, "per_step": per_step(rows, len(groups), shape["num_hidden_layers"])}


def per_step(rows: list[dict], num_groups: int, num_layers: int) -> list[dict]:
    """ms a step of each implementation timed on every group, fastest first."""
    by_impl: dict[str, list[dict]] = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    ceiling = sum(r["us"] for r in by_impl.get("torch-rmw", []))
    out = []
    for impl, impl_rows in by_impl.items():
        if len(impl_rows) != num_groups:
            continue
        us = sum(r["us"] for r in impl_rows)
        out.append({"impl": impl, "ms_step": us * num_layers / 1e3,
                    "x_rmw": us / ceiling if ceiling else None,
                    "ok": all(r.get("ok", True) for r in impl_rows)})
    return sorted(out, key=lambda r: r["ms_step"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--top", type=int, default=25, help="print this many fastest")
    ap.add_argument("--points", nargs="+", help="only these points (names as printed)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.quick:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--quick runs the Triton kernel on the CPU: set TRITON_INTERPRET=1")
        shape, lengths, device, dtype, iters, replays = QUICK_SHAPE, [32, 32], "cpu", \
            torch.float32, 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (use --quick for a CPU smoke run)")
        shape, lengths, device, dtype, iters, replays = SHAPES["llama-3.1-8b"], [512] * 8, \
            "cuda", torch.bfloat16, 20, 20
    started = time.time()
    result = run(shape, lengths, 16 if not a.quick else 4, dtype, device, a.quick, iters, replays,
                 a.points)
    result["settings"] = {"quick": a.quick, "lengths": lengths, "dtype": str(dtype),
                          "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                          "seconds": round(time.time() - started, 1)}
    print(f"{'impl':44s} {'ms/step':>8s} {'÷ rmw':>6s}")
    for r in result["per_step"][: a.top]:
        ratio = f"{r['x_rmw']:.2f}" if r["x_rmw"] else "-"
        print(f"{r['impl']:44s} {r['ms_step']:8.3f} {ratio:>6s}{'' if r['ok'] else ' MISMATCH'}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
