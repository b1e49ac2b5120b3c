"""The decode step's projections alone: achieved HBM bandwidth of each GEMM at decode batches.

For each projection of a model shape (qkv, o, gate_up, down, lm_head), `--layers` distinct bf16
weights (so each launch reads its weight from HBM, not L2) multiplied by a [batch, in]
activation, captured in one CUDA graph and replayed; reported: microseconds a launch and the
weight bytes over that time, next to a device-to-device copy's bandwidth measured in the same
run. Layouts: `linear` is F.linear on the [out, in] weight serving uses; `mm_t` is x @ W with
the weight stored [in, out]; with `--lt-algos N`, each of up to N algorithms cuBLASLt's
heuristic offers (benchmarks/blaslt.py, by ctypes), with its tile, split-K count and
reduction scheme; with `--split-k S...`, one batched GEMM over S slices of the input dimension
with fp32 partials (what a consumer kernel that sums them would need instead of cuBLAS's
split-K reduce launch), alone and with torch's sum. Each line also gives the error against
F.linear (relative, Frobenius).
(A Triton GEMV with and without programmatic dependent launch was measured against cuBLAS
here at commit 511150b, `--triton`, and dropped: benchmarks/RESULTS.md.) With `--gemv
TILE:WARPS ...`, ops/triton_decode_gemv.py's kernel (batches of at most 8 rows) at each tiling,
launched plainly and with PDL, and, as decode graphs run a projection, behind a PDL add+RMSNorm
that writes its input: `norm+linear` against `norm+gemv`, the pair timed. `--gemm
BN:BK:PRE:WARPS:STAGES ...` does the same for ops/triton_decode_gemm.py's tensor-core kernel
(up to 64 rows), and with `--gemm-split S ...` times it over S slices of K too. `--gate-up
BN:BK:PRE:WARPS:STAGES ...` times gate_up with SiLU*up after it, as two launches and as the
decode GEMM's one (`decode_gemm_silu_mul`).

    python -m benchmarks.gemm_bench --out gemm.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.dummy_model import SHAPES
from benchmarks.step_bench import hbm_bandwidth
from benchmarks.timing import graph_us
from ops.splitk import splitk_linear


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (out, in)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head
    return {"qkv": (qkv, hidden), "o": (hidden, shape["num_attention_heads"] * head),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter),
            "lm_head": (shape["vocab_size"], hidden)}


def timed_row(name: str, ws: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor,
              layout: str, fn: Callable[[int], torch.Tensor], reps: int, bw: float,
              result: Callable[[torch.Tensor], torch.Tensor] | None = None,
              **extra: object) -> dict:
    """fn(i) (x times weight i) timed over every weight in one graph, with its error against
    F.linear's `want` (of result(fn(0)) where fn gives partials to be summed): the row,
    printed as it comes."""
    batch, (n_out, n_in) = x.shape[0], ws[0].shape
    nbytes = ws[0].numel() * ws[0].element_size()
    got = fn(0) if result is None else result(fn(0))
    err = ((got.float() - want).norm() / want.norm()).item()
    us = graph_us(fn, range(len(ws)), reps)
    row = {"proj": name, "out": n_out, "in": n_in, "batch": batch, "layout": layout, "us": us,
           "tb_per_s": nbytes / us / 1e6, "of_copy": nbytes / us / 1e-6 / bw, "rel_err": err,
           **extra}
    print(f"{name:8} {n_out:6}x{n_in:5} b{batch:<3} {layout:22} {us:8.1f} us "
          f"{nbytes / us / 1e6:5.2f} TB/s ({100 * row['of_copy']:.0f} % of copy) err {err:.1e}"
          + (f" {extra}" if extra else ""), flush=True)
    return row


def splitk_rows(name: str, ws: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor,
                splits: list[int], reps: int, bw: float) -> list[dict]:
    """The projection as serving's opt-in split-K runs it (ops.splitk.splitk_linear: one
    batched GEMM over K slices with fp32 outputs), timed as the F.linear rows are: the
    partials alone (`bmm_kS`), and with torch summing them (`bmm_kS+sum`)."""
    rows = []
    for sp in splits:
        if ws[0].shape[1] % sp:
            continue

        def partials(i: int, sp=sp) -> torch.Tensor:
            return splitk_linear(x, ws[i], sp)

        try:
            rows.append(timed_row(name, ws, x, want, f"bmm_k{sp}", partials, reps, bw,
                                  result=lambda p: p.sum(0)))
            rows.append(timed_row(name, ws, x, want, f"bmm_k{sp}+sum",
                                  lambda i, partials=partials: partials(i).sum(0), reps, bw))
        except RuntimeError as e:  # torch without bmm's out_dtype here: say so, go on
            print(f"{name:8} b{x.shape[0]:<3} bmm_k{sp} failed: {e}", flush=True)
    return rows


def lt_rows(name: str, ws: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor,
            count: int, reps: int, bw: float) -> list[dict]:
    """Each cuBLASLt heuristic algorithm for y = x W^T over the weights `ws`, timed as the
    F.linear rows are, with its config."""
    from benchmarks.blaslt import LtLinear

    lt = LtLinear(x.shape[0], *ws[0].shape, x.dtype, count=count)
    y = torch.empty(x.shape[0], ws[0].shape[0], device=x.device, dtype=x.dtype)
    rows = []
    for i in range(len(lt.algos)):
        try:
            rows.append(timed_row(name, ws, x, want, f"lt:{i}",
                                  lambda j, i=i: lt.run(i, x, ws[j], y), reps, bw,
                                  config=lt.config(i)))
        except RuntimeError as e:  # an algorithm that fails to launch: say so, go on
            print(f"{name:8} b{x.shape[0]:<3} lt:{i} failed: {e}", flush=True)
    return rows


def behind_norm(name: str, ws: list[torch.Tensor], x: torch.Tensor, reps: int, bw: float
                ) -> tuple[bool, Callable[[], torch.Tensor], torch.Tensor, dict]:
    """What a decode graph runs before a projection: (whether PDL applies, the add+RMSNorm
    launch that writes the projection's input (with PDL where it applies), F.linear of its
    output, and the row timing that pair)."""
    from ops.triton_rmsnorm import add_rmsnorm_triton

    pdl = torch.cuda.get_device_capability()[0] >= 9
    res = torch.randn_like(x)
    norm_w = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)

    def normed() -> torch.Tensor:
        return add_rmsnorm_triton(x, res, norm_w, 1e-5, pdl=pdl)[0]

    want_n = F.linear(normed(), ws[0]).float()
    row = timed_row(name, ws, x, want_n, "norm+linear", lambda i: F.linear(normed(), ws[i]),
                    reps, bw)
    return pdl, normed, want_n, row


def gemv_rows(name: str, ws: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor,
              tilings: list[str], reps: int, bw: float) -> list[dict]:
    """ops/triton_decode_gemv.py's kernel at each TILE:WARPS, timed as the F.linear rows are,
    plain and with PDL; then each behind the add+RMSNorm that writes its input (PDL, as in a
    decode graph), against F.linear behind it."""
    from ops.triton_decode_gemv import MAX_ROWS, decode_gemv

    if x.shape[0] > MAX_ROWS:
        return []
    pdl, normed, want_n, row = behind_norm(name, ws, x, reps, bw)
    rows = [row]
    for spec in tilings:
        tile, warps = (int(v) for v in spec.split(":"))
        for with_pdl in (False, True) if pdl else (False,):
            label = f"gemv t{tile} w{warps}" + (" pdl" if with_pdl else "")
            rows.append(timed_row(
                name, ws, x, want, label,
                lambda i, t=tile, w=warps, p=with_pdl: decode_gemv(x, ws[i], pdl=p, tile=t,
                                                                   warps=w), reps, bw))
        rows.append(timed_row(
            name, ws, x, want_n, f"norm+gemv t{tile} w{warps}",
            lambda i, t=tile, w=warps: decode_gemv(normed(), ws[i], pdl=pdl, tile=t, warps=w),
            reps, bw))
    return rows


def gemm_rows(name: str, ws: list[torch.Tensor], x: torch.Tensor, want: torch.Tensor,
              tilings: list[str], splits: list[int], reps: int, bw: float) -> list[dict]:
    """ops/triton_decode_gemm.py's kernel at each BLOCK_N:BLOCK_K:PRE_K:WARPS:STAGES, plain and
    with PDL, behind the PDL add+RMSNorm that writes its input (against F.linear behind it),
    and with PDL over each of `splits` slices of K (fp32 partials; their sum checked)."""
    from ops.triton_decode_gemm import MAX_ROWS, decode_gemm, gemm_fits, gemm_tiling

    if x.shape[0] > MAX_ROWS:
        return []
    pdl, normed, want_n, row = behind_norm(name, ws, x, reps, bw)
    rows = [row]
    for spec in tilings:
        if not gemm_fits(x.shape[0], x.shape[1], 1, gemm_tiling(spec)):
            continue
        for with_pdl in (False, True) if pdl else (False,):
            label = f"gemm {spec}" + (" pdl" if with_pdl else "")
            rows.append(timed_row(
                name, ws, x, want, label,
                lambda i, t=spec, p=with_pdl: decode_gemm(x, ws[i], pdl=p, tiling=t),
                reps, bw))
        rows.append(timed_row(
            name, ws, x, want_n, f"norm+gemm {spec}",
            lambda i, t=spec: decode_gemm(normed(), ws[i], pdl=pdl, tiling=t), reps, bw))
        for sp in splits:
            if not gemm_fits(x.shape[0], x.shape[1], sp, gemm_tiling(spec)):
                continue
            rows.append(timed_row(
                name, ws, x, want, f"gemm {spec} split{sp} pdl",
                lambda i, t=spec, s=sp: decode_gemm(x, ws[i], pdl=pdl, split=s, tiling=t),
                reps, bw, result=lambda out: out.sum(0)))
    return rows


def gate_up_rows(ws: list[torch.Tensor], x: torch.Tensor, tilings: list[str], reps: int,
                 bw: float) -> list[dict]:
    """gate_up and SiLU*up, as a decode graph runs them behind the PDL add+RMSNorm that writes
    their input: F.linear then ops/triton_silu_mul.py (the default), the decode GEMM then it,
    and ops/triton_decode_gemm.py `decode_gemm_silu_mul` (one launch) at each tiling. The
    error is against SiLU(gate) * up in fp32."""
    from ops.triton_decode_gemm import (
        MAX_ROWS,
        decode_gemm,
        decode_gemm_silu_mul,
        gemm_fits,
        gemm_tiling,
    )
    from ops.triton_silu_mul import silu_mul_triton

    if x.shape[0] > MAX_ROWS:
        return []
    pdl, normed, _, _ = behind_norm("gate_up", ws, x, reps, bw)
    gate, up = F.linear(normed(), ws[0]).float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    rows = [timed_row("gate_up", ws, x, want, "norm+linear+silu",
                      lambda i: silu_mul_triton(F.linear(normed(), ws[i]), pdl=pdl), reps, bw)]
    for spec in tilings:
        if not gemm_fits(x.shape[0], x.shape[1], 1, gemm_tiling(spec)):
            continue
        rows.append(timed_row(
            "gate_up", ws, x, want, f"norm+gemm+silu {spec}",
            lambda i, t=spec: silu_mul_triton(decode_gemm(normed(), ws[i], pdl=pdl, tiling=t),
                                              pdl=pdl), reps, bw))
        rows.append(timed_row(
            "gate_up", ws, x, want, f"norm+gemm_silu {spec}",
            lambda i, t=spec: decode_gemm_silu_mul(normed(), ws[i], pdl=pdl, tiling=t),
            reps, bw))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="4 layers, 5 replays")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"],
                    help="torch's preferred BLAS library for the run (default: torch's own)")
    ap.add_argument("--lt-algos", type=int, default=0, metavar="N",
                    help="also time each of up to N algorithms cuBLASLt's heuristic offers for "
                         "the [out, in] layout (benchmarks/blaslt.py), with their configs")
    ap.add_argument("--plan-out", type=Path,
                    help="with --lt-algos: write the projections and batches whose fastest "
                         "cuBLASLt algorithm beats F.linear by over 3 %% (for step_bench "
                         "--lt-plan)")
    ap.add_argument("--split-k", type=int, nargs="*", default=[], metavar="S",
                    help="also time each projection as one batched GEMM over S slices of its "
                         "input dimension with fp32 partials (splitk_views)")
    ap.add_argument("--gemv", nargs="*", default=[], metavar="TILE:WARPS",
                    help="also time ops/triton_decode_gemv.py's kernel at these tilings "
                         "(W elements a program, warps), batches of at most 8 rows")
    ap.add_argument("--gemm", nargs="*", default=[], metavar="BN:BK:PRE:WARPS:STAGES",
                    help="also time ops/triton_decode_gemm.py's kernel at these tilings "
                         "(batches of at most 64 rows)")
    ap.add_argument("--gemm-split", type=int, nargs="*", default=[], metavar="S",
                    help="with --gemm: also over S slices of K (fp32 partials)")
    ap.add_argument("--gate-up", nargs="*", default=[], metavar="BN:BK:PRE:WARPS:STAGES",
                    help="also time gate_up with SiLU*up behind add+RMSNorm: F.linear and the "
                         "decode GEMM each then the SiLU*up kernel, and both in one launch "
                         "(decode_gemm_silu_mul) at these tilings")
    ap.add_argument("--proj", nargs="+", help="only these projections")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.blas:
        torch.backends.cuda.preferred_blas_library(a.blas)
    if a.quick:
        a.layers, a.reps = 4, 5
    bw = hbm_bandwidth()
    rows = []
    for name, (n_out, n_in) in projections(SHAPES[a.shape]).items():
        if a.proj and name not in a.proj:
            continue
        count = 2 if name == "lm_head" else a.layers
        ws = [torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
        wts = [w.t().contiguous() for w in ws]
        for batch in a.batch:
            x = torch.randn(batch, n_in, device="cuda", dtype=torch.bfloat16)
            cases = [("linear", lambda i, x=x, ws=ws: F.linear(x, ws[i])),
                     ("mm_t", lambda i, x=x, wts=wts: x @ wts[i])]
            want = F.linear(x, ws[0]).float()
            for layout, fn in cases:
                rows.append(timed_row(name, ws, x, want, layout, fn, a.reps, bw))
            if a.lt_algos:
                rows += lt_rows(name, ws, x, want, a.lt_algos, a.reps, bw)
            if a.split_k:
                rows += splitk_rows(name, ws, x, want, a.split_k, a.reps, bw)
            if a.gemv:
                rows += gemv_rows(name, ws, x, want, a.gemv, a.reps, bw)
            if a.gemm:
                rows += gemm_rows(name, ws, x, want, a.gemm, a.gemm_split, a.reps, bw)
            if a.gate_up and name == "gate_up":
                rows += gate_up_rows(ws, x, a.gate_up, a.reps, bw)
        del ws, wts
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if a.lt_algos and a.plan_out:
        from benchmarks.blaslt import best_plan

        plan = best_plan(rows)
        a.plan_out.write_text(json.dumps({"lt_algos": a.lt_algos, "plan": plan}, indent=2))
        for p in plan:
            print(f"plan: {p['proj']} b{p['batch']} lt:{p['algo']} {p['us']:.1f} us against "
                  f"F.linear's {p['linear_us']:.1f}")
    if a.out:
        a.out.write_text(json.dumps({"shape": a.shape, "copy_bytes_per_s": bw,
                                     "device": torch.cuda.get_device_name(), "rows": rows},
                                    indent=2))


if __name__ == "__main__":
    main()
