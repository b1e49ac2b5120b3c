"""LoRA expands folded into the next kernel (ops/triton_lora_fold.py): each consumer kernel with a
fold against the plain expand followed by the same kernel without one (CPU tensors under
TRITON_INTERPRET=1 at small shapes; bf16 at Llama-3.1-8B shapes on CUDA), and a decode forward
with every group folded against the same forward with its expands."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.lora import (
    LoraFold,
    build_lora_batch_info,
    capture_paths,
    fold_groups,
    folds_lora,
    lora_expand_torch,
    lora_row_slots,
    stack_paths,
    stack_wins,
    stacks_lora,
)
from ops.triton_rmsnorm import add_rmsnorm_triton
from ops.triton_rope_store_kv import rope_store_kv_triton
from ops.triton_silu_mul import silu_mul_triton

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# base rows, three adapters (one of them rank 8 of the pool's 16), rows of one adapter together
TOKEN_SLOTS = [-1, 2, 2, 0, -1, -1, 1, 1, 1, -1]


def tol(dtype: torch.dtype) -> dict:
    """A rounding step of the dtype: the delta's fp32 sum runs in another order."""
    return {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
            torch.float16: {"rtol": 2e-3, "atol": 2e-3},
            torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}[dtype]


def make_fold(slots: list[int], widths: list[int], dtype: torch.dtype, splits: int,
              rank_pad: int = 16, num_slots: int = 3, device: str = DEVICE) -> LoraFold:
    """A fold over output slices of `widths` as the pool and the shrink leave it: B zero past
    each slot's rank (slot 1: rank 8, the others rank_pad), t's split-K partials (fp32 when
    split), base rows' t garbage (NaN)."""
    g = torch.Generator().manual_seed(0)
    n = len(widths)
    ranks = torch.tensor([8 if s == 1 else rank_pad for s in range(num_slots)], dtype=torch.int32)
    B = torch.randn(num_slots, sum(widths), rank_pad, generator=g) * 0.2
    for s, r in enumerate(ranks.tolist()):
        B[s, :, r:] = 0
    t = torch.randn(splits, len(slots), n * rank_pad, generator=g)
    base = torch.tensor(slots) < 0
    t[:, base] = float("nan")
    scalings = torch.rand(num_slots, n, generator=g) + 0.5
    info = build_lora_batch_info(slots, ranks.to(device), "csgmv", 16, device)
    offsets = tuple(int(x) for x in torch.tensor([0, *widths]).cumsum(0))
    t = t.to(dtype if splits == 1 else torch.float32).to(device)
    return LoraFold(t, B.to(dtype).to(device), scalings.to(device),
                    lora_row_slots(info, len(slots)), offsets, info)


def expanded(y: torch.Tensor, fold: LoraFold) -> torch.Tensor:
    """y plus the fold's delta by the torch expand (base rows untouched)."""
    out = y.clone()
    t = torch.nan_to_num(fold.t.float().sum(0), nan=0.0)  # base rows' t is never read
    lora_expand_torch(t, fold.B, out, fold.slice_offsets, fold.scalings, fold.info)
    return out


def test_row_slots_follow_the_segment_table() -> None:
    info = build_lora_batch_info(TOKEN_SLOTS, torch.tensor([16, 8, 16], dtype=torch.int32),
                                 "csgmv", 16, "cpu", pad_to=16)
    assert lora_row_slots(info, 10).tolist() == TOKEN_SLOTS
    # rows past the table (a graph bucket's padding) are base rows
    assert lora_row_slots(info, 13).tolist() == TOKEN_SLOTS + [-1, -1, -1]


def test_fold_groups_read_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("LORASERVE_LORA_FOLD", raising=False)
    assert fold_groups() == {"qkv", "o", "gate_up", "down"}
    monkeypatch.setenv("LORASERVE_LORA_FOLD", "gate_up, down")
    assert fold_groups() == {"gate_up", "down"}
    monkeypatch.setenv("LORASERVE_LORA_FOLD", "0")
    assert fold_groups() == frozenset()
    monkeypatch.setenv("LORASERVE_LORA_FOLD", "qkv,mlp")
    with pytest.raises(ValueError, match="mlp"):
        fold_groups()


def test_folds_only_inside_decode_captures(monkeypatch) -> None:
    import ops.dispatch

    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    x = torch.zeros(2, 4)
    assert not folds_lora(x)
    with capture_paths(fold=True):
        assert folds_lora(x) == fold_groups()
        with capture_paths(fold=False):  # a prefill capture nested inside keeps its expands
            assert not folds_lora(x)
        assert folds_lora(x)
    assert not folds_lora(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_add_rmsnorm_fold(dtype, splits) -> None:
    """The fold kernel cuts rows of 3000 into parts of 256, the last one partial; the row's
    last part normalises it. A second launch gives the same bits (the arrival counts are
    reset, and the parts' sums are added in a fixed order)."""
    n = 3000
    fold = make_fold(TOKEN_SLOTS, [n], dtype, splits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(TOKEN_SLOTS), n, generator=g).to(dtype).to(DEVICE)
    residual = torch.randn(len(TOKEN_SLOTS), n, generator=g).to(dtype).to(DEVICE)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).to(DEVICE)
    want, want_s = add_rmsnorm_triton(expanded(x, fold), residual, w, EPS)
    x_before = x.clone()
    got, got_s = add_rmsnorm_triton(x, residual.clone(), w, EPS, fold=fold)
    torch.testing.assert_close(got_s, want_s, **tol(dtype))
    torch.testing.assert_close(got, want, **tol(dtype))
    assert torch.equal(x, x_before)  # the projection's output itself is left as it was
    # base rows get no delta: their sums are the plain kernel's bits (their norms are not:
    # the fold kernel sums the squares chunk by chunk, in another order)
    base = torch.tensor(TOKEN_SLOTS) < 0
    assert torch.equal(got_s[base], want_s[base])
    again, again_s = add_rmsnorm_triton(x, residual.clone(), w, EPS, fold=fold)
    assert torch.equal(again, got) and torch.equal(again_s, got_s)


def test_add_rmsnorm_fold_in_place_on_residual() -> None:
    n = 64
    fold = make_fold(TOKEN_SLOTS, [n], torch.float32, 2)
    x = torch.randn(len(TOKEN_SLOTS), n, device=DEVICE)
    residual = torch.randn(len(TOKEN_SLOTS), n, device=DEVICE)
    w = torch.ones(n, device=DEVICE)
    want, want_s = add_rmsnorm_triton(expanded(x, fold), residual, w, EPS)
    got, got_s = add_rmsnorm_triton(x, residual, w, EPS, residual_out=residual, fold=fold)
    assert got_s is residual
    torch.testing.assert_close(got_s, want_s, **tol(torch.float32))
    torch.testing.assert_close(got, want, **tol(torch.float32))


def test_add_rmsnorm_fold_scratch_only_grows(monkeypatch) -> None:
    """The fold's scratch (partial sums, arrival counts) is reused while it is large enough and
    replaced when a launch needs more rows, the outgrown one kept alive (captured graphs may
    still point at it); every count is back at zero after a launch. (A scratch of its own:
    earlier tests may have grown the shared one past what this test launches.)"""
    import ops.triton_rmsnorm as rms

    monkeypatch.setattr(rms, "_fold_scratch", {})
    monkeypatch.setattr(rms, "_fold_scratch_outgrown", [])

    def launch(rows: int) -> torch.device:
        slots = (TOKEN_SLOTS * 4)[:rows]
        fold = make_fold(slots, [64], torch.float32, 1)
        x = torch.randn(rows, 64, device=DEVICE)
        add_rmsnorm_triton(x, torch.randn_like(x), torch.ones(64, device=DEVICE), EPS,
                           fold=fold)
        return x.device  # "cuda:0", as the scratch is keyed, not "cuda"

    device = launch(5)
    key = (device, torch.cuda.current_stream().stream_id if DEVICE == "cuda" else 0)
    first = rms._fold_scratch[key]
    launch(3)
    assert rms._fold_scratch[key] is first
    outgrown = len(rms._fold_scratch_outgrown)
    launch(first[1].shape[0] + 1)
    _, counts = rms._fold_scratch[key]
    assert counts.shape[0] > first[1].shape[0] and rms._fold_scratch_outgrown[outgrown] is first
    assert not counts.any() and not first[1].any()


def test_fold_partials_are_summed_beside_the_projection(monkeypatch) -> None:
    """linear_lora_fold hands its consumers the shrink's split-K partials summed into one
    split (unless LORASERVE_FOLD_PRESUM=0): the same t for every row with an adapter."""
    from ops.lora import linear_lora_fold

    g = torch.Generator().manual_seed(5)
    k_dim, widths = 512, [32, 16]
    fold = make_fold(TOKEN_SLOTS, widths, torch.float32, 1)
    A = (torch.randn(3, 2 * 16, k_dim, generator=g) * 0.1).to(DEVICE)
    x = torch.randn(len(TOKEN_SLOTS), k_dim, generator=g).to(DEVICE)
    w = torch.randn(sum(widths), k_dim, generator=g).to(DEVICE)

    def run() -> LoraFold:
        y, f = linear_lora_fold(x, lambda v: v @ w.T, A, fold.B, fold.slice_offsets,
                                fold.scalings, fold.info, fold.row_slots)
        torch.testing.assert_close(y, x @ w.T)
        return f

    monkeypatch.setenv("LORASERVE_FOLD_PRESUM", "0")
    split = run().t
    monkeypatch.setenv("LORASERVE_FOLD_PRESUM", "1")
    summed = run().t
    assert split.shape[0] > 1 and summed.shape == (1, *split.shape[1:])
    lora = torch.tensor(TOKEN_SLOTS, device=DEVICE) >= 0  # base rows' partials are never written
    torch.testing.assert_close(summed[0, lora], split.sum(0)[lora], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("rank_pad", [16, 24])
@pytest.mark.parametrize("group", [1, 4])
def test_silu_mul_fold(dtype, splits, rank_pad, group) -> None:
    """Blocks of 64 columns with a partial last one; a pool rank that is no power of two; a
    row a program, 4 and the default 8 (groups of one adapter and base rows, groups of
    several adapters, groups that run past the table)."""
    from ops.triton_silu_mul import fold_launch

    inter = 300
    fold = make_fold(TOKEN_SLOTS, [inter, inter], dtype, splits, rank_pad)
    g = torch.Generator().manual_seed(2)
    gate_up = torch.randn(len(TOKEN_SLOTS), 2 * inter, generator=g).to(dtype).to(DEVICE)
    want = silu_mul_triton(expanded(gate_up, fold))
    got = torch.full_like(want, float("nan"))
    fold_launch(gate_up, got, fold, group=group)
    torch.testing.assert_close(got, want, **tol(dtype))
    torch.testing.assert_close(silu_mul_triton(gate_up, fold=fold), want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_kv_fold(dtype, qk_norm) -> None:
    from tests.test_fused_ops import rope_tables

    heads, kv_heads, d = 4, 2, 32
    q_size, kv_size = heads * d, kv_heads * d
    tokens = len(TOKEN_SLOTS)
    fold = make_fold(TOKEN_SLOTS, [q_size, kv_size, kv_size], dtype, 2)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, 100, (tokens,), generator=g).to(DEVICE)
    cos, sin = rope_tables(positions, d, dtype)
    norms = ((1 + 0.1 * torch.randn(d, generator=g)).to(dtype).to(DEVICE),
             (1 + 0.1 * torch.randn(d, generator=g)).to(dtype).to(DEVICE)) if qk_norm else ()
    slots = torch.randperm(4 * 8, generator=g)[:tokens].to(DEVICE)
    slots[4] = -1  # a row that writes no cache

    def run(qkv: torch.Tensor, fold: LoraFold | None):
        cache = [torch.zeros(4, 8, kv_heads, d, dtype=dtype, device=DEVICE) for _ in range(2)]
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q_out = rope_store_kv_triton(
            q.view(tokens, heads, d), k.view(tokens, kv_heads, d), v.view(tokens, kv_heads, d),
            cos, sin, *cache, slots, *norms, eps=EPS, fold=fold)
        return q_out, *cache

    want = run(expanded(qkv, fold), None)
    got = run(qkv, fold)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(dtype))


def stacked(fold: LoraFold) -> LoraFold:
    """The fold with its t laid out as a stacked GEMM leaves it (ops.lora.linear_lora_fold
    over a pool stack): [splits, T, num_slots * n*R] (more than one split: a split stacked
    GEMM's partials), each row's t in its own slot's columns and NaN in every other slot's (a
    read of them would show)."""
    import dataclasses

    splits, rows, width = fold.t.shape
    num_slots = fold.B.shape[0]
    t = torch.full((splits, rows, num_slots * width), float("nan"), dtype=fold.t.dtype,
                   device=fold.t.device)
    for m, slot in enumerate(fold.row_slots.tolist()):
        if slot >= 0:
            t[:, m, slot * width:(slot + 1) * width] = fold.t[:, m]
    return dataclasses.replace(fold, t=t, t_slot_stride=width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_consumers_read_a_stacked_t_by_row_slot(dtype) -> None:
    """Each consumer given the stacked layout of a fold's t (every slot's columns for every
    row, LoraFold.t_slot_stride) gives the bits it gives for the fold itself: it reads its
    row's own slot's columns and nothing else (the others are NaN); so does apply_fold's plain
    expand."""
    from ops.lora import apply_fold
    from ops.triton_silu_mul import fold_launch
    from tests.test_fused_ops import rope_tables

    g = torch.Generator().manual_seed(6)
    rows = len(TOKEN_SLOTS)
    fold = make_fold(TOKEN_SLOTS, [96], dtype, 1)
    x = torch.randn(rows, 96, generator=g).to(dtype).to(DEVICE)
    res = torch.randn(rows, 96, generator=g).to(dtype).to(DEVICE)
    w = torch.ones(96, dtype=dtype, device=DEVICE)
    outs = [add_rmsnorm_triton(x, res.clone(), w, EPS, fold=f) for f in (fold, stacked(fold))]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert torch.equal(apply_fold(x.clone(), fold), apply_fold(x.clone(), stacked(fold)))

    fold = make_fold(TOKEN_SLOTS, [80, 80], dtype, 1, rank_pad=24)
    gate_up = torch.randn(rows, 160, generator=g).to(dtype).to(DEVICE)
    for group in (1, 4):
        outs = [torch.empty(rows, 80, dtype=dtype, device=DEVICE) for _ in range(2)]
        for out, f in zip(outs, (fold, stacked(fold))):
            fold_launch(gate_up, out, f, group=group)
        assert torch.equal(*outs)

    heads, kv_heads, d = 4, 2, 32
    fold = make_fold(TOKEN_SLOTS, [heads * d, kv_heads * d, kv_heads * d], dtype, 1)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g).to(dtype).to(DEVICE)
    cos, sin = rope_tables(torch.arange(rows, device=DEVICE), d, dtype)
    cache_slots = torch.arange(rows, device=DEVICE)

    def rope(f: LoraFold):
        cache = [torch.zeros(2, 8, kv_heads, d, dtype=dtype, device=DEVICE) for _ in range(2)]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q_out = rope_store_kv_triton(q.view(rows, heads, d), k.view(rows, kv_heads, d),
                                     v.view(rows, kv_heads, d), cos, sin, *cache, cache_slots,
                                     eps=EPS, fold=f)
        return q_out, *cache

    assert all(torch.equal(a, b) for a, b in zip(rope(fold), rope(stacked(fold))))


def stack_case() -> tuple:
    """(fold, A, W, x, stack): a two-slice group (32 and 16 outputs) of 3 slots at rank 16
    over 64 inputs, and the pool's stack of it ([W; every slot's A]), fp32."""
    g = torch.Generator().manual_seed(7)
    k_dim, widths, rank_pad = 64, [32, 16], 16
    fold = make_fold(TOKEN_SLOTS, widths, torch.float32, 1)
    A = torch.randn(3, 2 * rank_pad, k_dim, generator=g).to(DEVICE)
    W = torch.randn(sum(widths), k_dim, generator=g).to(DEVICE)
    x = torch.randn(len(TOKEN_SLOTS), k_dim, generator=g).to(DEVICE)
    return fold, A, W, x, torch.cat([W, A.reshape(-1, k_dim)])


def test_stacked_linear_fold_is_one_gemm_over_weight_and_slots() -> None:
    """linear_lora_fold over a stack ([W; every slot's A]) returns x W^T as a view of one GEMM
    and a stacked t whose row m, slot s columns are x_m A_s^T; a stack of another shape, or a
    slot stride that is not the group's t width, is refused."""
    import dataclasses

    from ops.lora import linear_lora_fold

    fold, A, W, x, stack = stack_case()
    rank_pad = A.shape[1] // 2
    y, f = linear_lora_fold(x, lambda v: v @ W.T, A, fold.B, fold.slice_offsets, fold.scalings,
                            fold.info, fold.row_slots, stack=stack)
    torch.testing.assert_close(y, x @ W.T)
    assert f.t_slot_stride == 2 * rank_pad and f.t.shape == (1, len(TOKEN_SLOTS), 3 * 32)
    for s in range(3):
        torch.testing.assert_close(f.t[0, :, s * 32:(s + 1) * 32], x @ A[s].T)
    f.check(y)
    # stack_mm (the decode GEMM in decode graphs) computes that one GEMM instead of F.linear
    seen = []
    y2, f2 = linear_lora_fold(x, lambda v: v @ W.T, A, fold.B, fold.slice_offsets,
                              fold.scalings, fold.info, fold.row_slots, stack=stack,
                              stack_mm=lambda v, w: seen.append(w.shape) or v @ w.T)
    assert seen == [stack.shape]
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(f2.t, f.t)
    with pytest.raises(ValueError, match="does not hold"):
        linear_lora_fold(x, lambda v: v @ W.T, A, fold.B, fold.slice_offsets, fold.scalings,
                         fold.info, fold.row_slots, stack=stack[1:])
    with pytest.raises(ValueError, match="slot stride"):
        dataclasses.replace(f, t_slot_stride=16).check(y)


def test_stacked_gemm_is_chosen_from_a_third_of_the_slots() -> None:
    """Graphs take the stacked GEMM inside stack_paths(True) only, and decode steps choose it
    once their segments reach a third of the pool's slots."""
    assert not stacks_lora()
    with stack_paths(True):
        assert stacks_lora()
        with stack_paths(False):
            assert not stacks_lora()
    assert not stacks_lora()
    assert next(n for n in range(1, 33) if stack_wins(n, 32)) == 11
    assert not stack_wins(2, 8) and stack_wins(3, 8) and stack_wins(1, 1)


def test_consumers_reject_a_fold_of_other_slices() -> None:
    fold = make_fold(TOKEN_SLOTS, [16, 16, 16], torch.float32, 1)
    with pytest.raises(ValueError, match="gate and up"):
        silu_mul_triton(torch.zeros(len(TOKEN_SLOTS), 48, device=DEVICE), fold=fold)
    with pytest.raises(ValueError, match="does not fit"):
        silu_mul_triton(torch.zeros(len(TOKEN_SLOTS), 32, device=DEVICE), fold=fold)


# ------------------------------------------------------------------------------- the model


def model_with_two_adapters(tmp_path, arch: str) -> tuple:
    """(model folder, LoraPathSpecs): a tiny `arch` model and adapters a0 (rank 8) and a1
    (rank 16) on every projection."""
    from runtime.config import LoraPathSpec
    from tests.models import make_adapter, make_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = make_model(tmp_path / "m", arch)
    specs = tuple(
        LoraPathSpec(f"a{i}", str(make_adapter(model, tmp_path / f"a{i}", rank=r, seed=i,
                                               targets=targets)))
        for i, r in enumerate((8, 16)))
    return model, specs


@pytest.mark.parametrize(("arch", "stack"), [("llama", "0"), ("qwen3", "0"), ("llama", "1")])
def test_folded_decode_matches_expands_in_the_interpreter(arch, stack, tmp_path,
                                                          monkeypatch) -> None:
    """A served mixed batch (base rows and two adapters of ranks 8 and 16 on every
    projection) whose decode forwards fold every group, in the interpreter: each decode
    forward's logits match the forward with expands, and the greedy tokens are the same; also
    with the pool's stacks (LORASERVE_LORA_STACK=1), where the folding forwards take one GEMM
    for each projection and every slot's shrink."""
    import ops.dispatch
    from runtime.model import llama
    from tests.engine_utils import greedy, make_engine, run, run_batch
    from tests.models import prompts, read_vocab

    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    monkeypatch.setenv("LORASERVE_LORA_FOLD", "qkv,o,gate_up,down")
    monkeypatch.setenv("LORASERVE_LORA_STACK", stack)
    model, specs = model_with_two_adapters(tmp_path, arch)
    ps = prompts(5, read_vocab(model), seed=3, lo=3, hi=12)
    loras = [None, "a0", "a1", "a1", "a0"]
    forward = llama.CausalLM.forward
    folds: list[int] = []
    fold_linear = llama.lora_linear_fold

    def counted_fold(*args, **kwargs):
        folds.append(kwargs.get("stack") is not None)
        return fold_linear(*args, **kwargs)

    monkeypatch.setattr(llama, "lora_linear_fold", counted_fold)
    logits: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    tokens = {}
    for fold in (False, True):
        def patched(self, fb, kv_k, kv_v, fold=fold):
            with capture_paths(fold=fold and fb.is_decode), stack_paths(stack == "1"):
                out = forward(self, fb, kv_k, kv_v)
            if fb.is_decode:
                logits[fold].append(out.clone())
            return out

        monkeypatch.setattr(llama.CausalLM, "forward", patched)
        engine = make_engine(model, lora_paths=specs, max_loras_per_batch=2,
                             max_running_requests=8)
        tokens[fold] = run(run_batch(engine, ps, greedy(5), loras))
    decode_forwards = len(logits[True])
    assert decode_forwards and decode_forwards == len(logits[False])
    assert len(folds) == 4 * 2 * decode_forwards  # every group of both layers, every forward
    assert all(folds) if stack == "1" else not any(folds)
    for a, b in zip(logits[True], logits[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tokens[True] == tokens[False]


# ------------------------------------------------------------------------------- CUDA, real shapes


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
def test_folds_at_llama_8b_shapes_on_cuda(rows) -> None:
    """bf16 at Llama-3.1-8B shapes, rows over 8 adapters (base rows among them): each consumer
    with a fold against the plain Triton expand and the same kernel."""
    from ops.lora import apply_fold
    from tests.test_fused_ops import rope_tables

    hidden, inter, heads, kv_heads, d = 4096, 14336, 32, 8, 128
    dt = torch.bfloat16
    slots = sorted(i % 9 - 1 for i in range(rows)) if rows > 1 else [3]
    g = torch.Generator().manual_seed(0)

    def with_expand(y: torch.Tensor, fold: LoraFold) -> torch.Tensor:
        """y plus the fold's delta by the Triton expand."""
        clean = LoraFold(torch.nan_to_num(fold.t, nan=0.0), fold.B, fold.scalings,
                         fold.row_slots, fold.slice_offsets, fold.info)
        return apply_fold(y.clone(), clean)

    fold = make_fold(slots, [hidden], dt, 4, num_slots=8, device="cuda")
    y = torch.randn(rows, hidden, generator=g).to(dt).cuda()
    res = torch.randn(rows, hidden, generator=g).to(dt).cuda()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dt).cuda()
    want = add_rmsnorm_triton(with_expand(y, fold), res, w, EPS)
    got = add_rmsnorm_triton(y, res.clone(), w, EPS, fold=fold)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(dt))

    fold = make_fold(slots, [inter, inter], dt, 1, num_slots=8, device="cuda")
    gate_up = torch.randn(rows, 2 * inter, generator=g).to(dt).cuda()
    torch.testing.assert_close(silu_mul_triton(gate_up, fold=fold),
                               silu_mul_triton(with_expand(gate_up, fold)), **tol(dt))

    q_size, kv_size = heads * d, kv_heads * d
    fold = make_fold(slots, [q_size, kv_size, kv_size], dt, 2, num_slots=8, device="cuda")
    qkv = torch.randn(rows, q_size + 2 * kv_size, generator=g).to(dt).cuda()
    cos, sin = rope_tables(torch.arange(rows, device="cuda"), d, dt)
    smap = torch.arange(rows, device="cuda")

    def run(x, f):
        cache = [torch.zeros(rows, 1, kv_heads, d, dtype=dt, device="cuda") for _ in range(2)]
        q, k, v = x.split([q_size, kv_size, kv_size], dim=-1)
        out = rope_store_kv_triton(q.view(rows, heads, d), k.view(rows, kv_heads, d),
                                   v.view(rows, kv_heads, d), cos, sin, *cache, smap, fold=f)
        return out, *cache

    for a, b in zip(run(qkv, fold), run(with_expand(qkv, fold), None)):
        torch.testing.assert_close(a, b, **tol(dt))
