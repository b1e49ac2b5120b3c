"""The decode LoRA shrink alone, as a decode graph runs it on its side stream: the split-K shrink
and the partials' sum (ops.lora._base_and_shrink without the projection), on the GPU.

Over 32 adapters at batch 32 the shrink ran at 1.4 TB/s and each projection started only as
the shrink's programs drained (benchmarks/RESULTS.md, sixteenth session): its time is on the
decode step's path. This times it by LoRA group (qkv, o, gate_up, down at the model's shapes,
rank-16 adapters on all of them) for decode cases BATCHxADAPTERS, rows grouped by adapter as
the runner orders them. Each variant's launches for `--layers` layers (each with its own
adapter pool and input, so A comes from HBM as in a forward) are captured in one CUDA graph; the
figure is a replay's median over `--reps`, divided by the layers: microseconds a launch, and the
A bytes the distinct adapters hold over that time.

Variants set the shrink's knobs through the environment while their graph is captured:
"default", "k256"/"k512" (LORASERVE_SHRINK_DECODE_BLOCK_K), "fold"
(LORASERVE_SHRINK_FOLD_DECODE=1), "eager" (LORASERVE_SHRINK_EAGER=1), and combinations joined
by "+" ("eager+fold+k512").

`--beside` times each variant as a decode graph runs it: on a side stream beside the group's
projection (a bf16 weight of its own per layer), after the projection alone ("proj" rows; the
variants' rows then give the time over it). Variant "gemm" there is no shrink kernel at all:
the adapter pool's A rows are stored under the projection's weight rows in one buffer, and one
cuBLAS GEMM over both gives the projection and every slot's t (each row then uses its own
slot's columns). It also records, from one profiled eager layer of
the 32-adapter case, each kernel's launch resources as the profiler reports them (grid, block,
registers a thread, shared memory): whether a shrink program can share a multiprocessor with
the projection's.

    python -m benchmarks.shrink_bench --out shrink.json
    python -m benchmarks.shrink_bench --beside --variants default gemv1 --out beside.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator

import torch

from benchmarks.dummy_model import SHAPES
from benchmarks.fold_bench import kernel_args, parse_case
from benchmarks.gemm_bench import projections
from benchmarks.timing import graph_us, write_kernel_rows

DEFAULT_VARIANTS = ["default", "k256", "k512", "fold", "fold+k512", "eager", "eager+k512",
                    "eager+fold+k512"]


def variant_env(name: str) -> dict[str, str]:
    """The environment a variant name sets: parts joined by '+'."""
    env: dict[str, str] = {}
    for part in name.split("+"):
        if part in ("default", "gemm"):  # gemm: no knob, the stacked GEMM (--beside)
            continue
        if part == "fold":
            env["LORASERVE_SHRINK_FOLD_DECODE"] = "1"
        elif part == "eager":
            env["LORASERVE_SHRINK_EAGER"] = "1"
        elif part.startswith("k") and part[1:].isdigit():
            env["LORASERVE_SHRINK_DECODE_BLOCK_K"] = part[1:]
        else:
            raise SystemExit(f"variant {name!r}: {part!r} is none of default, fold, eager, k<N>")
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    keys = ("LORASERVE_SHRINK_FOLD_DECODE", "LORASERVE_SHRINK_DECODE_BLOCK_K",
            "LORASERVE_SHRINK_EAGER")
    before = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def groups(shape: str) -> dict[str, tuple[int, int]]:
    """LoRA group -> (input width, slices) at a model shape (the pool's groups over the
    projections' widths)."""
    from runtime.adapters.pool import GROUPS

    widths = projections(SHAPES[shape])
    return {g: (widths[g][1], len(modules)) for g, modules in GROUPS.items()}


def a_bytes(adapters: int, slices: int, rank: int, in_dim: int) -> int:
    """A bytes the step's distinct adapters hold for one group (bf16)."""
    return adapters * slices * rank * in_dim * 2


def make_layers(batch: int, adapters: int, in_dim: int, slices: int, rank: int, layers: int,
                device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per layer: x [batch, in_dim], an adapter pool A [adapters, slices * rank, in_dim], and
    the step's LoRA tables (rows i * adapters // batch)."""
    from ops.lora import build_lora_batch_info, lora_row_table

    dev, bf16 = device, dtype
    ranks = torch.full((adapters,), rank, dtype=torch.int32, device=dev)
    token_slots = [i * adapters // batch for i in range(batch)]
    info = build_lora_batch_info(token_slots, ranks, "csgmv", 16, dev, pad_to=batch)
    table = lora_row_table(info)
    return [{"x": torch.randn(batch, in_dim, device=dev, dtype=bf16),
             "A": torch.randn(adapters, slices * rank, in_dim, device=dev, dtype=bf16) * 0.02,
             "info": info, "table": table, "slices": slices} for _ in range(layers)]


def shrink(ly: dict) -> torch.Tensor:
    from ops.lora import _base_and_shrink

    _, t = _base_and_shrink(ly["x"], lambda v: v, ly["A"], ly["info"], ly["slices"], ly["table"],
                            overlap=False, presum=True)
    return t


def projection(ly: dict) -> torch.Tensor:
    return torch.nn.functional.linear(ly["x"], ly["W"])


def beside(ly: dict) -> torch.Tensor:
    """The projection with the shrink on the side stream beside it (as decode graphs run
    them); the shrink's t."""
    from ops.lora import _base_and_shrink

    _, t = _base_and_shrink(ly["x"], lambda v: torch.nn.functional.linear(v, ly["W"]), ly["A"],
                            ly["info"], ly["slices"], ly["table"], overlap=True, presum=True)
    return t


def own_slot_columns(t_all: torch.Tensor, info, width: int) -> torch.Tensor:
    """[1, T, width]: row i's columns of its own slot from t_all [T, slots * width] (zeros for
    base rows), the shrink's t as the stacked GEMM gives it."""
    from ops.lora import lora_row_slots

    slots = lora_row_slots(info, t_all.shape[0]).long()
    cols = slots.clamp(min=0)[:, None] * width + torch.arange(width, device=t_all.device)
    return torch.where(slots[:, None] >= 0, t_all.gather(1, cols), 0.0)[None]


def stacked(ly: dict) -> torch.Tensor:
    """The projection and every pool slot's t in one GEMM over [W; A] (variant "gemm")."""
    return torch.nn.functional.linear(ly["x"], ly["WA"])


def kernel_resources(fn, item) -> dict[str, dict]:
    """Kernel name (60 characters) -> its launch as the profiler records it (grid, block,
    registers per thread, shared memory, ...), from one eager fn(item)."""
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    fn(item)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(item)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    keep = ("grid", "block", "registers per thread", "shared memory", "blocks per SM",
            "warps per SM", "est. achieved occupancy %")
    return {e.get("name", "")[:60]: {k: e["args"][k] for k in keep if k in e.get("args", {})}
            for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    kernel_args(ap)
    ap.add_argument("--groups", nargs="+", default=["qkv", "o", "gate_up", "down"])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--beside", action="store_true",
                    help="time each variant beside its group's projection, after the "
                         "projection alone; record the kernels' launch resources")
    a = ap.parse_args()
    if a.quick:
        a.layers, a.reps = 4, 5
    envs = {v: variant_env(v) for v in a.variants}
    if "gemm" in envs and not a.beside:
        raise SystemExit("variant gemm is a projection's GEMM: it needs --beside")
    shapes = groups(a.shape)
    rows, resources = [], {}
    for case in a.cases:
        batch, adapters = parse_case(case)
        for group in a.groups:
            in_dim, slices = shapes[group]
            layers = make_layers(batch, adapters, in_dim, slices, a.rank, a.layers)
            nbytes = a_bytes(adapters, slices, a.rank, in_dim)
            fn, proj_us = shrink, 0.0
            if a.beside:
                out_dim = projections(SHAPES[a.shape])[group][0]
                for ly in layers:
                    ly["W"] = torch.randn(out_dim, in_dim, device="cuda",
                                          dtype=torch.bfloat16) * 0.02
                    if "gemm" in envs:
                        ly["WA"] = torch.cat([ly["W"], ly["A"].reshape(-1, in_dim)])
                fn, proj_us = beside, graph_us(projection, layers, a.reps)
                rows.append({"case": case, "group": group, "variant": "proj", "us": proj_us})
                print(f"{case:>6} {group:8} {'proj':10} {proj_us:7.2f} us", flush=True)
            ref = None
            for name, env in envs.items():
                run = stacked if name == "gemm" else fn
                with environment(env):
                    us = graph_us(run, layers, a.reps)
                    t = run(layers[0]).float()
                    if a.beside and case == a.cases[-1]:
                        resources[f"{group} {name}"] = kernel_resources(run, layers[0])
                if name == "gemm":  # each row's own slot's columns, as a [1, T, slices*R] t
                    pool = layers[0]["A"]
                    t = own_slot_columns(t[:, -pool.shape[0] * pool.shape[1]:],
                                         layers[0]["info"], pool.shape[1])
                ref = t if ref is None else ref
                err = (t[0] - ref[0]).abs().max().item()  # the summed split (presum)
                rows.append({"case": case, "group": group, "variant": name, "us": us,
                             "over_proj_us": us - proj_us, "a_bytes": nbytes,
                             "tb_per_s": nbytes / us / 1e6, "max_diff_vs_first": err})
                extra = f"  +{us - proj_us:6.2f} over proj" if a.beside else ""
                print(f"{case:>6} {group:8} {name:10} {us:7.2f} us  "
                      f"{nbytes / us / 1e6:5.2f} TB/s of A  diff {err:.2e}{extra}", flush=True)
            del layers
            torch.cuda.empty_cache()
    if a.out and rows:
        write_kernel_rows(a.out, a.shape, a.rank, a.layers, rows)
    if a.out and resources:
        a.out.with_suffix(".resources.json").write_text(json.dumps(resources, indent=1))
        for key, kernels in resources.items():
            for kernel, launch in kernels.items():
                print(f"{key:18} {kernel[:40]:40} {launch}")


if __name__ == "__main__":
    main()
