"""Engine parity on CUDA (device only): fp32 greedy tokens identical to HF transformers, bf16
logits within BF16_TOL of HF's bf16 model (relative to the logits' scale)."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.engine_utils import engine_logits, greedy, hf_model, make_engine, run, run_batch
from tests.models import ARCHS, make_model, prompts, read_vocab


@pytest.fixture(autouse=True)
def free_gpu():
    yield
    gc.collect()
    torch.cuda.empty_cache()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]

BF16_TOL = 0.05  # max |ours - hf| / max |hf| over every position: bf16 rounding, two orders


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request, tmp_path_factory):
    return request.param, make_model(tmp_path_factory.mktemp(request.param), request.param,
                                     hidden=128, heads=4, kv_heads=2, inter=256)


def test_fp32_tokens_match_hf_on_cuda(arch_model):
    arch, folder = arch_model
    vocab = read_vocab(folder)
    ps = prompts(6, vocab, seed=1, lo=5, hi=100)
    engine = make_engine(folder, device="cuda", dtype="float32", mem_fraction_static=0.05)
    ours = run(run_batch(engine, ps, greedy(64)))
    del engine
    model = hf_model(folder).cuda()
    for p, out in zip(ps, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=64,
                                 min_new_tokens=64, do_sample=False, pad_token_id=0)
        assert out == ref[0, len(p):].tolist(), arch


def test_bf16_logits_close_to_hf_on_cuda(arch_model):
    arch, folder = arch_model
    vocab = read_vocab(folder)
    engine = make_engine(folder, device="cuda", dtype="bfloat16", mem_fraction_static=0.05)
    model = hf_model(folder, dtype=torch.bfloat16).cuda()
    for p in prompts(3, vocab, seed=2, lo=30, hi=200):
        ours = engine_logits(engine, p)
        with torch.no_grad():
            ref = model(torch.tensor([p], device="cuda")).logits[0].float().cpu()
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert rel < BF16_TOL, f"{arch}: relative logit error {rel}"
