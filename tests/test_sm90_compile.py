"""Kernels compiled for the H200 (CUDA sm_90) on the CPU: Triton's front end and ptxas run without
a GPU, and they reject code the interpreter runs happily (a name bound to tiles of different
shapes in the two branches of an `if`, say). Each case compiles in a fresh process, without
TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMPILE = r"""
import importlib, json, sys
from benchmarks.sass_stats import compile_for_sm90
module, kernel, ptrs, constexprs, *aligned = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
k = compile_for_sm90(fn, ptrs, constexprs, aligned[0] if aligned else ())
print(json.dumps({"cubin": len(k.asm["cubin"]), "shared": k.metadata.shared}))
"""

ROWS_PTRS = {"t_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "scalings_ptr": "*fp32",
             "indptr_ptr": "*i32", "slots_ptr": "*i32", "ranks_ptr": "*i32", "live_ptr": "*i32"}


def _rows(block_n: int, block_r: int, r_chunk: int, pdl: bool) -> dict:
    return {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_R": block_r, "R_CHUNK": r_chunk,
            "BLOCK_E": 64, "SPLIT_BLOCK": 8, "GATHER_SPLIT_BLOCK": 8, "DOT_PRECISION": "tf32",
            "USE_PDL": pdl, "HAS_LIVE": True}


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


def run_without_interpreter(script: str, arg, **env_extra: str):
    """Run `script` in a fresh process from the checkout, without TRITON_INTERPRET (and with
    `env_extra` set), the JSON of `arg` its argv[1]; returns its last line of output as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _compile(case: list) -> dict:
    return run_without_interpreter(COMPILE, case)


needs_backend = pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its CUDA backend")


@needs_backend
@pytest.mark.parametrize(
    ("block_n", "block_r", "r_chunk", "pdl"),
    [(32, 16, 16, False), (128, 64, 4, True)],  # decode at rank 16; a wide tile, rank 64, PDL
)
def test_rows_expand_compiles_for_sm90(block_n: int, block_r: int, r_chunk: int, pdl: bool):
    case = ["ops.triton_lora_expand", "_lora_expand_rows_kernel", ROWS_PTRS,
            _rows(block_n, block_r, r_chunk, pdl)]
    assert _compile(case)["cubin"] > 0


# The KV tile load's index arithmetic (ops/triton_attention_tiles.py load_kv_tile): the lean
# form (clamped positions), lean with masked loads, the clamped form's 64-bit offsets for caches
# of 2**31 elements or more, the signed default.
INDEX_FORMS = {"lean": {"LEAN": 2, "WIDE": False}, "masked": {"LEAN": 1, "WIDE": False},
               "wide": {"LEAN": 2, "WIDE": True}, "signed": {"LEAN": 0, "WIDE": False}}


@needs_backend
@pytest.mark.parametrize(("dtype", "group", "pdl", "index"),
                         [("bf16", 4, False, "lean"), ("bf16", 4, True, "lean"),
                          ("fp32", 4, False, "lean"), ("bf16", 7, False, "lean"),
                          ("bf16", 1, False, "lean"), ("bf16", 4, True, "masked"),
                          ("bf16", 4, True, "wide"), ("bf16", 4, True, "signed")])
def test_merged_decode_attention_compiles_for_sm90(dtype: str, group: int, pdl: bool,
                                                   index: str):
    """Decode attention with its in-kernel merge (the atomic arrival count): Llama-3.1-8B's
    groups of 4 query heads, Qwen2.5-7B's of 7, and one; with programmatic dependent launch
    (decode graphs) and without; each form of the KV tile load's index arithmetic."""
    ptrs = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
            "block_tables_ptr": "*i32", "kv_lens_ptr": "*i32", "o_ptr": f"*{dtype}",
            "partial_o_ptr": "*fp32", "partial_lse_ptr": "*fp32", "count_ptr": "*i32",
            "scale_log2": "fp32"}
    block_g = 1 << (group - 1).bit_length()
    consts = {"GROUP": group, "BLOCK_H": 16, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_N": 64,
              "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_G": block_g,
              "BLOCK_S": 64, "SPLIT_CHUNK": max(2, 64 // block_g), "USE_PDL": pdl,
              "IDLE_EXIT": index != "wide", **INDEX_FORMS[index], "ROPE": False, "PARTS": 1,
              "QK_NORM": False}
    case = ["ops.triton_decode_attention", "_decode_attention_kernel", ptrs, consts]
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize(("parts", "qk_norm", "pdl"), [(1, False, True), (2, True, True),
                                                       (1, True, False)])
def test_rope_decode_attention_compiles_for_sm90(parts: int, qk_norm: bool, pdl: bool):
    """Decode attention with the rotary kernel's work inside (LORASERVE_DECODE_ATTN_ROPE=1) at
    Llama-3.1-8B's heads in bf16: q/k/v as qkv's output or its fp32 split-K partials, Qwen3's
    q/k norms, with PDL as decode graphs launch it and without."""
    from benchmarks.sass_stats import ROPE_PTRS

    src = "fp32" if parts > 1 else "bf16"
    ptrs = {"q_ptr": f"*{src}", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "block_tables_ptr": "*i32", "kv_lens_ptr": "*i32", "o_ptr": "*bf16",
            "partial_o_ptr": "*fp32", "partial_lse_ptr": "*fp32", "count_ptr": "*i32",
            "scale_log2": "fp32", **ROPE_PTRS, "k_new_ptr": f"*{src}", "v_new_ptr": f"*{src}"}
    consts = {"GROUP": 4, "BLOCK_H": 16, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_N": 64,
              "INPUT_PRECISION": "tf32", "BLOCK_G": 4, "BLOCK_S": 64, "SPLIT_CHUNK": 16,
              "USE_PDL": pdl, "IDLE_EXIT": True, **INDEX_FORMS["lean"], "ROPE": True,
              "PARTS": parts, "QK_NORM": qk_norm}
    case = ["ops.triton_decode_attention", "_decode_attention_kernel", ptrs, consts]
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize("index", sorted(INDEX_FORMS))
def test_prefill_attention_compiles_for_sm90(index: str):
    """Prefill attention over its tile table at Llama-3.1-8B's heads in bf16, each form of the
    KV tile load's index arithmetic."""
    ptrs = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "block_tables_ptr": "*i32", "cu_q_lens_ptr": "*i32", "kv_lens_ptr": "*i32",
            "o_ptr": "*bf16", "tile_table_ptr": "*i32", "scale_log2": "fp32"}
    consts = {"GROUP": 4, "HEAD_DIM": 128, "PAGE_SIZE": 16, "BLOCK_M": 64, "BLOCK_N": 64,
              "INPUT_PRECISION": "tf32", "TILE_BITS": 16, "USE_TABLE": True,
              **INDEX_FORMS[index]}
    case = ["ops.triton_prefill_attention", "_prefill_attention_kernel", ptrs, consts]
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize("splits", [2, 4])
def test_add_rmsnorm_over_splitk_partials_compiles_for_sm90(splits: int):
    """add+RMSNorm summing a projection's fp32 split-K partials (ops/splitk.py,
    LORASERVE_DECODE_SPLITK) at Llama-3.1-8B's hidden size, with PDL as decode graphs launch
    it."""
    ptrs = {"x_ptr": "*fp32", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
            "res_out_ptr": "*bf16", "eps": "fp32"}
    consts = {"HAS_RESIDUAL": True, "BLOCK": 4096, "USE_PDL": True, "X_SPLITS": splits}
    assert _compile(["ops.triton_rmsnorm", "_rmsnorm_kernel", ptrs, consts])["cubin"] > 0


@needs_backend
@pytest.mark.parametrize("case", [
    ["ops.triton_host_write", "_host_write_kernel", {"src": "*i32", "dst": "*i32"},
     {"BLOCK": 64}],
    ["ops.triton_host_write", "_host_write_kernel", {"src": "*u8", "dst": "*u8"},
     {"BLOCK": 1024}],
    ["ops.triton_graph_inputs", "_graph_inputs_kernel",
     {**{n: "*i64" for n in ("ids_src", "pos_src", "slot_src", "pending_src", "prev_tokens",
                             "ids_dst", "pos_dst", "slot_dst")},
      **{n: "*i32" for n in ("kvl_src", "bt_src", "kvl_dst", "bt_dst")}}, {"BLOCK_W": 128}],
    ["benchmarks.graph_gap", "_gap_pred_kernel", {"x": "*fp32", "host": "*fp32"},
     {"WRITE_HOST": True, "BLOCK": 64}],
    ["benchmarks.graph_gap", "_gap_node_kernel", {"y": "*fp32"}, {"BLOCK": 64, "USE_PDL": True}],
], ids=["host_write_words", "host_write_bytes", "graph_inputs", "graph_gap_pred",
        "graph_gap_node_pdl"])
def test_step_edge_kernels_compile_for_sm90(case: list):
    """The kernels at a decode step's edges: the results written into host memory (words and
    bytes), the graph's inputs from host memory, graph_gap's kernel ahead of a graph and its
    graph's kernel with PDL."""
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize(("block_n", "block_k", "rows", "even", "lora"),
                         [(4, 4096, 1, True, False), (1, 16384, 1, False, False),
                          (4, 4096, 8, True, False), (4, 4096, 1, True, True),
                          (1, 16384, 2, False, True)])
def test_decode_gemv_compiles_for_sm90(block_n: int, block_k: int, rows: int, even: bool,
                                       lora: bool):
    """ops/triton_decode_gemv.py at Llama-3.1-8B's tilings (qkv/o/gate_up: 4 rows of 4096;
    down: one of 14336, masked to 16384), with PDL as decode graphs launch it, with the LoRA
    shrink's programs and without."""
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
            "a_ptr": "*bf16", "slots_ptr": "*i32" if lora else "*bf16", "t_ptr": "*bf16"}
    consts = {"ROWS": rows, "BLOCK_N": block_n, "BLOCK_K": block_k, "HAS_BIAS": False,
              "HAS_LORA": lora, "USE_PDL": True, "EVEN_N": True, "EVEN_K": even}
    case = ["ops.triton_decode_gemv", "_decode_gemv_kernel", ptrs, consts]
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize(("mp", "block_n", "block_k", "pre_k", "y", "epilogue"),
                         [(32, 64, 256, 0, "bf16", ""), (16, 32, 256, 512, "fp32", ""),
                          (64, 128, 128, 0, "bf16", ""), (32, 128, 128, 0, "fp32", ""),
                          (32, 64, 128, 0, "bf16", "silu"),
                          (32, 64, 128, 0, "bf16", "silu+fold")])
def test_decode_gemm_compiles_for_sm90(mp: int, block_n: int, block_k: int, pre_k: int, y: str,
                                       epilogue: str):
    """ops/triton_decode_gemm.py with PDL as decode graphs launch it: batch 32 at the default
    tiling, split-K partials (fp32 out) with half a K slice ahead of the wait, 64 rows with
    none ahead, a LoRA stack's partials at WIDE_LORA_TILING's 128 rows; gate_up with SiLU*up
    in the epilogue at its default tiling, and with its LoRA folded in (t over 8 slices, rank
    16)."""
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": f"*{y}"}
    consts = {"MP": mp, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRE_K": pre_k,
              "HAS_BIAS": False, "USE_PDL": True, "EVEN_N": True, "PRECISION": "tf32",
              "STAGES": 4 if mp < 64 else 3, "SILU_MUL": "silu" in epilogue,
              "FOLD": "fold" in epilogue, "T_SPLITS": 8, "BLOCK_R": 16, "BLOCK_C": 64,
              "FOLD_STAGES": 4, "EVEN_R": True}
    if "fold" in epilogue:
        ptrs.update(t_ptr="*fp32", fb_ptr="*bf16", scal_ptr="*fp32", rslot_ptr="*i32")
    case = ["ops.triton_decode_gemm", "_decode_gemm_kernel", ptrs, consts]
    assert _compile(case)["cubin"] > 0


@needs_backend
@pytest.mark.parametrize("t_splits", [1, 2, 8])
def test_gate_up_fold_epilogue_fits_shared_memory(t_splits: int):
    """gate_up's one launch with its LoRA folded in at batch 32 over 8 slots of rank 16, its
    pointers and strides aligned as a launch specializes them (so both loops pipeline): the
    epilogue's stages (`fold_stages`) keep the kernel within the main loop's shared memory, so
    two programs still share a multiprocessor (8 slices of t at 4 stages asked 424 KB)."""
    from ops.triton_decode_gemm import (
        SMEM_PER_SM,
        fold_stages,
        gate_up_tiling,
        gemm_tiling,
        pipeline_smem,
        pipeline_stages,
    )
    tile = gemm_tiling(gate_up_tiling())
    block_n, block_k, pre_k, _, _ = tile
    stages = pipeline_stages(tile, 32, 2)
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
            "t_ptr": "*fp32", "fb_ptr": "*bf16", "scal_ptr": "*fp32", "rslot_ptr": "*i32"}
    consts = {"MP": 32, "BLOCK_N": block_n, "BLOCK_K": block_k, "PRE_K": pre_k,
              "HAS_BIAS": False, "USE_PDL": True, "EVEN_N": True, "PRECISION": "tf32",
              "STAGES": stages, "SILU_MUL": True, "FOLD": True, "T_SPLITS": t_splits,
              "BLOCK_R": 16, "BLOCK_C": 64, "EVEN_R": True,
              "FOLD_STAGES": fold_stages(tile, 32, 64, 2, 4, t_splits)}
    aligned = [n for n in ptrs] + ["stride_xm", "stride_wn", "stride_ym",
                                   "stride_tsplit", "stride_tm", "t_slot_stride", "stride_bs",
                                   "stride_bn"]
    main = pipeline_smem(tile, 32, 2)
    shared = _compile(["ops.triton_decode_gemm", "_decode_gemm_kernel", ptrs, consts,
                       aligned])["shared"]
    assert shared <= main and 2 * (shared + 1024) <= SMEM_PER_SM, (shared, main)


_FOLD_PTRS = {"t_ptr": "*fp32", "b_ptr": "*bf16", "scal_ptr": "*fp32", "rslot_ptr": "*i32"}
_FOLD_OFF = {"FOLD": False, "SPLITS": 1, "BLOCK_R": 16, "EVEN_R": True}
_LAYER_CASES = {
    "rope": ("ops.triton_rope_store_kv", "_rope_store_kv_kernel", {
        **{n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr",
                                "k_cache_ptr", "v_cache_ptr", "q_norm_ptr", "k_norm_ptr")},
        "slot_ptr": "*i64", "pos_ptr": "*i64", "eps": "fp32"},
        {"HEAD_DIM": 128, "HALF": 64, "BLOCK_HALF": 64, "QK_NORM": False, "PARTS": 1,
         "GATHER": True}),
    "rope_parts": ("ops.triton_rope_store_kv", "_rope_store_kv_kernel", {
        **{n: "*bf16" for n in ("cos_ptr", "sin_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr",
                                "q_norm_ptr", "k_norm_ptr")},
        **{n: "*fp32" for n in ("q_ptr", "k_ptr", "v_ptr")},
        "slot_ptr": "*i64", "pos_ptr": "*i64", "eps": "fp32"},
        {"HEAD_DIM": 128, "HALF": 64, "BLOCK_HALF": 64, "QK_NORM": True, "PARTS": 2,
         "GATHER": True}),
    "norm": ("ops.triton_rmsnorm", "_rmsnorm_kernel", {
        "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
        "res_out_ptr": "*bf16", "eps": "fp32"},
        {"HAS_RESIDUAL": True, "BLOCK": 4096, "X_SPLITS": 1}),
    "norm_fold": ("ops.triton_rmsnorm", "_add_rmsnorm_fold_kernel", {
        "x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
        "res_out_ptr": "*bf16", "sums_ptr": "*fp32", "count_ptr": "*i32", "eps": "fp32"},
        {"BLOCK": 4096, "COLS": 256, "PARTS": 16, "X_SPLITS": 1}),
    # o's or down's split stacked LoRA GEMM (LORASERVE_DECODE_GEMM_LORA_SPLIT): fp32 partials
    "norm_fold_partials": ("ops.triton_rmsnorm", "_add_rmsnorm_fold_kernel", {
        "x_ptr": "*fp32", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16",
        "res_out_ptr": "*bf16", "sums_ptr": "*fp32", "count_ptr": "*i32", "eps": "fp32"},
        {"BLOCK": 4096, "COLS": 256, "PARTS": 16, "X_SPLITS": 3}),
    "silu": ("ops.triton_silu_mul", "_silu_mul_kernel", {"gate_up_ptr": "*bf16",
                                                         "out_ptr": "*bf16"}, {"BLOCK": 1024}),
    "silu_fold": ("ops.triton_silu_mul", "_silu_mul_fold_kernel", {
        "gate_up_ptr": "*bf16", "out_ptr": "*bf16"}, {"BLOCK": 64, "GROUP": 8}),
}


@needs_backend
@pytest.mark.parametrize(("kernel", "fold"), [
    ("rope", False), ("rope", True), ("rope_parts", False), ("norm", False), ("norm_fold", False),
    ("norm_fold", True), ("norm_fold_partials", True), ("silu", False), ("silu_fold", False),
    ("silu_fold", True)])
def test_layer_kernels_with_pdl_compile_for_sm90(kernel: str, fold: bool):
    """The layer kernels with PDL as decode graphs launch them, with and without a LoRA fold
    where they take one."""
    module, name, ptrs, consts = _LAYER_CASES[kernel]
    fold_consts = {} if kernel in ("norm", "silu") else {**_FOLD_OFF, "FOLD": fold}
    consts = {**consts, **fold_consts, "USE_PDL": True}
    assert _compile([module, name, {**_FOLD_PTRS, **ptrs}, consts])["cubin"] > 0


LLAMA_8B_GROUPS = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]),
                   "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}
# (tokens, rows of each adapter, table padded to, chunk rows): decode graphs over 1 to 200
# adapters, a prefill graph, an eager prefill past the row-block expand's 512 tokens
STEPS_8B = [
    (1, [1], 1, 16), (32, [4] * 8, 32, 16), (32, [1] * 32, 32, 16), (256, [1] * 200, 256, 16),
    (512, [64] * 8, 512, 32), (4096, [512] * 8, None, 32),
]


@needs_backend
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records launch keys through the interpreter")
@pytest.mark.parametrize(("rank", "knobs"), [
    (16, {}), (64, {}),
    # the decode shrink's opt-in A/B variants
    (16, {"LORASERVE_SHRINK_EAGER": "1", "LORASERVE_SHRINK_FOLD_DECODE": "1",
          "LORASERVE_SHRINK_DECODE_BLOCK_K": "512"}),
    (16, {"LORASERVE_SHRINK_EAGER": "1", "LORASERVE_SHRINK_DECODE_BLOCK_K": "256"}),
], ids=["r16", "r64", "r16-eager-fold-k512", "r16-eager-k256"])
def test_llama_8b_lora_variants_compile_for_sm90(rank: int, knobs: dict, monkeypatch) -> None:
    """Every variant the LoRA, norm, SiLU*up and rotary kernels take at Llama-3.1-8B shapes in
    bf16 (decode graphs over 1 to 200 adapters, with their expands folded into the next
    kernels; prefill steps of 512 and 4096 tokens, the embedding and lm_head LoRA) compiles for
    sm_90 and spills nothing; so do the decode shrink's opt-in variants. The launches only
    record their keys (KeyLog(execute=False)): the shapes are too large to interpret."""
    import torch

    for name, value in knobs.items():
        monkeypatch.setenv(name, value)

    from ops.lora import (
        LoraFold,
        apply_lora_triton,
        build_lora_batch_info,
        lora_embed_shrink_triton,
        lora_row_slots,
    )
    from ops.triton_rmsnorm import add_rmsnorm_triton, rmsnorm_triton
    from ops.triton_rope_store_kv import rope_store_kv_triton
    from ops.triton_silu_mul import silu_mul_triton
    from tests.kernel_keys import KeyLog, compile_for_sm90

    bf16, slots_n = torch.bfloat16, 256
    ranks = torch.full((slots_n,), rank, dtype=torch.int32)
    bufs = {}
    for name, (in_dim, widths) in {**LLAMA_8B_GROUPS, "lm_head": (4096, [128256])}.items():
        n = len(widths)
        bufs[name] = (torch.empty(slots_n, n * rank, in_dim, dtype=bf16),
                      torch.empty(slots_n, sum(widths), rank, dtype=bf16),
                      torch.ones(slots_n, n), tuple(sum(widths[:i]) for i in range(n + 1)))
    a_emb = torch.empty(slots_n, 128256, rank, dtype=bf16)
    with KeyLog(execute=False) as log:
        for tokens, lengths, pad_to, chunk in STEPS_8B:
            token_slots = [s for s, n in enumerate(lengths) for _ in range(n)]
            info = build_lora_batch_info(token_slots, ranks, "csgmv", chunk, "cpu", pad_to=pad_to)
            x = torch.empty(tokens, 4096, dtype=bf16)
            add_rmsnorm_triton(x, torch.empty_like(x), torch.empty(4096, dtype=bf16), 1e-5)
            rmsnorm_triton(x, torch.empty(4096, dtype=bf16), 1e-5)
            silu_mul_triton(torch.empty(tokens, 2 * 14336, dtype=bf16))
            lora_embed_shrink_triton(torch.zeros(tokens, dtype=torch.int32), a_emb, info)
            for name, (in_dim, widths) in LLAMA_8B_GROUPS.items():
                A, B, scalings, offsets = bufs[name]
                apply_lora_triton(torch.empty(tokens, in_dim, dtype=bf16), A, B,
                                  torch.empty(tokens, sum(widths), dtype=bf16), offsets,
                                  scalings, info)
            rows = min(tokens, 64)  # the lm_head's rows: one a sequence, as decode tables
            logits_info = build_lora_batch_info(token_slots[:rows], ranks, "csgmv", 16, "cpu")
            A, B, scalings, offsets = bufs["lm_head"]
            apply_lora_triton(torch.empty(rows, 4096, dtype=bf16), A, B,
                              torch.empty(rows, 128256, dtype=bf16), offsets, scalings,
                              logits_info)
            if chunk == 16:  # decode graphs fold the expands into the next kernels
                _folded_consumers(tokens, info, lora_row_slots(info, tokens), bufs, LoraFold,
                                  add_rmsnorm_triton, silu_mul_triton, rope_store_kv_triton)
    keys = _with_layer_pdl(log.keys())
    assert {name for name, _ in keys} >= {"_lora_shrink_kernel", "_lora_expand_kernel",
                                         "_lora_expand_rows_kernel", "_lora_embed_shrink_kernel",
                                         "_rmsnorm_kernel", "_silu_mul_kernel",
                                         "_add_rmsnorm_fold_kernel", "_rope_store_kv_kernel"}
    compiled = compile_for_sm90(keys)
    failed = [c for c in compiled if "error" in c or c["local"] > 0]
    assert not failed, failed


LAYER_KERNELS = {"ops.triton_rmsnorm": ("_rmsnorm_kernel", "_add_rmsnorm_fold_kernel"),
                 "ops.triton_silu_mul": ("_silu_mul_kernel", "_silu_mul_fold_kernel"),
                 "ops.triton_rope_store_kv": ("_rope_store_kv_kernel",)}


def _with_layer_pdl(keys: set) -> set:
    """keys plus, for each layer kernel's key, the one decode graphs launch it with: USE_PDL
    and launch_pdl on (the CPU launches record them off)."""
    import importlib
    import inspect

    positions = {}
    for module, names in LAYER_KERNELS.items():
        for name in names:
            fn = getattr(importlib.import_module(module), name).fn
            positions[name] = list(inspect.signature(fn).parameters).index("USE_PDL")
    out = set(keys)
    for name, spec in keys:
        if name in positions:
            i = positions[name]
            assert spec[i] == ("constexpr", False), spec[i]
            pdl = [*spec[:i], ("constexpr", True), *spec[i + 1:]]
            pdl = [("launch_pdl", True) if p == ("launch_pdl", None) or p == ("launch_pdl", False)
                   else p for p in pdl]
            out.add((name, tuple(pdl)))
    return out


def _folded_consumers(tokens, info, row_slots, bufs, LoraFold, add_rmsnorm, silu_mul, rope_store):
    """Launch add+RMSNorm, SiLU*up and rotary+K/V store with a fold of o, gate_up and qkv, with
    one split of bf16 partials and with four of fp32."""
    import torch

    bf16 = torch.bfloat16
    for splits, dtype in ((1, bf16), (4, torch.float32)):
        def fold(name, splits=splits, dtype=dtype):
            A, B, scalings, offsets = bufs[name]
            t = torch.empty(splits, tokens, A.shape[1], dtype=dtype)
            return LoraFold(t, B, scalings, row_slots, offsets, info)

        x = torch.empty(tokens, 4096, dtype=bf16)
        add_rmsnorm(x, torch.empty_like(x), torch.empty(4096, dtype=bf16), 1e-5, fold=fold("o"))
        silu_mul(torch.empty(tokens, 2 * 14336, dtype=bf16), fold=fold("gate_up"))
        q, k, v = torch.empty(tokens, 6144, dtype=bf16).split([4096, 1024, 1024], dim=-1)
        cache = [torch.empty(64, 16, 8, 128, dtype=bf16) for _ in range(2)]
        cos_sin = [torch.empty(tokens, 128, dtype=bf16) for _ in range(2)]
        rope_store(q.view(tokens, 32, 128), k.view(tokens, 8, 128), v.view(tokens, 8, 128),
                   *cos_sin, *cache, torch.zeros(tokens, dtype=torch.int64), fold=fold("qkv"))


@needs_backend
def test_sass_stats_counts_the_attention_loops(tmp_path: Path):
    """benchmarks/sass_stats.py: decode attention's KV loop is found with its MMAs and block
    barriers; a narrower tile needs less shared memory; an unknown constexpr is refused; --ptx
    writes the kernel's PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")

    def stats(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "benchmarks.sass_stats", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600, check=False)

    wide, narrow, ptx = tmp_path / "wide.json", tmp_path / "narrow.json", tmp_path / "k.ptx"
    assert stats("--out", str(wide), "--ptx", str(ptx)).returncode == 0
    assert ".entry _decode_attention_kernel" in ptx.read_text()
    assert stats("--const", "BLOCK_N=32", "--warps", "2", "--out", str(narrow)).returncode == 0
    wide_s, narrow_s = json.loads(wide.read_text()), json.loads(narrow.read_text())
    kv_loop = max(wide_s["loops"], key=lambda loop: loop["mma"])
    assert kv_loop["mma"] > 0 and kv_loop["barriers"] > 0
    assert 0 < kv_loop["instructions"] < wide_s["instructions"]
    assert narrow_s["shared_bytes"] < wide_s["shared_bytes"]
    refused = stats("--const", "NO_SUCH=1")
    assert refused.returncode != 0 and "NO_SUCH" in refused.stderr


@needs_backend
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="records launch keys through the interpreter")
def test_rotation_rounds_each_product_as_launched() -> None:
    """The rotary kernel and decode attention's variant with the rotation inside
    (LORASERVE_DECODE_ATTN_ROPE), compiled for sm_90 with their launches' own options at
    Llama-3.1-8B's heads in bf16, round each product of the rotation: no bf16 FMA in their PTX.
    The same keys with FMA contraction on fuse a product into the sum, each kernel its own
    (their caches then differed in last bits on the H200): the check can fail."""
    import torch

    from ops.triton_decode_attention import decode_rope_attention_triton
    from ops.triton_rope_store_kv import rope_store_kv_triton
    from tests.kernel_keys import KeyLog, compile_for_sm90

    bf16, heads, kv_heads, d, page, batch = torch.bfloat16, 32, 8, 128, 16, 4
    qkv = torch.zeros(batch, (heads + 2 * kv_heads) * d, dtype=bf16)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(batch, heads, d), k.view(batch, kv_heads, d), v.view(batch, kv_heads, d)
    cos = sin = torch.zeros(64, d, dtype=bf16)
    k_cache, v_cache = (torch.zeros(16, page, kv_heads, d, dtype=bf16) for _ in range(2))
    positions, slots = torch.arange(batch), torch.arange(batch)
    tables = torch.arange(16, dtype=torch.int32).view(batch, 4)
    kv_lens = torch.full((batch,), 5, dtype=torch.int32)
    with KeyLog(execute=False) as log:
        rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots, positions=positions)
        decode_rope_attention_triton(q, k, v, cos, sin, positions, k_cache, v_cache, slots,
                                     tables, kv_lens, d ** -0.5)
    keys = log.keys()
    assert sorted(name for name, _ in keys) == ["_decode_attention_kernel",
                                                "_rope_store_kv_kernel"]
    assert all(("enable_fp_fusion", False) in spec for _, spec in keys), keys
    fused = {(name, tuple(("enable_fp_fusion", True) if p == ("enable_fp_fusion", False) else p
                          for p in spec)) for name, spec in keys}
    as_launched, with_fusion = compile_for_sm90(keys), compile_for_sm90(fused)
    assert [c.get("half_fma") for c in as_launched] == [0, 0], as_launched
    assert all(c.get("half_fma", 0) > 0 for c in with_fusion), with_fusion


DTYPE_FMAS = r"""
import json, re, sys
from benchmarks.sass_stats import compile_kernel, compile_tma_gemm
out = {}
for dtype in ("bf16", "fp16"):
    ptx = compile_kernel("rope", {}, 1, 3, True, dtype).asm["ptx"]
    out[dtype] = {t: len(re.findall(rf"fma\.rn\.{t}\b", ptx)) for t in ("bf16", "f16")}
    gemm = compile_tma_gemm(32, 512, 256, dtype=dtype).asm["ptx"]
    out[dtype]["gemm_mma"] = sorted(set(re.findall(r"wgmma\.\S*\.(bf16|f16)\b", gemm)))
print(json.dumps(out))
"""


@needs_backend
def test_sass_stats_compiles_either_16_bit_dtype() -> None:
    """benchmarks/sass_stats.py's --dtype: the rotary kernel with contraction on fuses float16
    products in fp16 and bfloat16 ones in bf16 (the fp16 reading in RESULTS' forty-fourth
    section needs it), and the Gluon GEMM's warpgroup MMAs take the dtype asked for."""
    found = run_without_interpreter(DTYPE_FMAS, None)
    assert found["bf16"]["bf16"] > 0 and found["bf16"]["f16"] == 0, found
    assert found["fp16"]["f16"] > 0 and found["fp16"]["bf16"] == 0, found
    assert found["bf16"]["gemm_mma"] == ["bf16"] and found["fp16"]["gemm_mma"] == ["f16"], found
