"""Incremental detokenization and stop-string trimming (api/textstream.py), and exact streamed
text through HTTP with the fake engine, whose output text is chosen in advance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api import create_app
from api.app import ENGINE
from api.textstream import TextStream
from api.tokenbytes import BYTE_OF_CHAR, PieceKind, TokenBytes
from metrics import ServingMetrics
from runtime.config import ServerConfig
from tests._fake_engine import FakeEngine, build_tiny_tokenizer

TEXT = "Hello wörld 🙂 the end. "


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def feed(stream: TextStream, ids: list[int], matched: str | None = None) -> list[str]:
    deltas = [stream.push([t]) for t in ids[:-1]]
    return [*deltas, stream.push(ids[-1:], finished=True, matched_stop=matched)]


def test_never_emits_partial_utf8(tok) -> None:
    ids = tok.encode(TEXT)
    deltas = feed(TextStream(tok), ids)
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)
    # multi-byte characters really were split across tokens
    assert any("\ufffd" in tok.decode([t]) for t in ids)


def test_stop_string_held_back_and_cut(tok) -> None:
    ids = tok.encode(TEXT)
    stream = TextStream(tok, stop=["the end"])
    deltas = feed(stream, ids, matched="the end")
    assert "".join(deltas) == "Hello wörld 🙂 "
    assert not any("th" in d for d in deltas)  # a possible stop prefix is never sent early


def test_stop_inside_text_before_finish(tok) -> None:
    stream = TextStream(tok, stop=["wö"])
    out = "".join(stream.push([t]) for t in tok.encode(TEXT))
    assert out == "Hello " and stream.is_stopped


def test_no_stop_trim_and_special_tokens(tok) -> None:
    ids = tok.encode("ab") + [tok.eos_token_id]
    assert "".join(feed(TextStream(tok, stop=["b"], trim_stop=False), ids, "b")) == "ab"
    kept = "".join(feed(TextStream(tok, skip_special_tokens=False), ids))
    assert kept == "ab<|im_end|>"


def test_false_stop_prefix_is_released(tok) -> None:
    stream = TextStream(tok, stop=["the end!"])
    assert "".join(feed(stream, tok.encode(TEXT))) == TEXT


@pytest.fixture
async def fake_client(aiohttp_client, tmp_path: Path):
    build_tiny_tokenizer(tmp_path)
    config = ServerConfig(model_path=str(tmp_path), served_model_name="fake")
    metrics = ServingMetrics()
    return await aiohttp_client(create_app(FakeEngine.from_config(config, metrics), config,
                                           metrics))


async def test_streamed_deltas_add_up(fake_client) -> None:
    r = await fake_client.post("/v1/completions", json={
        "prompt": "x", "max_tokens": 40, "stream": True, "stop": ["end"]})
    text = await r.text()
    chunks = [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == "Hello wörld 🙂 the "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    r = await fake_client.post("/generate", json={"text": "x", "stream": True, "sampling_params":
                                                  {"max_new_tokens": 40, "stop": "end"}})
    chunks = [json.loads(b[6:]) for b in (await r.text()).split("\n\n") if b.startswith("data: {")]
    assert chunks[-1]["text"] == "Hello wörld 🙂 the "
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "end"}
    assert all("\ufffd" not in c["text"] for c in chunks)


async def test_chat_logprob_bytes_are_the_tokens_own(fake_client) -> None:
    """Chat logprobs `bytes` hold each token's raw bytes, also for a token that holds part of
    a multi-byte character (they were U+FFFD's bytes): joined, they are the text."""
    n = len(fake_client.app[ENGINE].script)
    for stream in (False, True):
        r = await fake_client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": n, "logprobs": True,
            "top_logprobs": 2, "stream": stream})
        if stream:
            chunks = [json.loads(b[6:]) for b in (await r.text()).split("\n\n")
                      if b.startswith("data: {")]
            content = [c for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                       for c in ch["choices"][0]["logprobs"]["content"]]
        else:
            content = (await r.json())["choices"][0]["logprobs"]["content"]
        assert len(content) == n
        assert bytes(b for c in content for b in c["bytes"]).decode() == TEXT
        partial = [c for c in content if c["token"] == "\ufffd"]
        assert len(partial) == 6  # ö in 2 tokens, 🙂 in 4
        assert all(len(c["bytes"]) == 1 and c["bytes"] != list("\ufffd".encode())
                   for c in partial)
        # the fake engine's first candidate is the token itself: its bytes too
        assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)


def test_token_bytes_of_each_tokenizer_kind(tok) -> None:
    """Byte-level BPE pieces map back through the byte alphabet; sentencepiece byte-fallback
    pieces <0xNN> are that byte and others their text with U+2581 as a space; special tokens
    and tokenizers of no known kind give their decoded text's bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert set(BYTE_OF_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(BYTE_OF_CHAR.values()) == list(range(256))
    byte_level = TokenBytes(tok)
    assert byte_level.kind is PieceKind.BYTE_LEVEL
    ids = tok.encode(TEXT)
    assert b"".join(byte_level.raw(t) for t in ids) == TEXT.encode()
    assert byte_level.raw(tok.eos_token_id) == b"<|im_end|>"

    vocab = {"<unk>": 0, "\u2581the": 1, "é": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    fallback = TokenBytes(PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>"))
    assert fallback.kind is PieceKind.BYTE_FALLBACK
    assert fallback(3 + 0xE2) == [0xE2] and fallback(1) == list(b" the")
    assert fallback.raw(2) == "é".encode()  # not byte 0xE9, which é stands for in byte-level

    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    wp.decoder = decoders.WordPiece()
    text = TokenBytes(PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]"))
    assert text.kind is PieceKind.TEXT and text(1) == list(b"hi")


async def test_unknown_adapter_maps_to_404_and_400(fake_client) -> None:
    r = await fake_client.post("/v1/chat/completions", json={
        "model": "ghost", "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    r = await fake_client.post("/generate", json={"text": "x", "lora_path": "ghost"})
    assert r.status == 400


def test_dashboard_queries_known_metrics() -> None:
    import re

    dash = json.loads((Path(__file__).parents[1] / "metrics" / "grafana_dashboard.json")
                      .read_text())
    m = ServingMetrics()
    m.request_admitted("a", 0.1, "gpu")
    m.first_token("a", 0.1)
    m.inter_token("a", 0.01)
    m.request_finished("a", 3, 4, 1.0, "stop")
    m.adapter_loaded("gpu", 0.01)
    text = m.render()[0].decode()
    exported = set(re.findall(r"^(loraserve:[a-z_:]+)", text, re.MULTILINE))
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"loraserve:[a-z_:]+", target["expr"]):
                assert name in exported, (panel["title"], name)


async def test_routes_score_only_the_prompt_logprobs_they_answer(fake_client) -> None:
    """The engine is asked for the prompt's logprobs only where the answer carries them: on
    /generate from the token after logprob_start_len (whose own is null; the default -1 asks
    for none), all of them for an OpenAI echo, none for any other OpenAI answer."""
    engine = fake_client.app[ENGINE]
    prompt = [5, 6, 7, 8, 9]

    async def start_of(route: str, body: dict) -> int:
        before = len(engine.submitted)
        r = await fake_client.post(route, json=body)
        assert r.status == 200, await r.text()
        (req,) = engine.submitted[before:]
        return engine.logprob_starts[req.rid]

    native = {"input_ids": prompt, "return_logprob": True, "sampling_params": {"max_new_tokens": 1}}
    assert await start_of("/generate", native) == len(prompt)  # the last token's own is null
    assert await start_of("/generate", native | {"logprob_start_len": 0}) == 1
    assert await start_of("/generate", native | {"logprob_start_len": 2}) == 3
    completion = {"prompt": prompt, "max_tokens": 1, "logprobs": 1}
    assert await start_of("/v1/completions", completion) == len(prompt)
    assert await start_of("/v1/completions", completion | {"echo": True}) == 1
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "logprobs": True}
    before = len(engine.submitted)
    assert (await fake_client.post("/v1/chat/completions", json=chat)).status == 200
    (req,) = engine.submitted[before:]
    assert engine.logprob_starts[req.rid] == req.num_prompt_tokens
    # vLLM's prompt_logprobs: the whole prompt, its own number of candidates and ranks (with
    # an echo's logprobs, the larger of the two numbers)
    assert await start_of("/v1/completions", completion | {"prompt_logprobs": 0}) == 1
    assert engine.prompt_asks[engine.submitted[-1].rid] == (0, True)
    await start_of("/v1/completions", completion | {"echo": True, "prompt_logprobs": 0})
    assert engine.prompt_asks[engine.submitted[-1].rid] == (1, True)
    await start_of("/v1/completions", completion | {"echo": True, "logprobs": None,
                                                    "prompt_logprobs": 3})
    assert engine.prompt_asks[engine.submitted[-1].rid] == (3, True)
    assert engine.logprob_starts[engine.submitted[-1].rid] == 1
    assert await start_of("/v1/completions", {"prompt": prompt, "max_tokens": 1,
                                              "echo": True}) == len(prompt)
    assert engine.prompt_asks[engine.submitted[-1].rid] == (None, False)
    before = len(engine.submitted)
    r = await fake_client.post("/v1/chat/completions", json=chat | {"prompt_logprobs": 2})
    assert r.status == 200, await r.text()
    (req,) = engine.submitted[before:]
    assert engine.logprob_starts[req.rid] == 1 and engine.prompt_asks[req.rid] == (2, True)
