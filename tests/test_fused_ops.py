"""Fused elementwise kernels of the decoder (add+RMSNorm, SiLU*up, rotary+K/V store) against the
model's own torch code (CPU tensors under TRITON_INTERPRET=1 at small shapes; bf16 at Llama-3.1-8B
shapes on CUDA), and the fused CUDA model against the unfused one."""

import gc
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # before triton is imported: kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ops.store_kv import store_kv
from ops.triton_rmsnorm import add_rmsnorm_triton, rmsnorm_triton
from ops.triton_rope_store_kv import rope_store_kv_triton
from ops.triton_silu_mul import silu_mul_triton
from runtime.model import llama
from runtime.model.llama import DecoderLayer, ModelArgs, RMSNorm, fused_kernels_enabled, rotate

# the interpreter trips a numpy deprecation on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter dtypes (it mishandles bf16); the GPU tests run bf16
DTYPES = [torch.float32, torch.float16]
EPS = 1e-5


def tol(dtype: torch.dtype) -> dict:
    """One rounding step of the dtype: fp32 reductions may sum in another order."""
    return {
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    }[dtype]


# ------------------------------------------------------------------------------- references


def torch_norm(weight: torch.Tensor, eps: float = EPS) -> RMSNorm:
    """The model's RMSNorm forced onto its torch path (the reference on CUDA too)."""
    norm = RMSNorm(weight.shape[0], eps).to(weight.device, weight.dtype)
    norm.use_fused = False
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


def rope_store_reference(q, k, v, cos, sin, k_cache, v_cache, slots, q_w, k_w):
    """The model's unfused attention prologue: q/k norms, rotate, store_kv (cache in place)."""
    if q_w is not None:
        q, k = torch_norm(q_w)(q), torch_norm(k_w)(k)
    q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    keep = slots >= 0
    store_kv(k[keep], v[keep], k_cache, v_cache, slots[keep])
    return q


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """cos, sin: [T, D] rows of each position, as CausalLM.build_rope_cache builds them."""
    inv = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(positions.float().cpu(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(positions.device), emb.sin().to(dtype).to(positions.device)


# ------------------------------------------------------------------------------- RMSNorm


def rows_view(t: int, n: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    """[t, n] rows inside a wider buffer: the kernels must honour the row stride."""
    return torch.randn(t, n + 8, device=device).to(dtype)[:, 3 : 3 + n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 64), (5, 96), (3, 40)])
def test_rmsnorm_matches_torch(dtype, t, n):
    x = rows_view(t, n, dtype)
    weight = (torch.rand(n) + 0.5).to(dtype)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    got = rmsnorm_triton(x, weight, EPS, out=out)
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got, torch_norm(weight)(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n", [(1, 64), (5, 96)])
def test_add_rmsnorm_matches_torch(dtype, t, n):
    x, residual = rows_view(t, n, dtype), rows_view(t, n, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    weight = (torch.rand(n) + 0.5).to(dtype)
    out = torch.full((t, n), float("nan"), dtype=dtype)
    s_out = torch.full((t, n), float("nan"), dtype=dtype)
    got, s = add_rmsnorm_triton(x, residual, weight, EPS, out=out, residual_out=s_out)
    assert got is out and s is s_out
    assert not got.isnan().any() and not s.isnan().any()
    ref_s = x + residual
    assert torch.equal(s, ref_s)  # the sum is one rounding in both
    torch.testing.assert_close(got, torch_norm(weight)(ref_s), **tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_add_rmsnorm_in_place_on_residual():
    x, residual = torch.randn(4, 64), torch.randn(4, 64)
    weight = torch.rand(64) + 0.5
    ref_s = x + residual
    ref = torch_norm(weight)(ref_s)
    got, s = add_rmsnorm_triton(x, residual, weight, EPS, residual_out=residual)
    assert s is residual
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, **tol(torch.float32))


def test_rmsnorm_checks_inputs():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_triton(x, torch.ones(32), EPS)
    with pytest.raises(ValueError, match="must match"):
        rmsnorm_triton(x, torch.ones(64, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm_triton(torch.randn(64, 2).t(), torch.ones(64), EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm_triton(x, torch.randn(3, 64), torch.ones(64), EPS)


def test_rmsnorm_no_rows():
    assert rmsnorm_triton(torch.empty(0, 64), torch.ones(64), EPS).shape == (0, 64)


# ------------------------------------------------------------------------------- SiLU * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 64), (3, 100), (2, 1500)])
def test_silu_mul_matches_torch(dtype, t, inter):
    gate_up = rows_view(t, 2 * inter, dtype) * 3
    out = torch.full((t, inter), float("nan"), dtype=dtype)
    got = silu_mul_triton(gate_up, out=out)
    assert got is out and not got.isnan().any()
    gate, up = gate_up.split(inter, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up, **tol(dtype))


def test_silu_mul_checks_inputs():
    with pytest.raises(ValueError, match="2 \\* inter"):
        silu_mul_triton(torch.randn(2, 7))
    with pytest.raises(ValueError, match="out must be"):
        silu_mul_triton(torch.randn(2, 8), out=torch.empty(2, 8))


# ------------------------------------------------------------------------------- rotary + store


def make_rope_case(t, heads, kv_heads, head_dim, dtype, qk_norm, num_blocks, block_size, device):
    """Fused qkv rows with q, k, v views; slots spread over the cache, the last one skipped."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, q_size + 2 * kv_size, device=device).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(t, heads, head_dim)
    k, v = k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
    positions = torch.randint(0, 4000, (t,), device=device)
    cos, sin = rope_tables(positions, head_dim, dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:t]
    if t > 1:
        slots[-1] = -1
    weights = (None, None)
    if qk_norm:
        weights = tuple((torch.rand(head_dim, device=device) + 0.5).to(dtype) for _ in range(2))
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    return q, k, v, cos, sin, slots, weights, cache_shape


def check_rope_store(t, heads, kv_heads, head_dim, dtype, qk_norm, num_blocks=8, block_size=4,
                     device=DEVICE):
    q, k, v, cos, sin, slots, (q_w, k_w), cache_shape = make_rope_case(
        t, heads, kv_heads, head_dim, dtype, qk_norm, num_blocks, block_size, device
    )
    nan = float("nan")
    caches = [torch.full(cache_shape, nan, dtype=dtype, device=device) for _ in range(4)]
    k_cache, v_cache, ref_k_cache, ref_v_cache = caches
    q_out = torch.full(q.shape, nan, dtype=dtype, device=device)
    got = rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots, q_w, k_w, EPS,
                               q_out=q_out)
    ref = rope_store_reference(q, k, v, cos, sin, ref_k_cache, ref_v_cache, slots, q_w, k_w)
    assert got is q_out and not got.isnan().any()
    torch.testing.assert_close(got, ref, **tol(dtype))
    # written slots match, every other slot (and the skipped token's) keeps its poison
    assert torch.equal(k_cache.isnan(), ref_k_cache.isnan())
    assert torch.equal(v_cache.isnan(), ref_v_cache.isnan())
    assert (~k_cache.isnan()).sum() == (slots >= 0).sum() * kv_heads * head_dim
    torch.testing.assert_close(k_cache, ref_k_cache, equal_nan=True, **tol(dtype))
    if not qk_norm:
        # the rotation rounds as torch's ops round (no FMA on CUDA either): bit for bit
        assert torch.equal(got, ref)
        assert torch.equal(k_cache.nan_to_num(0.0), ref_k_cache.nan_to_num(0.0))
    assert torch.equal(v_cache.nan_to_num(0.0), ref_v_cache.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_rope_store_kv_matches_torch(dtype, qk_norm, head_dim):
    check_rope_store(5, 4, 2, head_dim, dtype, qk_norm)


def test_rope_store_kv_one_token_int32_slots():
    q, k, v, cos, sin, slots, _, cache_shape = make_rope_case(
        1, 2, 1, 16, torch.float32, False, 2, 4, DEVICE
    )
    k_cache, v_cache, ref_k, ref_v = (torch.zeros(cache_shape, device=DEVICE) for _ in range(4))
    got = rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots.int())
    ref = rope_store_reference(q, k, v, cos, sin, ref_k, ref_v, slots, None, None)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(k_cache, ref_k)
    assert torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_kv_reads_the_tables_at_positions(pos_dtype, qk_norm):
    """With positions the kernel reads the whole tables at each token's row: the same q, K and
    V as the gathered rows give, bit for bit, over repeated and out-of-order positions."""
    dtype = torch.float16
    q, k, v, _, _, slots, (q_w, k_w), cache_shape = make_rope_case(
        6, 4, 2, 16, dtype, qk_norm, 8, 4, DEVICE
    )
    cos_table, sin_table = rope_tables(torch.arange(50, device=DEVICE), 16, dtype)
    positions = torch.tensor([49, 3, 3, 0, 17, 8], device=DEVICE)
    caches = [torch.zeros(cache_shape, dtype=dtype, device=DEVICE) for _ in range(4)]
    got = rope_store_kv_triton(q, k, v, cos_table, sin_table, caches[0], caches[1], slots, q_w,
                               k_w, EPS, positions=positions.to(pos_dtype))
    want = rope_store_kv_triton(q, k, v, cos_table[positions], sin_table[positions], caches[2],
                                caches[3], slots, q_w, k_w, EPS)
    assert torch.equal(got, want)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    ref = rope_store_reference(q, k, v, cos_table[positions], sin_table[positions],
                               torch.zeros_like(caches[0]), torch.zeros_like(caches[1]), slots,
                               q_w, k_w)
    torch.testing.assert_close(got, ref, **tol(dtype))


def test_rope_store_kv_checks_inputs():
    q, k, v, cos, sin, slots, (q_w, _), cache_shape = make_rope_case(
        3, 4, 2, 16, torch.float32, True, 2, 4, DEVICE
    )
    kc, vc = torch.zeros(cache_shape), torch.zeros(cache_shape)
    with pytest.raises(ValueError, match="both"):
        rope_store_kv_triton(q, k, v, cos, sin, kc, vc, slots, q_w, None)
    with pytest.raises(ValueError, match="cos must be"):
        rope_store_kv_triton(q, k, v, cos[:, None], sin, kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_store_kv_triton(q, k, v, cos, sin, kc, vc, slots[:2])
    with pytest.raises(ValueError, match="cache rows"):
        rope_store_kv_triton(q, k, v, cos, sin, kc[:, :, :1], vc[:, :, :1], slots)
    with pytest.raises(ValueError, match="one dtype"):
        rope_store_kv_triton(q, k, v, cos.half(), sin, kc, vc, slots)
    positions = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="positions must be"):
        rope_store_kv_triton(q, k, v, cos, sin, kc, vc, slots, positions=positions[:2])
    with pytest.raises(ValueError, match="positions must be"):
        rope_store_kv_triton(q, k, v, cos, sin, kc, vc, slots, positions=positions.float())
    with pytest.raises(ValueError, match="sin must be"):
        rope_store_kv_triton(q, k, v, cos, sin[:2], kc, vc, slots, positions=positions)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_kv_sums_split_k_partials(parts, qk_norm):
    """q, k, v as a qkv projection's fp32 split-K partials [S, T, ...]: the same q, K and V as
    the kernel given the partials' sum rounded to the output dtype (fp16), bit for bit."""
    t, heads, kv_heads, d, dtype = 5, 4, 2, 16, torch.float16
    _, _, _, cos, sin, slots, weights, cache_shape = make_rope_case(
        t, heads, kv_heads, d, dtype, qk_norm, 8, 4, DEVICE)
    q_size, kv_size = heads * d, kv_heads * d
    partials = torch.randn(parts, t, q_size + 2 * kv_size, device=DEVICE)
    summed = partials[0].clone()
    for p in range(1, parts):  # the kernel's order: slice by slice
        summed += partials[p]
    summed = summed.to(dtype)

    def views(x):
        q, k, v = x.split([q_size, kv_size, kv_size], dim=-1)
        lead = x.shape[:-1]
        return q.view(*lead, heads, d), k.view(*lead, kv_heads, d), v.view(*lead, kv_heads, d)

    nan = float("nan")
    caches = [torch.full(cache_shape, nan, dtype=dtype, device=DEVICE) for _ in range(4)]
    got = rope_store_kv_triton(*views(partials), cos, sin, caches[0], caches[1], slots,
                               *weights, EPS)
    want = rope_store_kv_triton(*views(summed), cos, sin, caches[2], caches[3], slots,
                                *weights, EPS)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(caches[0].nan_to_num(0.0), caches[2].nan_to_num(0.0))
    assert torch.equal(caches[1].nan_to_num(0.0), caches[3].nan_to_num(0.0))
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    # what it refuses: 16-bit partials, one slice, mismatched slices, a fold
    q, k, v = views(partials)
    kc, vc = caches[:2]
    with pytest.raises(ValueError, match="fp32"):
        rope_store_kv_triton(q.half(), k.half(), v.half(), cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="S >= 2"):
        rope_store_kv_triton(q[:1], k[:1], v[:1], cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="S >= 2"):
        rope_store_kv_triton(q, k[:1], v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="no LoRA fold"):
        rope_store_kv_triton(q, k, v, cos, sin, kc, vc, slots, fold=object())


# ------------------------------------------------------------------------------- the model


def tiny_args(**kw) -> ModelArgs:
    base = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
        "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "rms_norm_eps": EPS,
        "max_position": 64, "tie_word_embeddings": False, "qkv_bias": False, "qk_norm": False,
    }
    return ModelArgs(**(base | kw))


def fused_flags(module: torch.nn.Module) -> list[bool]:
    return [m.use_fused for m in module.modules() if hasattr(m, "use_fused")]


def test_disable_fused_env_is_read_when_modules_are_built(monkeypatch):
    monkeypatch.delenv("LORASERVE_DISABLE_FUSED", raising=False)
    assert fused_kernels_enabled()
    on = DecoderLayer(tiny_args(qk_norm=True))
    monkeypatch.setenv("LORASERVE_DISABLE_FUSED", "1")
    off = DecoderLayer(tiny_args(qk_norm=True))
    monkeypatch.delenv("LORASERVE_DISABLE_FUSED")
    assert fused_flags(on) == [True] * 6  # two norms, attention and its q/k norms, MLP
    assert fused_flags(off) == [False] * 6


def test_add_forward_on_cpu_is_the_unfused_sum_and_norm():
    norm = RMSNorm(32, EPS)
    x, residual = torch.randn(3, 32), torch.randn(3, 32)
    out, s = norm.add_forward(x, residual)
    assert torch.equal(s, x + residual) and torch.equal(out, norm(x + residual))
    out, s = norm.add_forward(x, None)
    assert s is x and torch.equal(out, norm(x))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_model_path_matches_torch_path_in_the_interpreter(arch, tmp_path, monkeypatch):
    """The fused wiring (deferred residual adds, rotary+store, SiLU*up, final add+norm) forced
    on for CPU tensors: prefill logits and greedy decode tokens match the torch path."""
    from tests.engine_utils import engine_logits, greedy, make_engine, run, run_batch
    from tests.models import make_model, prompts, read_vocab

    folder = make_model(tmp_path, arch)
    ps = prompts(3, read_vocab(folder), seed=5, lo=3, hi=20)
    calls: dict[str, int] = {}
    for name in ("rmsnorm_triton", "add_rmsnorm_triton", "rope_store_kv_triton",
                 "silu_mul_triton"):
        monkeypatch.setattr(llama, name, counted(getattr(llama, name), name, calls))
    logits, tokens = {}, {}
    for fused in (True, False):
        monkeypatch.setattr(llama, "runs_fused", (lambda m, x: m.use_fused) if fused
                            else (lambda m, x: False))
        engine = make_engine(folder)
        logits[fused] = engine_logits(engine, ps[0])
        tokens[fused] = run(run_batch(engine, ps, greedy(6)))
        if fused:
            assert len(calls) == 4, calls
            forwards = calls["rmsnorm_triton"]  # layer 0's input norm, once per forward
            # per forward: 2 layers x 2 adds+norms - layer 0's first + the final norm
            assert calls["add_rmsnorm_triton"] == 4 * forwards
            assert calls["rope_store_kv_triton"] == calls["silu_mul_triton"] == 2 * forwards
            calls.clear()
    assert not calls
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
    assert tokens[True] == tokens[False]


def counted(fn, name: str, calls: dict[str, int]):
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------- CUDA, real shapes

LLAMA_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "inter": 14336}
TOKENS = [1, 32, 512]


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_rmsnorm_bf16_on_cuda(t, with_residual):
    n, dtype = LLAMA_8B["hidden"], torch.bfloat16
    x = torch.randn(t, n, device="cuda", dtype=dtype)
    residual = torch.randn(t, n, device="cuda", dtype=dtype) * 4
    weight = (torch.rand(n, device="cuda") + 0.5).to(dtype)
    ref_norm = torch_norm(weight)
    if with_residual:
        out = torch.full_like(x, float("nan"))
        s_out = torch.full_like(x, float("nan"))
        got, s = add_rmsnorm_triton(x, residual, weight, EPS, out=out, residual_out=s_out)
        assert torch.equal(s, x + residual)
        ref = ref_norm(x + residual)
    else:
        out = torch.full_like(x, float("nan"))
        got = rmsnorm_triton(x, weight, EPS, out=out)
        ref = ref_norm(x)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, **tol(dtype))


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.gpu
@needs_cuda
def test_silu_mul_bf16_on_cuda(t):
    inter = LLAMA_8B["inter"]
    gate_up = torch.randn(t, 2 * inter, device="cuda", dtype=torch.bfloat16) * 3
    out = torch.full((t, inter), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = silu_mul_triton(gate_up, out=out)
    gate, up = gate_up.split(inter, dim=-1)
    assert not got.isnan().any()
    torch.testing.assert_close(got, F.silu(gate) * up, **tol(torch.bfloat16))


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.gpu
@needs_cuda
def test_rope_store_kv_bf16_on_cuda(t, qk_norm):
    s = LLAMA_8B
    check_rope_store(t, s["heads"], s["kv_heads"], s["head_dim"], torch.bfloat16, qk_norm,
                     num_blocks=64, block_size=16, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_fused_kernels_capture_in_a_cuda_graph():
    s, dtype, t = LLAMA_8B, torch.bfloat16, 8
    x = torch.randn(t, s["hidden"], device="cuda", dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.ones(s["hidden"], device="cuda", dtype=dtype)
    gate_up = torch.randn(t, 2 * s["inter"], device="cuda", dtype=dtype)
    q, k, v, cos, sin, slots, _, cache_shape = make_rope_case(
        t, s["heads"], s["kv_heads"], s["head_dim"], dtype, False, 16, 16, "cuda"
    )
    k_cache = torch.zeros(cache_shape, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)

    def step():
        return (add_rmsnorm_triton(x, residual, weight, EPS), silu_mul_triton(gate_up),
                rope_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots))

    eager = step()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    again = step()
    torch.testing.assert_close(captured[0], again[0], rtol=0, atol=0)
    torch.testing.assert_close(captured[1], eager[1], rtol=0, atol=0)
    torch.testing.assert_close(captured[2], eager[2], rtol=0, atol=0)


# ------------------------------------------------------------------------------- CUDA, whole model


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    from tests.models import ARCHS, make_model

    return {
        arch: make_model(tmp_path_factory.mktemp(arch), arch, hidden=256, heads=4, kv_heads=2,
                         inter=512, layers=3)
        for arch in ARCHS
    }


def make_gpu_engine(folder, monkeypatch, fused: bool, dtype: str):
    from tests.engine_utils import make_engine

    if fused:
        monkeypatch.delenv("LORASERVE_DISABLE_FUSED", raising=False)
    else:
        monkeypatch.setenv("LORASERVE_DISABLE_FUSED", "1")
    engine = make_engine(folder, device="cuda", dtype=dtype, mem_fraction_static=0.05)
    monkeypatch.delenv("LORASERVE_DISABLE_FUSED", raising=False)
    assert set(fused_flags(engine.model)) == {fused}
    return engine


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.gpu
@needs_cuda
def test_fused_model_matches_unfused_on_cuda(arch, gpu_models, monkeypatch):
    """bf16 prefill logits close at every position; fp32 greedy tokens (decode through the
    CUDA graphs) identical, over a batch of prompts."""
    from tests.engine_utils import engine_logits, greedy, run, run_batch
    from tests.models import prompts, read_vocab

    folder = gpu_models[arch]
    vocab = read_vocab(folder)
    ps = prompts(4, vocab, seed=3, lo=5, hi=120)
    logits, tokens = {}, {}
    for fused in (True, False):
        engine = make_gpu_engine(folder, monkeypatch, fused, "bfloat16")
        logits[fused] = [engine_logits(engine, p) for p in ps[:2]]
        del engine
        engine = make_gpu_engine(folder, monkeypatch, fused, "float32")
        tokens[fused] = run(run_batch(engine, ps, greedy(48)))
        if not fused:
            logits["fp32"] = [engine_logits(engine, p) for p in ps[:2]]
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    # The fused kernels round to bf16 at fewer points than the torch ops (rotary, SiLU*up in
    # fp32), so fused and unfused bf16 differ by rounding. The criterion: against the fp32
    # logits, the fused bf16 error is no worse than 1.5x the unfused bf16 error.
    for i, (a, b, ref) in enumerate(zip(logits[True], logits[False], logits["fp32"])):
        err_fused = ((a - ref).abs().max() / ref.abs().max()).item()
        err_torch = ((b - ref).abs().max() / ref.abs().max()).item()
        print(f"\n{arch} prompt {i}: bf16 error vs fp32, fused {err_fused:.4f}, "
              f"torch {err_torch:.4f}")
        assert err_fused <= 1.5 * err_torch + 1e-3, (arch, i, err_fused, err_torch)
    assert tokens[True] == tokens[False], arch
