"""Each token's own raw bytes, for the `bytes` of OpenAI's chat logprobs.

A token may hold part of a multi-byte UTF-8 character (an emoji is often 4 byte tokens): its
decoded text is then U+FFFD, whose bytes say nothing, while the token's own bytes let a client
join the tokens back into the text. The bytes come from the token's piece in the vocabulary:
- byte-level BPE (GPT-2's alphabet: every byte is a printable character): each character of
  the piece maps back to the byte it stands for;
- sentencepiece with byte fallback: a piece `<0xE2>` is that byte; other pieces are their text
  with U+2581 as a space.
Special and added tokens are their text's UTF-8 bytes. A tokenizer of another kind (WordPiece,
a slow tokenizer without a `tokenizers` backend, ...) gives its tokens' decoded text's UTF-8
bytes, as before: its pieces carry no raw bytes we can recover.
"""

from __future__ import annotations

import enum
import json
import re
from types import MappingProxyType
from typing import Any

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_SPACE = "\u2581"


class PieceKind(enum.Enum):
    BYTE_LEVEL = "byte_level"
    BYTE_FALLBACK = "byte_fallback"
    TEXT = "text"  # no raw bytes: the decoded text's UTF-8 bytes


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level alphabet reversed: printable bytes stand for themselves, the others
    (controls, space, 0x7F-0xA0, 0xAD) for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in chars]
    chars.update({b: chr(0x100 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


BYTE_OF_CHAR = MappingProxyType(_byte_level_alphabet())


def piece_kind(tokenizer: Any) -> PieceKind:
    """How `tokenizer`'s pieces hold bytes, from the decoder of its `tokenizers` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return PieceKind.TEXT
    try:
        state = json.loads(decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return PieceKind.TEXT
    types = {d.get("type") for d in state.get("decoders") or [state]}
    if "ByteLevel" in types:
        return PieceKind.BYTE_LEVEL
    if "ByteFallback" in types:
        return PieceKind.BYTE_FALLBACK
    return PieceKind.TEXT


class TokenBytes:
    """Called with a token id: its raw bytes, as a list of ints (OpenAI's `bytes`). Built once
    per tokenizer (the app holds one)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind = piece_kind(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added_ids = frozenset(int(i) for i in added)

    def __call__(self, token_id: int) -> list[int]:
        return list(self.raw(token_id))

    def raw(self, token_id: int) -> bytes:
        if self.kind is PieceKind.TEXT or token_id in self.added_ids:
            return self._text_bytes(token_id)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):  # an id past the tokenizer's (a padded vocabulary)
            return self._text_bytes(token_id)
        if self.kind is PieceKind.BYTE_LEVEL:
            if all(c in BYTE_OF_CHAR for c in piece):
                return bytes(BYTE_OF_CHAR[c] for c in piece)
            return self._text_bytes(token_id)
        m = _BYTE_PIECE.match(piece)
        if m is not None:
            return bytes([int(m.group(1), 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode()

    def _text_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.decode([token_id]).encode()
