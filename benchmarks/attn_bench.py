"""Decode attention alone: microseconds a launch and the KV bytes it reads over that time.

For each (batch, context) case, `--layers` distinct paged KV caches (Llama-3.1-8B heads: 32 query
heads over 8 KV heads of 128, 16-token pages, pages shuffled) and one query per sequence; each
variant's launches over all layers are captured in one CUDA graph and replayed (`--ncu`: one
layer, each variant launched once, untimed, for Nsight Compute). The block table is as wide as
a decode graph's (the model's context length), so the default slice count is the one serving
uses. Variants: each --min-split (the shortest slice a sequence's own length is cut into; its
last slice merges them), with --one-slice one slice a sequence, and with --configs each launch
configuration (BLOCK_N x num_warps x num_stages) at each --splits slice count (0: the default
count), min split --config-min-split (64). Each line gives the largest error against the first
variant's output. (At commit 1ab65fa a `launch` variant also ran the kernel before, every slice
of the table's width merged by a second kernel: benchmarks/RESULTS.md, thirteenth session.)

    python -m benchmarks.attn_bench --out attn.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.step_bench import hbm_bandwidth
from benchmarks.timing import graph_us
from ops.triton_decode_attention import decode_attention_triton

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CAPACITY = 131072  # Llama-3.1-8B's context length: a decode graph's block-table width


def _layers(batch: int, ctx: int, layers: int, gen: torch.Generator) -> list[tuple]:
    pages = -(-ctx // PAGE)
    out = []
    for _ in range(layers):
        k = torch.randn(batch * pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda",
                        dtype=torch.bfloat16)
        v = torch.randn_like(k)
        perm = torch.randperm(batch * pages, generator=gen).to("cuda", torch.int32)
        table = torch.zeros(batch, CAPACITY // PAGE, dtype=torch.int32, device="cuda")
        table[:, :pages] = perm.view(batch, pages)
        q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        out.append((q, k, v, table, lens, torch.empty_like(q)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[143, 1024, 4096])
    ap.add_argument("--min-split", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--one-slice", action="store_true", help="also one slice a sequence")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="launch configurations BLOCK_NxWARPSxSTAGES, e.g. 64x4x3")
    ap.add_argument("--splits", type=int, nargs="+", default=[0],
                    help="slice counts for --configs (0: the default count)")
    ap.add_argument("--config-min-split", type=int, default=64,
                    help="the shortest slice for --configs (rounded up to whole BLOCK_N tiles)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-gb", type=float, default=24.0, help="KV bytes a case may allocate")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 32, context 143, 4 layers")
    ap.add_argument("--ncu", action="store_true",
                    help="one layer, each variant launched once, untimed (for Nsight Compute)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.batch, a.ctx, a.layers, a.reps = [1, 32], [143], 4, 5
    if a.ncu:
        a.layers = 1
    bw = hbm_bandwidth()
    scale = HEAD_DIM**-0.5
    variants = [(f"min split {m}", {"min_split": m}) for m in a.min_split]
    if a.one_slice:
        variants.append(("1 slice", {"num_splits": 1}))
    for text in a.configs:
        config = tuple(int(x) for x in text.split("x"))
        if len(config) != 3:
            ap.error(f"--configs takes BLOCK_NxWARPSxSTAGES, got {text!r}")
        for splits in a.splits:
            kw = {"config": config, "min_split": a.config_min_split,
                  **({"num_splits": splits} if splits else {})}
            variants.append((f"{text} s{splits or 'auto'}", kw))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch in a.batch:
        for ctx in a.ctx:
            kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2
            layers = max(1, min(a.layers, int(a.max_gb * 1e9 // kv_bytes)))
            items = _layers(batch, ctx, layers, gen)
            ref = None
            for name, kw in variants:
                def run(item, kw=kw):
                    q, k, v, table, lens, out = item
                    decode_attention_triton(q, k, v, table, lens, scale, out=out, **kw)
                if a.ncu:
                    run(items[0])
                    torch.cuda.synchronize()
                    print(f"b{batch:<3} ctx {ctx:<5} {name}: launched once", flush=True)
                    continue
                us = graph_us(run, items, a.reps)
                got = items[0][5].float().clone()
                ref = got if ref is None else ref
                err = (got - ref).abs().max().item()
                row = {"batch": batch, "ctx": ctx, "variant": name, "layers": layers, "us": us,
                       "kv_gbps": kv_bytes / us / 1e3, "share_of_copy": kv_bytes / us / 1e-6 / bw,
                       "max_err_vs_first": err}
                rows.append(row)
                print(f"b{batch:<3} ctx {ctx:<5} {name:<17} {us:8.2f} us  "
                      f"{row['kv_gbps']:7.0f} GB/s ({100 * row['share_of_copy']:4.1f} % of copy)"
                      f"  err {err:.2e}", flush=True)
            del items
            torch.cuda.empty_cache()
    if a.out:
        a.out.write_text(json.dumps({"copy_bytes_per_s": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
