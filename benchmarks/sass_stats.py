"""The attention kernels compiled for the H200 (CUDA sm_90) on the CPU, counted by instruction.

Decode attention at batch 32 over a short context is bound by each warp's chain of instructions,
not by its bytes (benchmarks/RESULTS.md, thirty-seventh session), so what a change does to that
chain can be read before a device call: Triton's front end and ptxas run without a GPU. The
kernel is compiled as a launch specialises it (pointers and strides known multiples of 16) at
Llama-3.1-8B's heads in bf16 (`--dtype fp16`: float16), disassembled with the cuobjdump Triton
ships, and each loop (a backward branch) reported with its instruction count, block barriers
(BAR.SYNC) and MMAs (HMMA, or HGMMA for Hopper's warpgroup form). Run it without
TRITON_INTERPRET.

    python -m benchmarks.sass_stats --kernel decode
    python -m benchmarks.sass_stats --kernel decode --const BLOCK_N=32 --warps 2

`--kernel decode_gemm` compiles ops/triton_decode_gemm.py's decode GEMM as batch 32's qkv
launches it (pass --stages 4), and `--kernel tma_gemm` ops/gluon_decode_gemm.py's (its --const
names `compile_tma_gemm`'s arguments: rows, n, k, tiling, silu_mul, bias, partials).
`--kernel rope` compiles the rotary kernel (ops/triton_rope_store_kv.py) as a decode step
launches it (pass --warps 1). Each kernel compiles with FMA contraction as its launch asks
(`--fp-fusion 0/1` overrides), and the report counts the fp16/bf16 FMAs in its PTX.
`--dtype fp16` compiles any of them for a model served in float16, and `--ptx FILE` writes the
PTX that the FMAs were counted in:

    python -m benchmarks.sass_stats --kernel rope --warps 1 --fp-fusion 1
    python -m benchmarks.sass_stats --kernel rope --warps 1 --fp-fusion 1 --dtype fp16 --ptx r.ptx
    python -m benchmarks.sass_stats --kernel decode --const ROPE=true --const LEAN=2 --stages 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

# Decode attention's rotary arguments (decode_rope_attention_triton; --const ROPE=true)
ROPE_PTRS = {"k_new_ptr": "*bf16", "v_new_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
             "pos_ptr": "*i64", "slot_ptr": "*i64", "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16",
             "eps": "fp32"}
KERNELS = {
    "decode": ("ops.triton_decode_attention", "_decode_attention_kernel", {
        "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
        "block_tables_ptr": "*i32", "kv_lens_ptr": "*i32", "o_ptr": "*bf16",
        "partial_o_ptr": "*fp32", "partial_lse_ptr": "*fp32", "count_ptr": "*i32",
        "scale_log2": "fp32", **ROPE_PTRS}, {
        "GROUP": 4, "BLOCK_H": 16, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_N": 64,
        "INPUT_PRECISION": "tf32", "BLOCK_G": 4, "BLOCK_S": 64, "SPLIT_CHUNK": 16,
        "USE_PDL": True, "LEAN": 0, "WIDE": False,
        "IDLE_EXIT": True, "ROPE": False, "PARTS": 1, "QK_NORM": False}),
    "prefill": ("ops.triton_prefill_attention", "_prefill_attention_kernel", {
        "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
        "block_tables_ptr": "*i32", "cu_q_lens_ptr": "*i32", "kv_lens_ptr": "*i32",
        "o_ptr": "*bf16", "tile_table_ptr": "*i32", "scale_log2": "fp32"}, {
        "GROUP": 4, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_M": 64, "BLOCK_N": 64,
        "INPUT_PRECISION": "tf32", "TILE_BITS": 16, "USE_TABLE": True, "LEAN": 0,
        "WIDE": False}),
    # ops/triton_decode_gemm.py's kernel as batch 32's qkv launches it (64:256 tiles, MP 32)
    "decode_gemm": ("ops.triton_decode_gemm", "_decode_gemm_kernel", {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16"}, {
        "MP": 32, "BLOCK_N": 64, "BLOCK_K": 256, "PRE_K": 0, "HAS_BIAS": False,
        "USE_PDL": True, "EVEN_N": True, "PRECISION": "tf32", "STAGES": 4, "SILU_MUL": False,
        **{n: None for n in ("t_ptr", "fb_ptr", "scal_ptr", "rslot_ptr")},
        **{n: 0 for n in ("R", "stride_tsplit", "stride_tm", "t_slot_stride", "stride_bs",
                          "stride_bn", "stride_ss", "stride_si")},
        "NUM_SLOTS": 1, "FOLD": False, "T_SPLITS": 1, "BLOCK_R": 16, "BLOCK_C": 64,
        "FOLD_STAGES": 1, "EVEN_R": False}),
    # the rotary kernel as decode steps launch it: the whole tables read at each position
    "rope": ("ops.triton_rope_store_kv", "_rope_store_kv_kernel", {
        **{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr",
                                "k_cache_ptr", "v_cache_ptr", "q_norm_ptr", "k_norm_ptr",
                                "b_ptr")},
        "t_ptr": "*fp32", "scal_ptr": "*fp32", "rslot_ptr": "*i32", "slot_ptr": "*i64",
        "pos_ptr": "*i64", "eps": "fp32"}, {
        "HEAD_DIM": 128, "HALF": 64, "BLOCK_HALF": 64, "QK_NORM": False, "FOLD": False,
        "SPLITS": 1, "BLOCK_R": 16, "EVEN_R": True, "USE_PDL": True, "PARTS": 1,
        "GATHER": True}),
}
# the 16-bit dtypes a model is served in (--dtype), as Triton names them
DTYPES = ("bf16", "fp16")
# per-step arguments stay unspecialised at launch (the kernels' do_not_specialize)
_UNSPECIALISED = {"stride_table", "num_splits", "min_split"}


def _value(text: str) -> object:
    """A --const value: true/false, an integer, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def compile_for_sm90(fn, ptrs: dict, constexprs: dict, aligned=(), **options):
    """`fn` (a @triton.jit kernel) compiled for sm_90, as a launch would specialise it: `ptrs`
    the types of its pointers and float scalars (other arguments i32), `constexprs` its
    constexpr values, `aligned` the arguments known multiples of 16 (pointers, strides: the
    pipeline's loads are asynchronous copies only where their addresses are known aligned),
    `options` Triton's (num_warps, num_stages). Shared with tests/test_sm90_compile.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if fn.is_gluon():  # (a Gluon kernel's source builds its module itself)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    names = list(fn.arg_names)
    signature = {n: ptrs.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_tma_gemm(rows: int, n: int, k: int, tiling: str = "64:256:0:4:4",
                     silu_mul: bool = False, bias: bool = False, pdl: bool = True,
                     partials: bool = False, dtype: str = "bf16"):
    """ops/gluon_decode_gemm.py's kernel compiled for sm_90 as `tma_gemm_launch` would launch it
    for x [rows, k] in `dtype` (bf16 or fp16) and a weight of n rows (gate_up's 2 * inter with
    silu_mul), at the decode GEMM's `tiling` (its stages cut to fit as there); `partials`: y is
    a split's fp32 partials. Shared with tests/test_gluon_decode_gemm.py."""
    import torch
    from triton.runtime.jit import mangle_type

    from ops.gluon_decode_gemm import _descriptors, _tma_gemm_kernel, tma_stages
    from ops.sizes import next_pow2
    from ops.triton_decode_gemm import gemm_tiling, pipeline_stages

    tile = gemm_tiling(tiling)
    block_n, block_k, _, warps, _ = tile
    mp = max(16, next_pow2(rows))
    # meta tensors: the descriptors' types need shapes and dtypes, not memory
    _check_dtype(dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = torch.empty(rows, k, dtype=torch_dtype, device="meta")
    w = torch.empty(n, k, dtype=torch_dtype, device="meta")
    w_desc, x_desc = _descriptors(x, w, block_n // 2 if silu_mul else block_n, mp, block_k)
    stages = tma_stages(pipeline_stages(tile, mp, 2), block_n, block_k, mp, 2)
    consts = {"BLOCK_N": block_n, "STAGES": stages, "HAS_BIAS": bias,
              "USE_PDL": pdl, "SILU_MUL": silu_mul, "num_warps": warps}
    types = {"w_desc": mangle_type(w_desc), "x_desc": mangle_type(x_desc), "b_ptr": f"*{dtype}",
             "y_ptr": "*fp32" if partials else f"*{dtype}"}
    compiled = compile_for_sm90(_tma_gemm_kernel, types, consts,
                                ("b_ptr", "y_ptr", "stride_ys", "stride_ym"), num_warps=warps)
    compiled.stages = stages  # (for the report: a launch's stages are a constexpr)
    return compiled


def launch_fusion(kernel: str, consts: dict) -> bool:
    """Whether `kernel`'s launch at `consts` compiles with FMA contraction: the rotary kernel
    never, decode attention as ops/triton_decode_attention.py `fp_fusion` says."""
    from ops.triton_decode_attention import fp_fusion

    if kernel == "rope":
        return False
    return fp_fusion(bool(consts.get("ROPE"))) if kernel == "decode" else True


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")


def with_dtype(ptrs: dict, dtype: str) -> dict:
    """`ptrs` (the kernels' bf16 pointer types) with their bf16 tensors in `dtype`."""
    _check_dtype(dtype)
    return {n: f"*{dtype}" if t == "*bf16" else t for n, t in ptrs.items()}


def compile_kernel(kernel: str, consts: dict, warps: int, stages: int,
                   fusion: bool | None = None, dtype: str = "bf16"):
    """`kernel` compiled for sm_90 at its defaults overridden by `consts`, its activations,
    weights and caches in `dtype` (bf16 or fp16), with FMA contraction as its launch takes it
    (`launch_fusion`) unless `fusion` says."""
    import importlib

    module, name, ptrs, defaults = KERNELS[kernel]
    ptrs = with_dtype(ptrs, dtype)
    fn = getattr(importlib.import_module(module), name)
    names = list(fn.arg_names)
    consts = {**defaults, **consts}
    unknown = sorted(set(consts) - set(names))
    if unknown:
        raise ValueError(f"{name} takes no constexpr {', '.join(unknown)}")
    aligned = [n for n in names if n not in consts and n not in _UNSPECIALISED
               and (n.endswith("_ptr") or n.startswith("stride_"))]
    if fusion is None:
        fusion = launch_fusion(kernel, consts)
    return compile_for_sm90(fn, ptrs, consts, aligned, num_warps=warps, num_stages=stages,
                            enable_fp_fusion=fusion)


def half_fmas(ptx: str) -> int:
    """fp16/bf16 fused multiply-adds (packed ones too) in `ptx`."""
    return len(re.findall(r"fma\.rn\.(?:bf16|f16)", ptx))


def instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction in the cubin."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def loop_stats(ins: list[tuple[int, str]]) -> dict:
    """The total count and, for each loop (a backward branch), its instructions, block
    barriers and MMAs."""
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            ops = [_opcode(t) for a, t in ins if start <= a <= addr]
            loops.append({"start": hex(start), "end": hex(addr), "instructions": len(ops),
                          "barriers": ops.count("BAR"),
                          "mma": ops.count("HMMA") + ops.count("HGMMA")})
    return {"instructions": len(ins), "loops": loops}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=sorted(KERNELS) + ["tma_gemm"], default="decode",
                    help="tma_gemm: ops/gluon_decode_gemm.py's kernel, its --const names "
                         "compile_tma_gemm's arguments (rows, n, k, tiling, silu_mul, bias, "
                         "partials; default qkv at batch 32)")
    ap.add_argument("--const", action="append", default=[], metavar="NAME=VALUE",
                    help="a constexpr over the kernel's default here (repeatable)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--fp-fusion", type=int, choices=(0, 1),
                    help="FMA contraction off or on (default: as the kernel's launch takes it)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16",
                    help="the activations', weights' and caches' dtype (the served model's)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ptx", type=Path, help="also write the kernel's PTX here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    consts = {}
    for item in a.const:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--const takes NAME=VALUE, got {item!r}")
        consts[name] = _value(value)
    if a.kernel == "tma_gemm":
        kw = {"rows": 32, "n": 6144, "k": 4096, "dtype": a.dtype, **consts}
        try:
            compiled = compile_tma_gemm(**kw)
        except TypeError as e:
            ap.error(f"tma_gemm: {e}")
        a.warps, a.stages = compiled.metadata.num_warps, compiled.stages
    else:
        fusion = None if a.fp_fusion is None else bool(a.fp_fusion)
        compiled = compile_kernel(a.kernel, consts, a.warps, a.stages, fusion, a.dtype)
    shared = compiled.metadata.shared
    stats = {"kernel": a.kernel, "dtype": a.dtype, "consts": consts, "warps": a.warps,
             "stages": a.stages,
             "fp_fusion": compiled.metadata.enable_fp_fusion, "shared_bytes": shared,
             "ptx_half_fmas": half_fmas(compiled.asm["ptx"]),
             **loop_stats(instructions(compiled.asm["cubin"]))}
    print(f"{a.kernel} {a.dtype} {consts or 'defaults'}, {a.warps} warps, {a.stages} stages, FMA "
          f"contraction {'on' if stats['fp_fusion'] else 'off'}: {stats['instructions']} "
          f"instructions, {shared} B shared, {stats['ptx_half_fmas']} fp16/bf16 FMAs in the PTX")
    for loop in stats["loops"]:
        print(f"  loop {loop['start']}-{loop['end']}: {loop['instructions']} instructions, "
              f"{loop['barriers']} barriers, {loop['mma']} MMAs")
    if a.out:
        a.out.write_text(json.dumps(stats, indent=1))
    if a.ptx:
        a.ptx.write_text(compiled.asm["ptx"])
    return stats


if __name__ == "__main__":
    main()
