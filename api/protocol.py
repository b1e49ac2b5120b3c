"""Request bodies as msgspec Structs. Unknown fields are ignored; a known field of the wrong
type fails decoding with its path in the message (`$.sampling_params.top_k`).

Every optional field accepts JSON null as "not given", since clients often send nulls.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from aiohttp import web

from api.errors import OPENAI_FIELDS
from runtime.request import SamplingParams

T = TypeVar("T")


class NativeSampling(msgspec.Struct):
    """The native `sampling_params` object; names as in SamplingParams and SGLang's.

    `max_new_tokens` left out is the default (128, lowered to the room left in the context);
    JSON null asks for no limit but the context, as on SGLang. Every other null is "not given".
    """

    max_new_tokens: int | None | msgspec.UnsetType = msgspec.UNSET
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name for seed
    logit_bias: dict[str, float] | None = None
    no_stop_trim: bool | None = None
    n: int | None = None  # samples per input (api/native.py expands them)
    stream_interval: int | None = None  # tokens between streamed chunks (api/native.py)
    # SGLang's fields that change the output and that loraserve does not implement: decoded
    # whatever their type, so that setting one is a 400 naming it (api/native.py), never
    # served as if it were absent
    stop_regex: Any = None
    json_schema: Any = None
    regex: Any = None
    ebnf: Any = None
    structural_tag: Any = None
    custom_params: Any = None

    def to_params(self, seed_offset: int = 0) -> SamplingParams:
        """The engine's parameters; sample `seed_offset` of n draws with seed + seed_offset
        (wrapped past the largest seed, as on the OpenAI routes), so the samples differ but
        repeat."""
        is_default = self.max_new_tokens is msgspec.UNSET or self.max_new_tokens is None
        return _sampling_params(
            self, self.sampling_seed if self.seed is None else self.seed, seed_offset,
            max_new_tokens=NO_TOKEN_LIMIT if self.max_new_tokens is None else (
                None if self.max_new_tokens is msgspec.UNSET else self.max_new_tokens),
            min_new_tokens=self.min_new_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            is_max_new_tokens_default=is_default)


# `max_new_tokens: null`: no limit but the context (the engine lowers it to the room left)
NO_TOKEN_LIMIT = 1 << 20


class GenerateRequest(msgspec.Struct):
    """The /generate body, SGLang's GenerateReqInput. Fields SGLang does not have are
    ignored; SGLang's own fields are all decoded, and those loraserve does not implement are
    refused by name when set (api/native.py: UNSUPPORTED_FIELDS)."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: NativeSampling | list[NativeSampling] | None = None
    lora_path: str | list[str | None] | None = None
    stream: bool | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    # with return_logprob, these ids' log-probs at each prompt position and output token: one
    # list for every input, or a list of lists aligned with the inputs
    token_ids_logprob: list[int | list[int]] | None = None
    # Asked-for properties that already hold here: no prefix cache is shared between requests
    # (cache_salt, extra_key), no request's text is ever logged (no_logs), and there is one
    # data-parallel rank, 0 (routed_dp_rank and its old name data_parallel_rank).
    cache_salt: str | list[str] | None = None
    extra_key: str | list[str] | None = None
    no_logs: bool | None = None
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    # Hints SGLang documents as such (prefill/decode disaggregation, KV routing), which change
    # no output; there is nothing here to act on them.
    disagg_prefill_dp_rank: int | None = None
    kv_router_hint: dict[str, Any] | None = None
    # Refused when set to anything but SGLang's default (api/native.py: UNSUPPORTED_FIELDS).
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    mm_hashes: Any = None
    mm_content_hashes: Any = None
    use_audio_in_video: Any = None
    video_config: Any = None
    modalities: Any = None
    return_sampling_mask: Any = None
    return_flat_raw_top_logprobs: Any = None
    return_flat_raw_top_logprobs_b64: Any = None
    log_metrics: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    routed_experts_start_len: Any = None
    return_indexer_topk: Any = None
    session_id: Any = None
    session_params: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    positional_embed_overrides: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    decode_tp_size: Any = None
    routing_key: Any = None
    conversation_id: Any = None
    http_worker_ipc: Any = None
    background: Any = None
    require_reasoning: Any = None
    max_thinking_tokens: Any = None
    priority: Any = None
    custom_labels: Any = None
    return_bytes: Any = None
    return_entropy: Any = None
    return_prompt_token_ids: Any = None
    external_trace_header: Any = None
    received_time: Any = None
    need_wait_for_mm_inputs: Any = None
    num_items_assigned: Any = None
    encoder_urls: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    image_max_dynamic_patch: Any = None
    video_max_dynamic_patch: Any = None
    images_config: Any = None
    multi_item_delimiter_indices: Any = None


class AbortRequest(msgspec.Struct):
    rid: str | None = None
    abort_all: bool = False


class TokenizeRequest(msgspec.Struct):
    """SGLang's /tokenize (text, or prompt as vLLM names it) and vLLM's chat form (messages,
    rendered with the chat template as /v1/chat/completions renders them)."""

    text: str | list[str] | None = None
    prompt: str | list[str] | None = None
    add_special_tokens: bool | None = None  # default: true for a text, false for messages
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False  # vLLM's: each token's string as well


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]
    skip_special_tokens: bool = False


class LoadAdapterRequest(msgspec.Struct):
    lora_name: str
    lora_path: str
    pinned: bool = False
    # vLLM's: replace a loaded lora_name with the adapter at lora_path; requests already
    # holding the old version finish on it (AdapterManager.load)
    load_inplace: bool = False


class UnloadAdapterRequest(msgspec.Struct):
    lora_name: str


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    # vLLM's and SGLang's: with include_usage, every chunk carries the usage so far
    continuous_usage_stats: bool | None = None
    # OpenAI's: random padding in each chunk against length side channels (a hint, README)
    include_obfuscation: bool | None = None


class OpenAISampling(msgspec.Struct):
    """Fields shared by /v1/completions and /v1/chat/completions: OpenAI's, and the extensions
    vLLM's and SGLang's OpenAI servers take. Each is served, refused by name when set to
    anything but a value that asks for nothing (api/openai.py: UNSUPPORTED_FIELDS), or a hint
    the README lists."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    best_of: int | None = None  # refused unless it equals n (choices are not ranked)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string) -> bias, -100..100
    # extensions (vLLM and SGLang accept these on their OpenAI routes too)
    allowed_token_ids: list[int] | None = None  # vLLM's: only these ids may be chosen
    bad_words: list[str] | None = None  # vLLM's: words that may not be generated
    # vLLM's: each prompt token's logprob and rank, and its k likeliest candidates
    prompt_logprobs: int | None = None
    top_k: int | None = None  # 0 or -1: the whole vocabulary, as on vLLM
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None  # SGLang's name for include_stop_str_in_output
    include_stop_str_in_output: bool | None = None
    # the prompt's last k tokens (its first with truncation_side "right"); -1: the context
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    add_special_tokens: bool | None = None  # default: completions true, chat false
    stream_interval: int | None = None  # output tokens between streamed chunks
    rid: str | None = None  # SGLang's name for the engine request's id
    request_id: str | None = None  # vLLM's; the answer's id is then "cmpl-<request_id>"
    # SGLang's: the adapter when `model` names none ("<base>:<adapter>" wins); a list gives
    # each prompt of a completion its own, null the base model
    lora_path: str | list[str | None] | None = None
    # Hints that change no output (README): the end user, for abuse monitoring (any value,
    # as clients send what they like), and prefix-cache isolation, which already holds here
    # (no prefix cache is shared between requests)
    user: Any = None
    cache_salt: str | list[str] | None = None
    extra_key: str | list[str] | None = None
    # SGLang's data-parallel routing: one rank here, 0 (others are refused); and its hints
    # for prefill/decode disaggregation and n-gram speculation, which change no output
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None
    ngram_corpus_id: str | list[str | None] | None = None
    # vLLM's options of its render endpoints, which its generation routes ignore by its own
    # description
    return_token_offsets: bool | None = None
    return_mm_kwargs: bool | None = None
    # OpenAI's structured outputs: only {"type": "text"} is served (api/openai.py)
    response_format: dict[str, Any] | None = None
    # Fields that would change the output or the answer's shape and that loraserve does not
    # implement: decoded whatever their type so that setting one is refused by name
    # (api/openai.py: UNSUPPORTED_FIELDS), never served as if it were absent.
    service_tier: Any = None
    store: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    logprob_token_ids: Any = None
    watermarking: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    regex: Any = None
    json_schema: Any = None
    ebnf: Any = None
    structural_tag: Any = None
    stop_regex: Any = None
    custom_logit_processor: Any = None
    custom_params: Any = None
    logits_processors: Any = None
    vllm_xargs: Any = None
    repetition_detection: Any = None
    thinking_token_budget: Any = None
    priority: Any = None
    session_id: Any = None
    session_params: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None
    return_prompt_text: Any = None
    return_hidden_states: Any = None
    return_routed_experts: Any = None
    routed_experts_start_len: Any = None
    routed_experts_prompt_start: Any = None
    return_cached_tokens_details: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    mm_processor_kwargs: Any = None
    media_io_kwargs: Any = None
    images_config: Any = None
    custom_labels: Any = None

    def to_params(self, max_new_tokens: int, seed_offset: int) -> SamplingParams:
        # n > 1 with a seed: choice i uses seed + i, so the choices differ but repeat
        return _sampling_params(self, self.seed, seed_offset, max_new_tokens=max_new_tokens,
                               min_new_tokens=self.min_tokens,
                               allowed_token_ids=self.allowed_token_ids,
                               top_k=-1 if self.top_k == 0 else self.top_k,
                               spaces_between_special_tokens=self.spaces_between_special_tokens)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every streamed chunk carries the usage so far."""
        options = self.stream_options
        return options is not None and bool(options.include_usage
                                            and options.continuous_usage_stats)

    @property
    def trim_stop(self) -> bool:
        """Whether the stop string (or stop token) that ended a choice is cut from its text."""
        return not (self.no_stop_trim or self.include_stop_str_in_output)

    @property
    def field_names(self) -> dict[str, str]:
        """The engine's names of the fields this request spelled otherwise -> its names (an
        error names the field the client sent)."""
        return dict(OPENAI_FIELDS)


# SamplingParams' fields that both APIs name as SamplingParams does
_SHARED_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
    "logit_bias",
)


def _sampling_params(body: Any, seed: int | None, seed_offset: int,
                    **given: Any) -> SamplingParams:
    """SamplingParams from `body`'s fields of _SHARED_SAMPLING_FIELDS and `given`, a None being
    "not given"; the seed is seed + seed_offset, wrapped past the largest seed (2**64 - 1)."""
    fields = {name: getattr(body, name) for name in _SHARED_SAMPLING_FIELDS} | given
    fields["seed"] = None if seed is None else _wrapped_seed(seed + seed_offset)
    return SamplingParams(**{k: v for k, v in fields.items() if v is not None})


def _wrapped_seed(seed: int) -> int:
    return seed - (1 << 64) if seed >= 1 << 64 else seed


class CompletionRequest(OpenAISampling):
    prompt: str | list[str | int | list[int]] = ""
    logprobs: int | None = None
    echo: bool | None = None
    suffix: Any = None  # refused when set (api/openai.py)
    prompt_embeds: Any = None  # vLLM's; refused when set


class ChatRequest(OpenAISampling):
    messages: list[dict[str, Any]] = []
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # default true; false with continue_final_message
    continue_final_message: bool | None = None
    # vLLM's: the answer starts with the last message's text when it has the answer's role
    echo: bool | None = None
    # passed to the chat template, which must read them (api/openai.py: _template_fields)
    documents: list[dict[str, Any]] | None = None
    reasoning_effort: str | float | None = None
    # Hints that change no output (README): tool calls that are refused anyway, OpenAI's
    # caching and abuse-monitoring keys, a predicted output (it only makes OpenAI's answer
    # faster), and SGLang's reasoning split, which without a reasoning parser leaves the whole
    # answer in `content`, as here
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    separate_reasoning: bool | None = None
    stream_reasoning: bool | None = None
    # Refused when set (api/openai.py: UNSUPPORTED_CHAT_FIELDS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    include_reasoning: Any = None
    reasoning: Any = None
    task: Any = None
    input_ids: Any = None
    return_prompt_token_ids: Any = None
    return_meta_info: Any = None
    max_dynamic_patch: Any = None
    min_dynamic_patch: Any = None
    use_audio_in_video: Any = None

    @property
    def field_names(self) -> dict[str, str]:
        names = super().field_names
        if self.max_completion_tokens is not None:  # it wins over max_tokens
            names["max_new_tokens"] = "max_completion_tokens"
        names["prompt"] = "messages"  # the prompt is the rendered messages
        return names


class ScoreRequest(msgspec.Struct):
    """The /v1/score body, SGLang's: the probability of each label token right after
    query + item (item + query with item_first), for each item; text or token ids, not mixed.
    `model` names the base model or an adapter as on the OpenAI routes."""

    query: str | list[int] | None = None
    items: str | list[str | list[int]] | None = None
    label_token_ids: list[int] | None = None
    apply_softmax: bool = False  # normalise over the labels, not the whole vocabulary
    item_first: bool = False
    model: str | None = None


async def decode_body(request: web.Request, kind: type[T]) -> T:
    """Read and decode the JSON body (raises msgspec errors; 413 past client_max_size)."""
    body = await request.read()
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except RecursionError:  # thousands of nested arrays: the client's mistake, not ours
        raise msgspec.DecodeError("JSON is nested too deeply") from None
