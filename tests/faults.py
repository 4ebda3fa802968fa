"""Faults injected into the engine, for the tests that show one request's failure is its own."""

from __future__ import annotations

POISON = 999  # a prompt holding this token id gets NaN logits


def poisoned(logits_packed, failing_position: int | None = None):
    """``logits_packed`` giving NaN logits to every token read from a segment that holds ``POISON``, and to the token at
    ``failing_position``."""

    def wrapper(input_ids, positions, segments, cache, last):
        logits = logits_packed(input_ids, positions, segments, cache, last)
        bad, start = positions[last] == failing_position, 0
        for segment in segments:
            end = start + segment.num_tokens
            if (input_ids[start:end] == POISON).any():
                bad |= (last >= start) & (last < end)
            start = end
        logits[bad] = float("nan")
        return logits

    return wrapper
