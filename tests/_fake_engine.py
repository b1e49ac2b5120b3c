"""A test double of `runtime.engine.Engine` for the HTTP tests, and the tiny tokenizer/model the
API tests share.

The real engine (on a tiny random Llama) serves the API tests. The fake stays for what the real
engine cannot easily be made to do on demand: a full queue (QueueFullError -> 503) and a text
chosen in advance (stop strings inside multi-byte characters, exact streaming deltas).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from runtime.config import ServerConfig
from runtime.errors import (
    AdapterError,
    EngineStoppedError,
    QueueFullError,
    UnknownAdapterError,
    ValidationError,
)
from runtime.request import FinishReason, Request, RequestOutput, SamplingParams, new_rid

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(path: Path):
    """A byte-level tokenizer (one token per byte, plus a few merges) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama with the tiny tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def build_tiny_adapter(model_path: Path, path: Path, rank: int = 4) -> Path:
    """A random PEFT LoRA adapter on q_proj and v_proj of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                  target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(path)
    return path


@dataclass
class FakeModelInfo:
    model_path: str
    served_model_name: str
    context_length: int
    vocab_size: int
    dtype: str = "float32"
    device: str = "cpu"
    is_lora_enabled: bool = True
    max_lora_rank: int | None = 8
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class FakeAdapterInfo:
    name: str
    path: str
    tier: str
    pinned: bool
    rank: int
    target_modules: tuple[str, ...]
    refs: int
    unloading: bool = False
    replaced: bool = False


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int


@dataclass
class _Live:
    request: Request
    script: list[int]
    text_so_far: str = ""
    task: asyncio.Task | None = None
    aborted: bool = False
    done: bool = False
    extra: dict = field(default_factory=dict)


class FakeEngine:
    """Follows the Engine contract; generates the tokens of `script` in a loop, one per
    `step_s`. Stop strings, stop token ids, EOS and max_new_tokens behave as in the engine."""

    def __init__(self, config: ServerConfig, tokenizer, script: str = "Hello wörld 🙂 the end. ",
                 step_s: float = 0.001, context_length: int = 256) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(script)
        self.step_s = step_s
        self.model_info = FakeModelInfo(config.model_path, config.model_name, context_length,
                                        len(tokenizer))
        self.adapters: dict[str, FakeAdapterInfo] = {
            s.lora_name: FakeAdapterInfo(s.lora_name, s.lora_path, "gpu", s.pinned, 4,
                                         ("q_proj", "v_proj"), 0)
            for s in config.lora_paths
        }
        self.live: dict[str, _Live] = {}
        self.is_running = False
        self.is_stopped = False
        self.submitted: list[Request] = []
        self.logprob_starts: dict[str, int] = {}  # rid -> the logprob_start it was given
        # rid -> (prompt_top_logprobs_num, prompt_logprob_ranks) it was given (submit_many)
        self.prompt_asks: dict[str, tuple[int | None, bool]] = {}
        self.hold = asyncio.Event()  # cleared: requests wait before their first token
        self.hold.set()

    @classmethod
    def from_config(cls, config: ServerConfig, metrics=None) -> FakeEngine:
        from transformers import AutoTokenizer

        return cls(config, AutoTokenizer.from_pretrained(config.model_path))

    async def start(self) -> None:
        self.is_running = True

    async def stop(self, drain_timeout: float = 0.0) -> None:
        self.is_stopped = True
        if drain_timeout > 0:
            tasks = [lv.task for lv in self.live.values() if lv.task]
            await asyncio.wait(tasks, timeout=drain_timeout) if tasks else None
        for rid in list(self.live):
            self.abort(rid)

    async def submit(self, prompt_ids: list[int], params: SamplingParams,
                     lora_name: str | None = None, rid: str | None = None,
                     return_logprob: bool = False, top_logprobs_num: int = 0,
                     logprob_start: int = 1) -> Request:
        """As Engine.submit; it scores no prompt token, so `logprob_start` is only kept
        (`logprob_starts`, by rid) for tests of what the routes ask for."""
        if self.is_stopped:
            raise EngineStoppedError("engine is stopped")
        params.validate(self.model_info.vocab_size)
        if not prompt_ids:
            raise ValidationError("prompt", "must not be empty")
        if len(prompt_ids) >= self.model_info.context_length:
            raise ValidationError("prompt", "longer than the context")
        if rid is not None and rid in self.live:
            raise ValidationError("rid", f"{rid!r} is already in use")
        if lora_name is not None and lora_name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {lora_name!r}")
        if len(self.live) >= self.config.max_queued_requests:
            raise QueueFullError("too many queued requests")
        req = Request(rid or new_rid(), list(prompt_ids), params, lora_name, return_logprob,
                      top_logprobs_num)
        req.outputs = asyncio.Queue()
        self.logprob_starts[req.rid] = logprob_start
        live = _Live(req, self.script)
        self.live[req.rid] = live
        self.submitted.append(req)
        if lora_name:
            self.adapters[lora_name].refs += 1
        live.task = asyncio.create_task(self._run(live))
        return req

    async def submit_many(self, items) -> list[Request]:
        """As Engine.submit_many, all or none: one submit each, the ones already submitted
        aborted when an item fails."""
        reqs: list[Request] = []
        try:
            for it in items:
                reqs.append(await self.submit(it.prompt_ids, it.params, it.lora_name, it.rid,
                                              it.return_logprob, it.top_logprobs_num,
                                              it.logprob_start))
                self.prompt_asks[reqs[-1].rid] = (it.prompt_top_logprobs_num,
                                                  it.prompt_logprob_ranks)
        except BaseException:
            for req in reqs:
                self.abort(req.rid)
            raise
        return reqs

    async def _run(self, live: _Live) -> None:
        req, p = live.request, live.request.params
        await self.hold.wait()
        limit = min(p.max_new_tokens, self.model_info.context_length - req.num_prompt_tokens)
        while not live.aborted:
            await asyncio.sleep(self.step_s)
            if live.aborted:
                return
            tok = live.script[req.num_output_tokens % len(live.script)]
            req.output_ids.append(tok)
            reason, matched = self._check_stop(live, tok, limit)
            self._emit(req, [tok], reason, matched)
            if reason is not None:
                return

    def _check_stop(self, live: _Live, tok: int,
                    limit: int) -> tuple[FinishReason | None, int | str | None]:
        req, p = live.request, live.request.params
        if tok in p.stop_token_ids or (tok == self.tokenizer.eos_token_id and not p.ignore_eos):
            return FinishReason.STOP, tok
        text = self.tokenizer.decode(req.output_ids)
        for s in p.stop:
            if s in text:
                return FinishReason.STOP, s
        if req.num_output_tokens >= limit:
            return FinishReason.LENGTH, None
        return None, None

    def _emit(self, req: Request, toks: list[int], reason: FinishReason | None,
              matched: int | str | None, error: str | None = None) -> None:
        lps = [-0.5 - 0.01 * i for i in range(len(toks))] if req.return_logprob else None
        tops = None
        if req.return_logprob and req.top_logprobs_num:
            tops = [[(t, -0.5), ((t + 1) % len(self.tokenizer), -1.5)][:req.top_logprobs_num]
                    for t in toks]
        out = RequestOutput(req.rid, toks, list(req.output_ids), req.num_prompt_tokens,
                            finished=reason is not None, finish_reason=reason,
                            matched_stop=matched, new_logprobs=lps, new_top_logprobs=tops,
                            error=error)
        assert req.outputs is not None
        req.outputs.put_nowait(out)
        if reason is not None:
            self._finish(req.rid)

    def _finish(self, rid: str) -> None:
        live = self.live.pop(rid, None)
        if live is not None:
            live.done = True
            if live.request.lora_name in self.adapters:
                self.adapters[live.request.lora_name].refs -= 1

    async def stream(self, request: Request) -> AsyncIterator[RequestOutput]:
        assert request.outputs is not None
        finished = False
        try:
            while not finished:
                out = await request.outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request.rid)

    def abort(self, rid: str) -> bool:
        live = self.live.get(rid)
        if live is None:
            return False
        live.aborted = True
        if live.task is not None:
            live.task.cancel()
        self._emit(live.request, [], FinishReason.ABORT, None, error="aborted")
        return True

    async def load_adapter(self, name: str, path: str, pinned: bool = False,
                           inplace: bool = False) -> None:
        if name in self.adapters and not inplace:
            raise AdapterError(f"adapter {name!r} is already loaded")
        if not Path(path).exists():
            raise AdapterError(f"no adapter at {path!r}")
        self.adapters[name] = FakeAdapterInfo(name, path, "host", pinned, 4,
                                              ("q_proj", "v_proj"), 0)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        while self.adapters[name].refs:
            await asyncio.sleep(0.001)
        del self.adapters[name]

    def list_adapters(self) -> list[FakeAdapterInfo]:
        return list(self.adapters.values())

    def flush_cache(self) -> int:
        return 0

    def loaded_adapters(self) -> dict[str, str]:
        return {a.name: a.path for a in self.adapters.values()}

    def stats(self) -> FakeStats:
        return FakeStats(len(self.live), 0, len(self.live), 100)


def describe(obj: object, key: str | None = None) -> object:
    """The shape of a JSON value: keys and types, not contents (for golden files).

    The OpenAI completions `top_logprobs` entries are maps keyed by token text: their keys are
    content, so they are described as one generic `<token>` key."""
    if isinstance(obj, dict):
        if key == "top_logprobs" and all(isinstance(v, (int, float)) for v in obj.values()):
            return {"<token>": "number"} if obj else {}
        return {k: describe(v, k) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [describe(obj[0], key)] if obj else []
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, (int, float)):
        return "number"
    if obj is None:
        return "null"
    return type(obj).__name__


def dump(obj: object) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
