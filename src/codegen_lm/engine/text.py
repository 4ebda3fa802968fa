"""Incremental detokenization with stop strings: text is released only at character boundaries and never when it
could still turn out to be the start of a stop string, so a stream never takes text back."""

from __future__ import annotations

from collections.abc import Sequence as SequenceT
from typing import Any

class TextStream:
    """Incremental detokenization: yields text only at character boundaries, and holds back a tail that
    could still grow into a stop string. ``text`` is everything decoded so far (cut before a stop string).

    Each step decodes only a short window of ids (the previous step's tokens for context, then the new ones),
    so a long completion costs the same per token as a short one."""

    def __init__(self, tokenizer: Any, stop: SequenceT[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._context = self._read = 0  # ids[_context:_read] were decoded last time and give the window its context
        self._searched = 0  # text[:_searched] holds no stop string

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None or not self._decode(final=False):
            return ""  # id-level generation, or a multi-byte character is still incomplete
        return self._cut_or_hold()

    def flush(self) -> str:
        """The text not yet emitted (at the end of a sequence, including an incomplete character's ``\ufffd``)."""
        head = ""
        if self.tokenizer is not None and not self.stopped and self._read < len(self.ids):
            self._decode(final=True)
            head = self._cut_or_hold()
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return head + delta

    def _decode(self, final: bool) -> bool:
        window = self.tokenizer.decode(self.ids[self._context :])
        if window.endswith("\ufffd") and not final:
            return False
        context = self.tokenizer.decode(self.ids[self._context : self._read]) if self._read > self._context else ""
        self.text += window[len(context) :]
        self._context, self._read = self._read, len(self.ids)
        return True

    def _cut_or_hold(self) -> str:
        text = self.text
        found = [i for s in self.stop if (i := text.find(s, max(0, self._searched - len(s) + 1))) >= 0]
        self._searched = len(text)
        if found:
            self.text, self.stopped = text[: min(found)], True
            return self.flush()
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        delta = text[self.emitted : len(text) - hold]
        self.emitted += len(delta)
        return delta
