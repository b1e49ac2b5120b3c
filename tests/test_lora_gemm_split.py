"""o's and down's stacked LoRA GEMM over slices of K in folding decode graphs
(LORASERVE_DECODE_GEMM_LORA_SPLIT): the GEMM leaves fp32 partials of the projection and of
every slot's t; add+RMSNorm sums both and adds the delta (CPU tensors under TRITON_INTERPRET=1;
the decode graphs on CUDA are in tests/test_graphs_gpu.py)."""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.lora import LoraFold, fold_rows_t, linear_lora_fold
from ops.triton_decode_gemm import lora_gemm_splits, lora_split_plan
from ops.triton_rmsnorm import add_rmsnorm_partials_triton, add_rmsnorm_triton
from tests.test_lora_fold import DEVICE, EPS, TOKEN_SLOTS, make_fold, stack_case, stacked, tol

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_setting(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", raising=False)
    assert lora_gemm_splits() == 4
    for raw, want in (("2", 2), ("4", 4), ("1", 0), ("0", 0)):
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", raw)
        assert lora_gemm_splits() == want
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", "-1")
    with pytest.raises(ValueError, match="LORASERVE_DECODE_GEMM_LORA_SPLIT"):
        lora_gemm_splits()


def test_split_plan(monkeypatch) -> None:
    """Llama-3.1-8B's o (K 4096) and down (K 14336) stacks at batch 32 in bf16 on 132
    multiprocessors (CPU tensors count as an H200's). An 8-slot pool's (4096 + 8 x 16 rows):
    2 slices at the default tiling, 132 programs of 64 rows. A 32-slot pool's (4608 rows) would
    make 144 over 2 slices there (one program a multiprocessor: a second wave); 3 slices of
    128 rows make 108, the busiest multiprocessor streaming 128 x 11 x 128 of the weight
    against 64 x 4096 unsplit. Slices at most LORASERVE_DECODE_GEMM_LORA_SPLIT;
    LORASERVE_DECODE_GEMM_LORA_TILE the one split tiling."""
    from ops.triton_decode_gemm import (
        WIDE_LORA_TILING,
        gemm_tiling,
        lora_split_tiling,
        resident_programs,
        sm_share,
    )

    for name in ("LORASERVE_DECODE_GEMM_LORA_SPLIT", "LORASERVE_DECODE_GEMM_LORA_TILE"):
        monkeypatch.delenv(name, raising=False)
    x = torch.empty(32, 4096, dtype=torch.bfloat16)
    assert resident_programs(gemm_tiling(None), 32, 2) == 1
    assert resident_programs(gemm_tiling("64:128:0:4:4"), 32, 2) == 2
    assert resident_programs(gemm_tiling(WIDE_LORA_TILING), 32, 2) == 1
    for k in (4096, 14336):
        assert lora_split_plan(4096 + 8 * 16, k, x) == (None, 2)
        assert lora_split_plan(4096 + 32 * 16, k, x) == (WIDE_LORA_TILING, 3)
        assert lora_split_plan(4096 + 16 * 16, k, x) == (WIDE_LORA_TILING, 3)
    wide = gemm_tiling(WIDE_LORA_TILING)
    assert sm_share(4608, 4096, 3, wide, 132) == 128 * 11 * 128
    assert sm_share(4608, 4096, 1, gemm_tiling(None), 132) == 64 * 4096
    assert sm_share(4608, 4096, 2, gemm_tiling(None), 132) == 2 * 64 * 2048  # two a busy SM
    # a stack the kernel cannot take (K of 200): unsplit; a small one: the most slices
    assert lora_split_plan(4096, 200, x) == (None, 0)
    assert lora_split_plan(64, 4096, x, "64:256:0:4:4") == ("64:256:0:4:4", 4)
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", "2")
    assert lora_split_plan(4096 + 32 * 16, 4096, x) == (None, 0)  # 3 slices needed
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", "1")
    assert lora_split_plan(4096 + 8 * 16, 4096, x) == (None, 0)
    monkeypatch.delenv("LORASERVE_DECODE_GEMM_LORA_SPLIT")
    assert lora_split_tiling() is None
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_TILE", "64:128:0:4:4")
    assert lora_split_tiling() == "64:128:0:4:4"
    # two programs a multiprocessor at that tiling: the 32-slot pool's 216 over 3 slices fit
    # (the busiest SM holds two of 64 x 11 steps), 4 slices' 288 do not
    assert lora_split_plan(4096 + 32 * 16, 4096, x) == ("64:128:0:4:4", 3)
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_TILE", "64:100:0:4:4")
    with pytest.raises(ValueError, match="BLOCK_K"):
        lora_split_tiling()


def split_stack_output(fold: LoraFold, n: int, seed: int) -> tuple[torch.Tensor, LoraFold]:
    """A split stacked GEMM's output as the norm gets it: x's partials [S, T, n] and the
    stacked fold's t [S, T, slots * n*R], both views of one fp32 [S, T, n + slots * n*R]."""
    st = stacked(fold)
    splits, rows, cols = st.t.shape
    g = torch.Generator().manual_seed(seed)
    y_all = torch.empty(splits, rows, n + cols, device=DEVICE)
    y_all[:, :, :n] = torch.randn(splits, rows, n, generator=g).to(DEVICE)
    y_all[:, :, n:] = st.t
    return y_all[:, :, :n], dataclasses.replace(st, t=y_all[:, :, n:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [2, 3])
def test_add_rmsnorm_sums_partials_and_folds(dtype, splits) -> None:
    """add+RMSNorm over the partials of a split stacked GEMM (strided views of its output)
    with the fold over their t: the bits of the kernel given the partials' sum rounded to the
    stream's dtype and the same fold, for 2 splits (whose fp32 sum has one order); within a
    rounding step for 3. Rows of 3000 take the fold kernel's parts, the last partial."""
    n = 3000
    fold = make_fold(TOKEN_SLOTS, [n], dtype, splits)
    x, fold = split_stack_output(fold, n, seed=splits)
    g = torch.Generator().manual_seed(11)
    residual = torch.randn(len(TOKEN_SLOTS), n, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).to(DEVICE)
    got, got_s = add_rmsnorm_partials_triton(x, residual, w, EPS, fold=fold)
    want, want_s = add_rmsnorm_triton(x.sum(0).to(dtype), residual, w, EPS, fold=fold)
    if splits == 2:
        assert torch.equal(got_s, want_s) and torch.equal(got, want)
    torch.testing.assert_close(got_s, want_s, **tol(dtype))
    torch.testing.assert_close(got, want, **tol(dtype))
    # the torch path of a norm that does not fuse: the partials summed, the plain expand
    from ops.lora import apply_fold

    plain_s = apply_fold(x.sum(0).to(dtype), fold) + residual
    torch.testing.assert_close(got_s, plain_s, **tol(dtype))
    with pytest.raises(ValueError, match="does not fit"):
        add_rmsnorm_partials_triton(x[:, :, :64], residual[:, :64], w[:64], EPS, fold=fold)


def test_norm_module_takes_partials_with_a_fold(monkeypatch, triton_on_cpu) -> None:
    """RMSNorm.add_forward with partials and a fold: the fused kernel where the norm fuses,
    else the partials' sum with the plain expand; the two agree."""
    from runtime.model import llama

    n, dtype = 96, torch.float32
    fold = make_fold(TOKEN_SLOTS, [n], dtype, 2)
    x, fold = split_stack_output(fold, n, seed=4)
    residual = torch.randn(len(TOKEN_SLOTS), n).to(DEVICE)
    norm = llama.RMSNorm(n, EPS).to(DEVICE)
    monkeypatch.setattr(llama, "runs_fused", lambda m, t: True)
    fused = norm.add_forward(x, residual, fold)
    monkeypatch.setattr(llama, "runs_fused", lambda m, t: False)
    plain = norm.add_forward(x, residual, fold)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **tol(dtype))


def test_linear_fold_keeps_a_split_stack_gemms_partials() -> None:
    """linear_lora_fold whose stack_mm returns split-K partials: base(x) as its partials
    [S, T, N] (summing to x W^T) and a stacked fold whose t keeps the S splits (summing to
    each slot's x A^T); the plain expand's t is their sum in B's dtype."""
    fold, A, W, x, stack = stack_case()
    widths = [32, 16]

    def split_mm(v, w):  # two slices of K, fp32 partials, as the decode GEMM leaves them
        return torch.stack([v[:, :32] @ w[:, :32].T, v[:, 32:] @ w[:, 32:].T])

    y, f = linear_lora_fold(x, lambda v: v @ W.T, A, fold.B, fold.slice_offsets,
                            fold.scalings, fold.info, fold.row_slots, stack=stack,
                            stack_mm=split_mm)
    assert y.shape == (2, len(TOKEN_SLOTS), sum(widths))
    torch.testing.assert_close(y.sum(0), x @ W.T)
    assert f.t.shape == (2, len(TOKEN_SLOTS), 3 * 32) and f.t_slot_stride == 32
    for s in range(3):
        torch.testing.assert_close(f.t.sum(0)[:, s * 32:(s + 1) * 32], x @ A[s].T)
    f.check(y[0])
    rows_t = fold_rows_t(f)
    assert rows_t.shape == (1, len(TOKEN_SLOTS), 32)
    for m, slot in enumerate(f.row_slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(rows_t[0, m], x[m] @ A[slot].T)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_with_split_stacks_matches_unsplit(arch, tmp_path, monkeypatch,
                                                  triton_on_cpu) -> None:
    """A served mixed batch (base rows and two adapters on every projection) whose decode
    forwards fold every group over the pool's stacks on the decode GEMM (the interpreter; PDL
    resolved as in a decode graph): with o's and down's stacked GEMMs over 2 or 3 slices of K,
    each decode forward's logits match the unsplit forward's and the greedy tokens are the
    same; the last layer's down partials reach the final norm summed."""
    from ops.lora import capture_paths, stack_paths
    from runtime.model import llama
    from tests.engine_utils import greedy, make_engine, run, run_batch
    from tests.models import prompts, read_vocab
    from tests.test_lora_fold import model_with_two_adapters

    model, specs = model_with_two_adapters(tmp_path, arch)
    ps = prompts(4, read_vocab(model), seed=5, lo=3, hi=12)
    loras = [None, "a0", "a1", "a1"]
    launches = []
    plain = llama.decode_gemm

    def spy(x, w, b=None, pdl=False, split=1, tiling=None):
        launches.append((w.shape[0], split, tiling))
        return plain(x, w, b, split=split, tiling=tiling)  # the interpreter: no PDL

    monkeypatch.setattr(llama, "decode_gemm", spy)
    monkeypatch.setattr(llama, "runs_fused", lambda m, x: m.use_fused)
    monkeypatch.setattr(llama, "pdl_resolve", lambda pdl, t: True)
    monkeypatch.setenv("LORASERVE_LORA_FOLD", "qkv,o,gate_up,down")
    monkeypatch.setenv("LORASERVE_LORA_STACK", "1")
    monkeypatch.setenv("LORASERVE_DECODE_GEMV", "0")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM", "32")
    monkeypatch.setenv("LORASERVE_DECODE_GEMM_TILE", "16:16:32:4:2")
    monkeypatch.setenv("LORASERVE_DECODE_GATE_UP", "0")
    forward = llama.CausalLM.forward
    # unsplit; in 2 slices; in 3 at a tiling of their own, K's steps shared unevenly (llama
    # only: CI time)
    runs = ("0", "2", "3@16:16:0:4:2") if arch == "llama" else ("0", "2")
    logits: dict[str, list[torch.Tensor]] = {run: [] for run in runs}
    tokens = {}
    for split in runs:
        slices, _, tile = split.partition("@")
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_SPLIT", slices)
        monkeypatch.setenv("LORASERVE_DECODE_GEMM_LORA_TILE", tile)

        def patched(self, fb, kv_k, kv_v, split=split):
            with capture_paths(fold=fb.is_decode), stack_paths(fb.is_decode):
                out = forward(self, fb, kv_k, kv_v)
            if fb.is_decode:
                logits[split].append(out.clone())
            return out

        monkeypatch.setattr(llama.CausalLM, "forward", patched)
        launches.clear()
        engine = make_engine(model, lora_paths=specs, max_loras_per_batch=2,
                             max_running_requests=8)
        tokens[split] = run(run_batch(engine, ps, greedy(5), loras))
        o_rows = engine.model.layers[0].self_attn.o_proj.weight.shape[0]
        stack_rows = o_rows + 2 * 16  # the pool's 2 slots of max rank 16
        seen = {(s, t) for n, s, t in launches if n == stack_rows}
        want = {(1, None)} if slices == "0" else {(int(slices), tile or None)}
        if slices == "3":  # o's 4 steps of K: 3 slices take 2 steps as 2 do, so o takes 2
            want = {(2, tile), (3, tile)}
        assert seen == want, (split, seen)
    for split in runs[1:]:
        assert logits["0"] and len(logits["0"]) == len(logits[split])
        for a, b in zip(logits[split], logits["0"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert tokens[split] == tokens["0"]
