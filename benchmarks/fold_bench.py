"""LoRA folds alone: SiLU*up's fold kernel over its tilings, add+RMSNorm's, on the GPU.

Decode shapes of a model (Llama-3.1-8B: intermediate 14336), rank-16 adapters, rows grouped
by adapter as the runner orders them. Each variant's launches for `--layers` layers (each its
own buffers, so the adapters' B tiles come from HBM as in a forward, not from L2) are captured
in one CUDA graph; the figure is a replay's median over `--reps`, divided by the layers:
microseconds a launch.

    python -m benchmarks.fold_bench --out fold.json
    python -m benchmarks.fold_bench --ncu     # one launch of each variant, for ncu to read
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.dummy_model import SHAPES
from benchmarks.timing import graph_us, write_kernel_rows
from ops.triton_lora_fold import LoraFold
from ops.triton_rmsnorm import add_rmsnorm_triton
from ops.triton_silu_mul import fold_launch, silu_mul_triton

# SiLU*up fold variants: (name, rows a program, columns, num_warps); serving uses group8 b64 w4.
# (The twelfth session's sweep also ran a kernel of a row a program, since replaced:
# RESULTS.md.)
VARIANTS = [
    ("group1 b256 w4", 1, 256, 4),
    ("group2 b128 w4", 2, 128, 4),
    ("group4 b128 w4", 4, 128, 4),
    ("group8 b32 w4", 8, 32, 4),
    ("group8 b64 w2", 8, 64, 2),
    ("group8 b64 w4", 8, 64, 4),
    ("group8 b128 w4", 8, 128, 4),
    ("group16 b32 w4", 16, 32, 4),
]


def parse_case(case: str) -> tuple[int, int]:
    batch, adapters = (int(v) for v in case.lower().split("x"))
    if not 1 <= adapters <= batch:
        raise SystemExit(f"case {case!r}: 1 to batch adapters")
    return batch, adapters


def kernel_args(ap: argparse.ArgumentParser) -> None:
    """The options the decode-kernel benchmarks (fold_bench, shrink_bench) share."""
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=["1x1", "32x8", "32x32"],
                    metavar="BATCHxADAPTERS")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="4 layers, 5 replays")
    ap.add_argument("--out", type=Path)


def make_layers(batch: int, adapters: int, inter: int, rank: int, splits: int, layers: int,
                base_rows: bool) -> list[dict]:
    """Per layer: gate_up [T, 2*inter] bf16, out, and a fold over a 32-slot pool whose first
    `adapters` slots the rows use, in runs (slot of row i: i * adapters // T)."""
    dev, bf16 = "cuda", torch.bfloat16
    slots = torch.tensor([-1 if base_rows else i * adapters // batch for i in range(batch)],
                         dtype=torch.int32, device=dev)
    out = []
    for _ in range(layers):
        B = torch.randn(32, 2 * inter, rank, device=dev, dtype=bf16) * 0.05
        t = torch.randn(splits, batch, 2 * rank, device=dev) / splits
        fold = LoraFold(t, B, torch.rand(32, 2, device=dev), slots, (0, inter, 2 * inter), None)
        out.append({"gate_up": torch.randn(batch, 2 * inter, device=dev, dtype=bf16),
                    "out": torch.empty(batch, inter, device=dev, dtype=bf16), "fold": fold})
    return out


def launcher(name: str, group: int, block: int, warps: int):
    if name == "no fold":
        return lambda ly: silu_mul_triton(ly["gate_up"], out=ly["out"])
    return lambda ly: fold_launch(ly["gate_up"], ly["out"], ly["fold"], group, block, warps)


def check(layers: list[dict], fn) -> float:
    """Largest |difference| between fn's output and the serving kernel's on layer 0."""
    ly = layers[0]
    fold_launch(ly["gate_up"], ly["out"], ly["fold"])
    want = ly["out"].clone()
    ly["out"].fill_(float("nan"))
    fn(ly)
    return (ly["out"].float() - want.float()).abs().max().item()


def norm_layers(batch: int, adapters: int, hidden: int, rank: int, splits: int,
                layers: int) -> list[dict]:
    """Per layer: x, residual [T, hidden] bf16 and a one-slice fold for add+RMSNorm."""
    dev, bf16 = "cuda", torch.bfloat16
    slots = torch.tensor([i * adapters // batch for i in range(batch)], dtype=torch.int32,
                         device=dev)
    out = []
    for _ in range(layers):
        fold = LoraFold(torch.randn(splits, batch, rank, device=dev) / splits,
                        torch.randn(32, hidden, rank, device=dev, dtype=bf16) * 0.05,
                        torch.rand(32, 1, device=dev), slots, (0, hidden), None)
        out.append({"x": torch.randn(batch, hidden, device=dev, dtype=bf16),
                    "res": torch.randn(batch, hidden, device=dev, dtype=bf16),
                    "w": torch.rand(hidden, device=dev, dtype=bf16) + 0.5,
                    "out": torch.empty(batch, hidden, device=dev, dtype=bf16),
                    "res_out": torch.empty(batch, hidden, device=dev, dtype=bf16),
                    "fold": fold})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    kernel_args(ap)
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 8],
                    help="shrink partials the fold sums (each a run of its own)")
    ap.add_argument("--base-rows", action="store_true", help="also every row without adapter")
    ap.add_argument("--ncu", action="store_true", help="one launch of each variant, untimed")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.reps = 4, 5
    inter, hidden = SHAPES[a.shape]["intermediate_size"], SHAPES[a.shape]["hidden_size"]
    variants = [("no fold", 0, 0, 0)] + VARIANTS
    rows = []

    def record(case, splits, base_rows, name, us, err):
        rows.append({"case": case, "splits": splits, "base_rows": base_rows, "variant": name,
                     "us": us, "max_diff": err})
        print(f"{case:>6} s{splits:<2} {'base rows' if base_rows else 'adapters ':9} {name:16} "
              f"{us:7.2f} us  diff {err}", flush=True)

    n_layers = 1 if a.ncu else a.layers
    for case in a.cases:
        batch, adapters = parse_case(case)
        for splits in a.splits:
            for base_rows in (False, True) if a.base_rows else (False,):
                layers = make_layers(batch, adapters, inter, a.rank, splits, n_layers, base_rows)
                for name, group, block, warps in variants:
                    fn = launcher(name, group, block, warps)
                    if a.ncu:
                        fn(layers[0])
                        torch.cuda.synchronize()
                        continue
                    err = None if name == "no fold" else check(layers, fn)
                    record(case, splits, base_rows, "silu " + name, graph_us(fn, layers, a.reps),
                           err)
                del layers
            if a.ncu:
                continue
            norms = norm_layers(batch, adapters, hidden, a.rank, splits, n_layers)
            for name, fold in (("add+rmsnorm", False), ("add+rmsnorm fold", True)):
                def fn(ly, fold=fold):
                    add_rmsnorm_triton(ly["x"], ly["res"], ly["w"], 1e-5, out=ly["out"],
                                       residual_out=ly["res_out"],
                                       fold=ly["fold"] if fold else None)
                record(case, splits, False, name, graph_us(fn, norms, a.reps), None)
            del norms
            torch.cuda.empty_cache()
    if a.out and rows:
        write_kernel_rows(a.out, a.shape, a.rank, a.layers, rows)


if __name__ == "__main__":
    main()
