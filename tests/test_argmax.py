"""The two-stage Triton row argmax (ops/triton_argmax.py) against torch.argmax, exactly: random
rows, ties, NaN, -inf rows, vocabularies that do not fill the last block (CPU tensors under
TRITON_INTERPRET=1 with small blocks; the Llama-3.1-8B vocabulary on CUDA), and the sampler's
greedy rows through it."""

import os

import pytest
import torch

import ops.dispatch
from ops.triton_argmax import argmax_triton, greedy_argmax
from runtime.request import Request, SamplingParams, new_rid
from runtime.sampler import Sampler

# the interpreter trips a numpy deprecation on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter dtypes (it mishandles bf16); the GPU tests run bf16 too
DTYPES = [torch.float32, torch.float16]
NAN, INF = float("nan"), float("inf")


def check(logits: torch.Tensor, block: int) -> None:
    want = logits.argmax(dim=-1)
    got = argmax_triton(logits, block=block)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("vocab", [1000, 5000])
@pytest.mark.parametrize("block", [64, 512])
def test_random_rows(dtype, rows, vocab, block):
    torch.manual_seed(vocab + rows)
    check((torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype), block)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 127, 129])
def test_last_block_partial_or_single(vocab):
    torch.manual_seed(vocab)
    check(torch.randn(4, vocab, device=DEVICE), 16)


def test_default_block_over_a_short_row():
    """One stage-1 program a row, most of its block masked off."""
    check(torch.randn(2, 1000, device=DEVICE), 4096)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first(dtype):
    x = torch.randn(6, 1000, device=DEVICE)
    x[0] = 0.5  # a constant row
    x[1, [3, 400, 999]] = 50.0  # repeated maximum in separate blocks
    x[2, [700, 701, 64, 65]] = 50.0  # within a block and across a block edge (block 64)
    x[3, [63, 64]] = 50.0
    x[4, [999, 998]] = 50.0  # in the partial last block only
    x[5] = -0.0
    x[5, 300] = 0.0  # -0.0 and 0.0 tie: index 0
    check(x.to(dtype), 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_ranks_above_everything(dtype):
    x = torch.randn(6, 1000, device=DEVICE)
    x[0, [500, 20]] = NAN  # the first NaN wins
    x[0, 10] = INF
    x[1, 999] = NAN  # in the partial last block, after a +inf
    x[1, 0] = INF
    x[2] = NAN  # all NaN
    x[3, :] = -INF
    x[3, 640] = NAN
    x[4, [129, 128]] = NAN  # two in one block
    x[5, 5] = INF  # +inf without NaN
    check(x.to(dtype), 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_neg_inf_rows_return_zero(dtype):
    x = torch.full((3, 1000), -INF, device=DEVICE)
    x[1, 900] = -1e4
    check(x.to(dtype), 64)
    assert argmax_triton(x.to(dtype), block=64).tolist() == [0, 900, 0]


def test_row_stride_and_out_buffer():
    wide = torch.randn(3, 1040, device=DEVICE)
    x = wide[:, 8:1008]  # rows contiguous, row stride 1040
    out = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    assert argmax_triton(x, out=out, block=128) is out
    assert torch.equal(out, x.argmax(dim=-1))


def test_empty_batch():
    got = argmax_triton(torch.zeros(0, 100, device=DEVICE))
    assert got.shape == (0,) and got.dtype == torch.int64


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.zeros(10), "must be \\[B, V\\]"),
        (lambda: torch.zeros(2, 3, 4), "must be \\[B, V\\]"),
        (lambda: torch.zeros(2, 10, dtype=torch.float64), "float32, bfloat16 or float16"),
        (lambda: torch.zeros(2, 10, dtype=torch.int32), "float32, bfloat16 or float16"),
        (lambda: torch.zeros(2, 0), "no columns"),
        (lambda: torch.zeros(10, 2).t(), "rows must be contiguous"),
    ],
)
def test_rejects_bad_logits(make, message):
    with pytest.raises(ValueError, match=message):
        argmax_triton(make().to(DEVICE))


def test_rejects_bad_out_and_block():
    x = torch.zeros(2, 10, device=DEVICE)
    for out in (torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32),
                torch.zeros(2, 2, dtype=torch.int64)[:, 0]):
        with pytest.raises(ValueError, match="out must be"):
            argmax_triton(x, out=out.to(DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        argmax_triton(x, block=48)
    with pytest.raises(ValueError, match="larger block"):
        argmax_triton(torch.zeros(1, 20000, device=DEVICE), block=1)


def test_greedy_argmax_dispatch(monkeypatch):
    """torch unless use_triton says otherwise; the Triton path where it does; torch for the
    tensors the kernels do not take, so the error or result is torch's."""
    x = torch.randn(3, 300)
    calls = []
    import ops.triton_argmax as mod

    real = mod.argmax_triton
    monkeypatch.setattr(mod, "argmax_triton", lambda t: calls.append(t) or real(t, block=64))
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1)) and not calls
    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert torch.equal(greedy_argmax(x), x.argmax(dim=-1)) and len(calls) == 1
    calls.clear()
    doubles = x.double()
    assert torch.equal(greedy_argmax(doubles), doubles.argmax(dim=-1))
    assert torch.equal(greedy_argmax(x.t()), x.t().argmax(dim=-1))
    assert not calls
    with pytest.raises((IndexError, RuntimeError)):
        greedy_argmax(torch.zeros(2, 0))


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="drives the kernels through the interpreter, on CPU")
def test_sampler_greedy_rows_through_the_kernels(monkeypatch):
    """The sampler on the Triton path: all-greedy and mixed batches choose torch's argmax for
    their greedy rows, padded vocab columns and penalties included."""
    monkeypatch.setattr(ops.dispatch, "TRITON_ON_CPU", True)
    vocab = 3000
    logits = torch.randn(5, vocab + 7) * 3
    logits[1, [10, 2000]] = 40.0  # a tie
    logits[:, vocab:] = 100.0  # padding, never chosen
    sampler = Sampler(vocab, {0}, torch.device("cpu"))

    def request(**params) -> Request:
        r = Request(rid=new_rid(), prompt_ids=[1, 2], params=SamplingParams(**params))
        r.output_ids = [5, 5]
        return r

    greedy = [request(temperature=0.0) for _ in range(5)]
    want = logits[:, :vocab].argmax(dim=-1)
    assert torch.equal(sampler(logits, greedy).token_ids, want)
    mixed = [request(temperature=0.0), request(temperature=1.0), request(temperature=0.0,
             repetition_penalty=1.5), request(temperature=0.7, top_k=20), request(top_k=1)]
    out = sampler(logits, mixed).token_ids
    penalized = sampler.penalize(logits[:, :vocab].float(), mixed)
    for i in (0, 2, 4):
        assert out[i] == penalized[i].argmax()


# ------------------------------------------------------------------------------- CUDA, real shapes

LLAMA_VOCAB = 128256


@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@needs_cuda
def test_llama_vocab_on_cuda(rows, dtype):
    torch.manual_seed(rows)
    x = (torch.randn(rows, LLAMA_VOCAB, device="cuda") * 3).to(dtype)
    check(x, 4096)
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1))
    # ties (bf16 rounds many values together), NaN, -inf rows and a maximum in the last block
    x[0, [7, 90000, 128255]] = 1e4
    if rows > 1:
        x[1, [128250, 128255]] = 1e4
        x[2, [100, 60000]] = NAN
        x[3] = -INF
        x[4] = 2.0
        x[5, 128255] = INF
    check(x, 4096)
    check(x[:, : LLAMA_VOCAB - 5], 4096)  # a row stride past V, V not a multiple of 16
