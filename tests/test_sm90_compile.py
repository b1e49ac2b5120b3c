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
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
module, kernel, ptrs, constexprs = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
names = list(fn.arg_names)
signature = {n: ptrs.get(n, "constexpr" if n in constexprs else "i32") for n in names}
consts = {(names.index(n),): v for n, v in constexprs.items()}
k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32))
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


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its CUDA backend")
@pytest.mark.parametrize(
    ("block_n", "block_r", "r_chunk", "pdl"),
    [(32, 16, 16, False), (128, 64, 4, True)],  # decode at rank 16; a wide tile, rank 64, PDL
)
def test_rows_expand_compiles_for_sm90(block_n: int, block_r: int, r_chunk: int, pdl: bool):
    case = ["ops.triton_lora_expand", "_lora_expand_rows_kernel", ROWS_PTRS,
            _rows(block_n, block_r, r_chunk, pdl)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(case)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["cubin"] > 0
