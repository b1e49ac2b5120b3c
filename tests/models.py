"""Tiny random checkpoints of each supported architecture, with a small trained tokenizer.

Nobody here wrote transformers or PEFT: the parity tests compare our engine against them on
these checkpoints.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A language model predicts the next token from the tokens before it.",
    "LoRA adapters add a low-rank update to the weights of a frozen base model.",
    "Serving many adapters at once means batching requests for different adapters together.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`",
] * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def save_tokenizer(folder: Path) -> int:
    """Write a small byte-level BPE tokenizer with a chat template; returns its vocab size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return len(tok)


def make_model(
    folder: Path,
    arch: str = "llama",
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    tie: bool = False,
    seed: int = 0,
    **extra,
) -> Path:
    """Save a tiny random model of `arch` with our test tokenizer into `folder`."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    common = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512, "tie_word_embeddings": tie,
        "eos_token_id": 2, "bos_token_id": 1,  # <|im_end|>, <|im_start|>
        "pad_token_id": 0, "initializer_range": 0.3, "rms_norm_eps": 1e-6,
    }
    common.update(extra)
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    if arch == "qwen3":
        common.setdefault("head_dim", hidden // heads)
    cfg = cfg_cls(**common)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    with torch.no_grad():  # biases and norms non-trivial, so a wrong mapping shows up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name
                        else 0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def prompts(n: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, vocab - 3, (k,), generator=g).tolist() for k in lens]


def read_vocab(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def make_adapter(
    model_folder: Path,
    out: Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: list[str] | str = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.3,
    **lora_kw,
) -> Path:
    """A random PEFT LoRA adapter for a tiny model saved by make_model. B is drawn non-zero
    (PEFT initialises it to zero) so the adapter really changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                     target_modules=list(targets) if not isinstance(targets, str) else targets,
                     **lora_kw)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(out)
    return out


def model_with_adapters(root: Path, count: int = 2):
    """A tiny llama (make_model) under root/m and `count` default adapters of it, a0, a1, ...
    (seeds 0, 1, ...), as (model folder, lora_paths specs)."""
    from runtime.config import LoraPathSpec

    model = make_model(root / "m", "llama")
    specs = tuple(LoraPathSpec(f"a{i}", str(make_adapter(model, root / f"a{i}", seed=i)))
                  for i in range(count))
    return model, specs


# Every module a tensor-parallel test's adapters target.
TP_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head")


def tp_model_with_adapters(root: Path, hidden: int, inter: int, ranks: tuple[int, int, int]):
    """A tiny llama that splits over 2 ranks (2 layers, 4 q heads over 2 kv heads) with an odd
    vocabulary (321: a padded vocab shard), under root/model, and three adapters of it with
    ranks `ranks` (seeds 1-3): "all" on TP_TARGETS, "attn" on q, v and o, "mlp" on gate, down
    and lm_head. Returns (model folder, {name: adapter folder})."""
    folder = make_model(root / "model", "llama", hidden=hidden, layers=2, heads=4, kv_heads=2,
                        inter=inter, vocab_size=321)
    targets = {"all": list(TP_TARGETS), "attn": ["q_proj", "v_proj", "o_proj"],
               "mlp": ["gate_proj", "down_proj", "lm_head"]}
    return folder, {name: make_adapter(folder, root / name, rank=r, targets=t, seed=seed)
                    for seed, ((name, t), r) in enumerate(zip(targets.items(), ranks), start=1)}
