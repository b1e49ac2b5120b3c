"""Requests, their sampling parameters and their outputs.

A `Request` owns its counters (prompt length, tokens computed, tokens generated) and every
other part of the engine reads them through properties, so there is one place that says where a
request stands.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
from dataclasses import dataclass, field


class ValidationError(ValueError):
    """A request field holds a value we cannot serve. The message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512
MAX_LOGIT_BIAS = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18  # beyond any vocabulary served here (Llama 3's is 128256)
MAX_BAD_WORDS_IDS = 256  # token sequences: a word gives one or two (with a leading space)
MAX_BAD_WORD_TOKENS = 64
# Temperatures below this choose greedily, as 0 does (SGLang's sampling epsilon): logits divided
# by a tiny one overflow float32 to ±inf (or divide by 0, under 1.4e-45), which draws nonsense.
GREEDY_TEMPERATURE = 1e-6


@dataclass
class SamplingParams:
    """Per-request sampling. Names follow SGLang's `sampling_params` object."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # passed to the tokenizer's decode with skip_special_tokens (tokenizers that ignore it,
    # such as the fast ones, decode as they always do)
    spaces_between_special_tokens: bool = True
    # token id -> a value added to its logit before choosing (OpenAI's and SGLang's
    # logit_bias; JSON keys arrive as strings of digits)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # the only ids that may be chosen (vLLM's allowed_token_ids); None: every id
    allowed_token_ids: list[int] | None = None
    # token sequences that may not be generated (vLLM's bad_words, tokenized by the API): the
    # last id of each is banned where the output so far ends with the ones before it
    bad_words_ids: list[list[int]] = field(default_factory=list)
    # max_new_tokens is the default, not a number the client asked for: past the context it
    # is lowered to the room left instead of refusing the request (Engine._fit_context)
    is_max_new_tokens_default: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {
                # ASCII digits only: str.isdigit also passes "²", which int() refuses
                int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: v
                for k, v in self.logit_bias.items()
            }

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    @property
    def reads_outputs(self) -> bool:
        """Whether choosing a token reads the tokens generated before it (penalties, bad
        words of several tokens): the next step then waits for this one's tokens."""
        return self.has_penalties or any(len(w) > 1 for w in self.bad_words_ids)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValidationError naming the first field whose value is out of range."""
        _check_int("max_new_tokens", self.max_new_tokens, lo=0, hi=1 << 20)
        _check_int("min_new_tokens", self.min_new_tokens, lo=0, hi=1 << 20)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValidationError("min_new_tokens", "must not exceed max_new_tokens")
        _check_float("temperature", self.temperature, lo=0.0, hi=100.0)
        _check_float("top_p", self.top_p, lo=0.0, hi=1.0)
        if self.top_p == 0.0:
            raise ValidationError("top_p", "must be in (0, 1]")
        _check_int("top_k", self.top_k, lo=-1, hi=1 << 30)
        if self.top_k == 0:
            raise ValidationError("top_k", "must be -1 (disabled) or at least 1")
        _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, hi=100.0)
        if self.repetition_penalty == 0.0:
            raise ValidationError("repetition_penalty", "must be greater than 0")
        _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=-(1 << 63), hi=(1 << 64) - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise ValidationError("stop", "must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValidationError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not s:
                raise ValidationError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValidationError(
                    "stop", f"a stop string is over {MAX_STOP_STRING_CHARS} characters"
                )
        if len(self.stop_token_ids) > 1024:
            raise ValidationError("stop_token_ids", "at most 1024 ids")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0, hi=(vocab_size - 1) if vocab_size else 1 << 31)
        if not isinstance(self.logit_bias, dict):
            raise ValidationError("logit_bias", "must map token ids to numbers")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValidationError("logit_bias", f"at most {MAX_LOGIT_BIAS} token ids")
        for t, b in self.logit_bias.items():
            _check_int("logit_bias", t, lo=0, hi=(vocab_size - 1) if vocab_size else 1 << 31)
            _check_float("logit_bias", b, lo=-100.0, hi=100.0)
        if len(self.bad_words_ids) > MAX_BAD_WORDS_IDS:
            raise ValidationError("bad_words", f"at most {MAX_BAD_WORDS_IDS // 2} words")
        for word in self.bad_words_ids:
            if not word or len(word) > MAX_BAD_WORD_TOKENS:
                raise ValidationError("bad_words", f"each word must be 1 to "
                                      f"{MAX_BAD_WORD_TOKENS} tokens, got {len(word)}")
            for t in word:
                _check_int("bad_words", t, lo=0, hi=(vocab_size - 1) if vocab_size else 1 << 31)
        if self.allowed_token_ids is not None:
            allowed = self.allowed_token_ids
            if not isinstance(allowed, list) or not allowed:
                raise ValidationError("allowed_token_ids", "must be a non-empty list of token ids")
            if len(allowed) > MAX_ALLOWED_TOKEN_IDS:
                raise ValidationError("allowed_token_ids", f"at most {MAX_ALLOWED_TOKEN_IDS} ids")
            for t in allowed:
                _check_int("allowed_token_ids", t, lo=0,
                           hi=(vocab_size - 1) if vocab_size else 1 << 31)
        if not isinstance(self.ignore_eos, bool):
            raise ValidationError("ignore_eos", "must be a boolean")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValidationError("skip_special_tokens", "must be a boolean")
        if not isinstance(self.spaces_between_special_tokens, bool):
            raise ValidationError("spaces_between_special_tokens", "must be a boolean")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got {value}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got {value}")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"  # aborted by the client, a disconnect, or an error


@dataclass
class RequestOutput:
    """What the engine hands back after each step a request took part in.

    `new_token_ids` are the tokens produced since the last output; `finished` is set once,
    on the last output, together with `finish_reason` (and `matched_stop` for stop hits).
    """

    rid: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    prompt_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None
    cached_tokens: int = 0
    # With return_logprob, on the output that carries the first token: the log-prob of each
    # prompt token given the tokens before it (None for the first), and the top candidates.
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    # with prompt_ranks: each scored prompt token's rank in its distribution (1: the likeliest)
    input_ranks: list[int | None] | None = None
    # with token_ids_logprob: its ids' log-probs at each new token and, on the output that
    # carries the prompt's logprobs, at each prompt position (empty where none was scored)
    new_ids_logprobs: list[list[float]] | None = None
    input_ids_logprobs: list[list[float]] | None = None


_rid_counter = itertools.count()

# Stands in output_ids for a token a launched step is still sampling (never a real token id).
PENDING_TOKEN = -1


def new_rid() -> str:
    return f"req-{next(_rid_counter)}-{time.monotonic_ns() & 0xFFFFFF:06x}"


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, what it generated, its KV blocks and its adapter."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # the prompt tokens' own number of top candidates (None: top_logprobs_num's) and whether
    # each scored prompt token's rank is counted (vLLM's prompt_logprobs)
    prompt_top_n: int | None = None
    prompt_ranks: bool = False
    # SGLang's token_ids_logprob: with return_logprob, these ids' log-probs at every scored
    # prompt position and every output token (the raw distribution's, as logprobs)
    token_ids_logprob: list[int] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # the key of the adapter version it holds (AdapterManager.key_of) when that is not
    # lora_name: a load in place gave the name a new version after this request took the old
    adapter_key: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    error: str | None = None  # why an aborted request was aborted
    error_retryable: bool = False  # that reason was transient (a machine read error): a 503
    first_token_time: float | None = None
    last_token_time: float | None = None
    admitted_time: float | None = None
    num_sent_tokens: int = 0  # output tokens already handed out
    outputs: asyncio.Queue[RequestOutput] | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=lambda: [None])
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=lambda: [[]])
    input_ranks: list[int | None] = field(default_factory=lambda: [None])  # with prompt_ranks
    # with token_ids_logprob: the ids' log-probs at each prompt position (empty before the
    # scored ones)
    input_ids_logprobs: list[list[float]] = field(default_factory=lambda: [[]])
    generator: object | None = None  # torch.Generator for seeded sampling
    lora_slot: int = -1  # GPU slot of the adapter for the current step; -1: base model
    passed_over: int = 0  # scheduling rounds this request waited while others were admitted
    # Output tokens still being sampled by a launched step: the last `num_pending` entries of
    # output_ids are PENDING_TOKEN until that step's tokens reach the host.
    num_pending: int = 0
    # the prefix cache (BlockManager): vLLM's cache_salt (requests share cached blocks only
    # with requests of the same salt), the digests of its full blocks, the digest they chain
    # from, and how many of its blocks are registered
    cache_salt: str | None = None
    block_digests: list[bytes] = field(default_factory=list)
    digest_root: bytes | None = None
    num_registered_blocks: int = 0
    cached_tokens: int = 0  # prompt tokens its first admission took from the prefix cache

    @property
    def adapter(self) -> str | None:
        """The key of the adapter version this request runs with (None: the base model)."""
        return self.lora_name if self.adapter_key is None else self.adapter_key

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_resolved_outputs(self) -> int:
        """Output tokens known on the host (not counting those a launched step still samples)."""
        return len(self.output_ids) - self.num_pending

    @property
    def resolved_output_ids(self) -> list[int]:
        return self.output_ids[: self.num_resolved_outputs]

    def add_pending(self) -> int:
        """Reserve the next output token for a launched step; returns its index in output_ids."""
        self.output_ids.append(PENDING_TOKEN)
        self.num_pending += 1
        return len(self.output_ids) - 1

    def resolve(self, index: int, token: int) -> None:
        """The launched step that owns output `index` produced `token`."""
        assert self.output_ids[index] == PENDING_TOKEN and self.num_pending > 0
        assert index == self.num_resolved_outputs, "steps resolve in launch order"
        self.output_ids[index] = token
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished before they arrived)."""
        if self.num_pending:
            del self.output_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt + output, without concatenating the whole
        sequence (a decode step asks for one token of a possibly long one)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : start - p + n]
        return self.prompt_ids[start : start + n] + self.output_ids[: max(0, start + n - p)]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def awaits_finish(self) -> bool:
        """Its prompt is all computed or in flight and it samples nothing (max_new_tokens 0):
        the step in flight finishes it."""
        return self.params.max_new_tokens == 0 and self.num_computed_tokens >= self.num_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last token still needs its K/V computed."""
        out = len(self.output_ids)  # the properties inlined: the scheduler asks every row
        return out == 0 or len(self.prompt_ids) + out - self.num_computed_tokens > 1

    @property
    def prompt_top_logprobs_num(self) -> int:
        """How many top candidates each scored prompt token lists."""
        return self.top_logprobs_num if self.prompt_top_n is None else self.prompt_top_n

    def prompt_logprob_positions(self, start: int, n: int) -> range:
        """Positions p in [start, start+n) whose logits score prompt token p+1 and are not
        scored yet (a recompute after preemption scores nothing twice, and the tokens before
        the submit's `logprob_start` come pre-filled with None)."""
        if not self.return_logprob:
            return range(0)
        lo = max(start, len(self.input_logprobs) - 1)
        return range(lo, min(start + n, self.num_prompt_tokens - 1))

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
