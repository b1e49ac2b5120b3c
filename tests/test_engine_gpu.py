"""Engine parity on CUDA (device only): fp32 greedy tokens identical to HF transformers; bf16
logits, measured against HF in fp32, within BF16_TOL or no worse than 1.5x HF's own bf16 error
(relative to the logits' scale)."""

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

BF16_TOL = 0.05  # max |ours - hf32| / max |hf32| over every position


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
    model32 = hf_model(folder, dtype=torch.float32).cuda()
    for p in prompts(3, vocab, seed=2, lo=30, hi=200):
        ours = engine_logits(engine, p)
        with torch.no_grad():
            ids = torch.tensor([p], device="cuda")
            hf16 = model(ids).logits[0].float().cpu()
            ref = model32(ids).logits[0].float().cpu()
        scale = ref.abs().max()
        ours_err = ((ours - ref).abs().max() / scale).item()
        hf_err = ((hf16 - ref).abs().max() / scale).item()
        print(f"\n{arch}: bf16 error vs HF fp32, ours {ours_err:.4f}, HF bf16 {hf_err:.4f}")
        # Our kernels round at other points than HF's bf16 ops (fused rotary and SiLU*up in
        # fp32): the criterion is an error against fp32 within BF16_TOL or no worse than 1.5x
        # HF's own bf16 error, both measured against HF in fp32.
        assert ours_err < BF16_TOL or ours_err <= 1.5 * hf_err, (arch, ours_err, hf_err)
