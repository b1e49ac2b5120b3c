"""Incremental detokenization with stop-string trimming.

Text is decoded over a short window of recent tokens, so each step costs O(window), and a
window whose text ends in U+FFFD (an incomplete UTF-8 sequence) is held until the next token
completes it. Text that could be the start of a stop string is held back too, so a stream never
sends characters it later has to take back; the stop string itself is cut from the output, and
so is a stop token (a stop token id or EOS) that ended the generation, unless trimming is off
(`no_stop_trim`).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


class TextStream:
    """Turns a growing list of output token ids into text that only ever grows."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool = True,
                 stop: list[str] | None = None, trim_stop: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = list(stop or []) if trim_stop else []
        self.trim_stop = trim_stop
        self.token_ids: list[int] = []
        self._decoded = ""  # stable text of token_ids[:read_offset]
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # what has been handed out: a prefix of every later `text`
        self.is_stopped = False  # a stop string was found; nothing more is emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=self.spaces_between_special_tokens)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(_REPLACEMENT)):
            self._decoded += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)

    def push(self, new_token_ids: list[int], finished: bool = False,
             matched_stop: int | str | None = None) -> str:
        """Add tokens; return the text newly safe to show (a delta, possibly empty)."""
        if finished and self.trim_stop and _is_token(matched_stop) and new_token_ids:
            new_token_ids = new_token_ids[:-1]  # the stop token that ended it is not text
        self.token_ids.extend(new_token_ids)
        if self.is_stopped:
            return ""
        self._advance(final=finished)
        visible = self._visible(finished, matched_stop)
        delta = visible[len(self.text):] if visible.startswith(self.text) else ""
        self.text += delta
        return delta

    def _visible(self, finished: bool, matched_stop: int | str | None) -> str:
        text = self._decoded
        cut = self._first_stop(text, matched_stop if isinstance(matched_stop, str) else None)
        if cut is not None:
            self.is_stopped = True
            return text[:cut]
        if finished:
            return text
        return text[:len(text) - self._held_back(text)]

    def _first_stop(self, text: str, matched: str | None) -> int | None:
        stops = self.stop + ([matched] if matched and self.stop else [])
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


def _is_token(matched_stop: int | str | None) -> bool:
    return isinstance(matched_stop, int) and not isinstance(matched_stop, bool)
