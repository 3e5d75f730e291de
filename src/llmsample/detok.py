"""Incremental detokenisation that is safe for UTF-8 and SentencePiece, and stop-string matching.

Decoding one token at a time is wrong twice over: a byte-level token may hold half of a multibyte character,
and SentencePiece drops the ``▁`` space of a token decoded on its own. So each step decodes a short window that
starts a few tokens back and emits only what the new token added, holding it back while it ends in an
incomplete character (U+FFFD).
"""

from __future__ import annotations

from typing import Any, Sequence

CONTEXT_TOKENS = 6  # prompt tokens that give the first generated token its context


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text each one completes.

    >>> class Bytes:  # a byte-level toy tokenizer: one token per byte
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return bytes(ids).decode("utf-8", errors="replace")
    >>> d = IncrementalDetokenizer(Bytes(), prompt_ids=[])
    >>> [d.add(b) for b in "天".encode()]
    ['', '', '天']
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], hidden: frozenset = frozenset()):
        self.tokenizer = tokenizer
        self.hidden = hidden  # control tokens that are not text (token_text.control_token_ids): never printed
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # start of the decoding window
        self.read = len(self.ids)  # tokens before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes ('' while a character is incomplete)."""
        if token_id in self.hidden:
            return ""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        # The tokens just emitted become the context of the next window.
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character becomes U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one appears.

    The stop string itself is never emitted. Stop strings are looked for only from the first non-whitespace
    character on: a model that opens with the stop string (a base model often starts with "\\n\\n", the
    dialogue preset's stop) would otherwise end the run before it said anything. The leading whitespace is emitted.

    >>> m = StopMatcher(["\\n\\n"])
    >>> m.feed("\\n\\n"), m.feed("Hello\\n"), m.feed("\\nWorld")
    (('\\n\\n', False), ('Hello', False), ('', True))
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.started = False  # whether non-whitespace text has come (stop strings count only from there)

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(safe_to_emit, stopped)``."""
        if not self.stops:
            return text, False
        lead = ""
        if not self.started:
            body = text.lstrip()
            lead, text = text[: len(text) - len(body)], body
            self.started = bool(body)
        emit, stopped = self._match(text)
        return lead + emit, stopped

    def _match(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            first = min(i for i, _ in hits)
            emit, self.pending = self.pending[:first], ""
            return emit, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        emit = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return emit, False

    def flush(self) -> str:
        """At the end, what was held back was not a stop string after all."""
        out, self.pending = self.pending, ""
        return out
