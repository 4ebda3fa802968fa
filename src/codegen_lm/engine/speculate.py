"""Speculative decoding: several tokens per read of the weights, with exactly the same outputs.

At batch 1 a decode step reads every weight to produce one token. Here a proposer guesses the next few tokens of a
sequence, the target model computes all of them in one forward pass (the step's other rows beside), and the guesses
it would have produced itself are kept, plus one token of its own. Proposers:

- ``ngram``: the longest recent n-gram of the sequence found earlier in its prompt or output, and the tokens that
  followed it there (code repeats itself: identifiers, argument lists, the previous method's shape). Free to draft.
- ``draft``: a smaller CodeGen checkpoint (all twelve share one tokenizer: 350M drafts for 2B, 6B, 16B), with its own
  KV cache.
- ``self-int4`` / ``self-int8``: the same checkpoint quantized, drafting for itself: no second download.

Exactness: greedy rows keep proposals while they equal the target's argmax. Sampled rows with deterministic
(n-gram) proposals draw from the target at each position, one uniform per token as without speculation, and keep
proposals while the draw agrees: the same tokens as without speculation, seed for seed. Sampled rows with draft
proposals use rejection sampling (Leviathan et al. 2023, Chen et al. 2023): the output distribution is exactly the
target's. Only kept tokens are ever appended, so streams never take text back and rejected positions leave no
trace in any cache (a row's keys count only up to its kept tokens).

Speculation adapts: a sequence whose proposals keep failing (twice in a row for n-gram lookup, once for a draft
model) stops proposing for a while (the pause grows fourfold each time it fails again), and a step proposes only
while the batch leaves room under ``max_step_tokens``, past which a step is bound by compute rather than by reading
the weights and extra tokens are no longer nearly free. A draft model's proposals cost a draft step each, so their
length follows what the last verify step kept (one more than the kept run after a rejection, two more after a full
acceptance, up to ``num_tokens``); n-gram proposals are free and always go up to ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import CodeGenForCausalLM, KVCache, Segment
from .sampling import draw_uniforms, kept_probs, pick

METHODS = ("ngram", "draft", "self-int4", "self-int8")
# Tokens one step may carry before extra ones stop being nearly free (the step turns compute-bound). CPU: measured on
# the 350M shape with 2 threads (bench/speculate.py, docs/benchmarks.md); CUDA: not measured here.
DEFAULT_MAX_STEP_TOKENS = {"cpu": 16, "cuda": 256}
# Verify steps in a row that keep nothing before a pause: n-gram proposals cost only their verification; a draft
# model's cost its own steps as well, so one failure pauses it.
FAILURES_BEFORE_PAUSE = {"ngram": 2, "draft": 1}
# Steps without proposals after such failures: 4, then 4x longer each time they fail again, back to 4 after any kept
# token. A proposer that never holds, such as an unrelated draft, then costs 1-3 % of a 64-token completion on the
# 350M shape with 2 CPU threads in fp32, against the same weight layouts without proposals (6-7 % in the layouts of
# plain decoding, where a check of 4 tokens cost 0.57 of a step; bench/speculate.py, docs/benchmarks.md).
FIRST_PAUSE, PAUSE_GROWTH, LONGEST_PAUSE = 4, 4, 64


def draft_seed(seed: int) -> int:
    """The seed of a sequence's draft generator: derived from the sequence's own (reproducible) but a different 32-bit
    value, since torch's CPU generator keeps only the low 32 bits of a seed (seed + 2**32 would repeat its draws)."""
    mixed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64  # a 64-bit LCG step
    return (mixed >> 32) ^ 0x9E3779B9


@dataclass(frozen=True)
class SpeculativeConfig:
    """``method`` (``METHODS``), ``num_tokens`` proposed at most per step, ``draft_model`` (a checkpoint, for
    ``draft``), ``ngram`` (the longest n-gram looked up)."""

    method: str
    num_tokens: int = 4
    draft_model: str | None = None
    ngram: int = 4
    max_step_tokens: int | None = None  # None: the device's measured default

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.num_tokens < 1:
            raise ValueError(f"the number of speculative tokens must be at least 1 (got {self.num_tokens})")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("--speculative draft needs --draft-model PATH, and --draft-model goes with --speculative "
                             "draft only")
        if self.ngram < 1:
            raise ValueError(f"the n-gram length must be at least 1 (got {self.ngram})")


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None = None  # the draft's sampling distributions [len(tokens), vocab] (sampled rows only)


@dataclass
class SpeculationState:
    """What speculation keeps per sequence."""

    ngrams: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> end of its latest earlier occurrence
    indexed: int = 0  # tokens whose n-grams are in ``ngrams``
    failures: int = 0  # verify steps in a row that kept nothing
    pause: int = 0  # steps left without proposals
    next_pause: int = FIRST_PAUSE
    draft_length: int = 0  # a draft model's next proposal length (0: not yet set, num_tokens)
    proposed: int = 0
    accepted: int = 0
    draft_row: int | None = None
    draft_computed: int = 0  # tokens whose keys and values are in the draft's row
    draft_generator: torch.Generator | None = None


class Speculator:
    """Proposes, verifies and adapts, for one scheduler (``draft`` is the draft model for ``draft``/``self-*``)."""

    def __init__(self, config: SpeculativeConfig, model: CodeGenForCausalLM, vocab_limit: int,
                 draft: CodeGenForCausalLM | None = None):
        self.config, self.model, self.draft, self.vocab_limit = config, model, draft, vocab_limit
        device = model.device.type
        self.max_step_tokens = config.max_step_tokens or DEFAULT_MAX_STEP_TOKENS.get(device, 16)
        self.draft_cache: KVCache | None = None
        self.free_rows: list[int] = []

    # -- proposing -----------------------------------------------------------------------------------------

    def propose(self, seqs: list[Any], room: int) -> dict[Any, Proposal]:
        """Proposals for some of the decoding ``seqs`` (``_Sequence``), ``room`` extra tokens in all."""
        wanted: list[tuple[Any, int]] = []
        for seq in seqs:
            state = seq.speculation
            if state.pause:
                state.pause -= 1
                continue
            longest = state.draft_length or self.config.num_tokens  # (draft_length stays 0 for n-gram lookup)
            count = min(longest, room, seq.request.params.max_new_tokens - len(seq.token_ids) - 1)
            if count >= 1:
                wanted.append((seq, count))
                room -= count
        if not wanted:
            return {}
        if self.draft is None:
            proposals = {seq: Proposal(self._ngram(seq, count)) for seq, count in wanted}
        else:
            proposals = self._draft(wanted)
        return {seq: p for seq, p in proposals.items() if p.tokens}

    def _ngram(self, seq: Any, count: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the sequence's longest recent n-gram."""
        tokens, state = seq.tokens(), seq.speculation
        for end in range(state.indexed + 1, len(tokens)):  # n-grams ending before ``end``, followed by tokens[end]
            for n in range(1, min(self.config.ngram, end) + 1):
                state.ngrams[tuple(tokens[end - n : end])] = end
        state.indexed = max(state.indexed, len(tokens) - 1)
        for n in range(min(self.config.ngram, len(tokens) - 1), 0, -1):
            end = state.ngrams.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : end + count]
        return []

    @torch.inference_mode()
    def _draft(self, wanted: list[tuple[Any, int]]) -> dict[Any, Proposal]:
        """``count`` tokens from the draft model for each sequence: one packed forward per proposed token, the first
        catching each row up with the tokens the draft has not seen."""
        draft, device = self.draft, self.draft.device
        for seq, _ in wanted:
            self._ensure_row(seq)
        steps = max(count for _, count in wanted)
        tokens = {seq: [] for seq, _ in wanted}
        dists: dict[Any, list[torch.Tensor]] = {seq: [] for seq, _ in wanted}
        for _ in range(steps):
            active = [(seq, count) for seq, count in wanted if len(tokens[seq]) < count]
            ids, positions, segments, last = [], [], [], []
            for seq, _ in active:
                state = seq.speculation
                known = seq.tokens() + tokens[seq]
                feed = known[state.draft_computed :]
                ids += feed
                positions += range(state.draft_computed, len(known))
                segments.append(Segment(state.draft_row, 1, len(feed), len(known),
                                        aligned=state.draft_computed == 0))
                last.append(len(ids) - 1)
                state.draft_computed = len(known)
            logits = draft.logits_packed(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                         segments, self.draft_cache, torch.tensor(last, device=device))
            vocab = self.model.config.vocab_size
            for (seq, _), row in zip(active, logits):
                row = _fit(row, vocab)
                row[self.vocab_limit :] = float("-inf")
                params = seq.request.params
                if params.greedy:
                    tokens[seq].append(int(row.argmax()))
                    continue
                q = kept_probs(row[None], [params])[0]
                q = q / q.sum()
                draw = torch.rand((), generator=seq.speculation.draft_generator)
                tokens[seq].append(int(pick(q[None], draw[None])))
                dists[seq].append(q)
        return {seq: Proposal(tokens[seq], torch.stack(dists[seq]) if dists[seq] else None) for seq, _ in wanted}

    def _ensure_row(self, seq: Any) -> None:
        """A row of the draft's cache for ``seq``; the cache grows as the target's does (rows and length doubling)."""
        state = seq.speculation
        if state.draft_row is not None:
            return
        limit = self.draft.config.n_positions
        needed = min(len(seq.request.prompt_ids) + seq.request.params.max_new_tokens, limit)
        old = self.draft_cache
        rows, length = (old.batch_size, old.max_len) if old is not None else (0, 0)
        new_rows = rows if self.free_rows else max(2, 2 * rows)
        new_length = length if length >= needed else min(max(needed, 2 * length), limit)
        if (new_rows, new_length) != (rows, length):
            self.draft_cache = (old.resized(new_rows, new_length) if old is not None
                                else KVCache(self.draft.config, new_rows, new_length, self.draft.dtype, self.draft.device))
            self.free_rows += range(new_rows - 1, rows - 1, -1)
        state.draft_row = self.free_rows.pop()
        state.draft_computed = 0
        state.draft_generator = torch.Generator().manual_seed(draft_seed(seq.seed))

    # -- verifying -----------------------------------------------------------------------------------------

    def verify(self, seq: Any, logits: torch.Tensor, proposal: Proposal) -> list[int]:
        """The tokens to append: kept proposals, then one of the target's own (so all but the last were kept).
        ``logits`` ``[k + 1, vocab]`` are the target's at the sequence's last token and at each proposed one (padding
        rows already masked)."""
        params, proposed = seq.request.params, proposal.tokens
        if params.greedy:
            targets = logits.argmax(dim=-1).tolist()
            kept = 0
            while kept < len(proposed) and targets[kept] == proposed[kept]:
                kept += 1
            return proposed[:kept] + [targets[kept]]
        if proposal.q is None:  # deterministic proposals: sample position by position, keep while they agree
            out = []
            for j in range(len(proposed) + 1):
                token = int(pick(kept_probs(logits[j : j + 1], [params]), draw_uniforms([params], [seq.generator])))
                out.append(token)
                if j == len(proposed) or token != proposed[j]:
                    return out
        p = kept_probs(logits, [params] * len(logits))
        p = p / p.sum(dim=-1, keepdim=True)
        out = []
        for j, x in enumerate(proposed):  # rejection sampling
            q = proposal.q[j]
            if float(torch.rand((), generator=seq.generator)) * float(q[x]) < float(p[j, x]):
                out.append(x)
                continue
            residual = (p[j] - q).clamp(min=0)
            residual = residual if float(residual.sum()) > 0 else p[j]
            return out + [int(pick(residual[None], torch.rand((), generator=seq.generator)[None]))]
        return out + [int(pick(p[-1:], torch.rand((), generator=seq.generator)[None]))]

    def settle(self, seq: Any, proposed: int, kept: int) -> None:
        """Bookkeeping after a verify step that kept ``kept`` of ``proposed`` tokens: counts, the pause after repeated
        failures, a draft's next proposal length, the draft's row rolled back to the sequence's tokens."""
        state = seq.speculation
        state.proposed += proposed
        state.accepted += kept
        if kept:
            state.failures, state.next_pause = 0, FIRST_PAUSE
        else:
            state.failures += 1
            if state.failures >= FAILURES_BEFORE_PAUSE["ngram" if self.draft is None else "draft"]:
                state.pause, state.failures = state.next_pause, 0
                state.next_pause = min(PAUSE_GROWTH * state.next_pause, LONGEST_PAUSE)
        if state.draft_row is not None:  # the draft saw the sequence's tokens, then its own proposals
            state.draft_computed = min(state.draft_computed, seq.length - 1)
            longest = self.config.num_tokens
            state.draft_length = min(longest, (state.draft_length or longest) + 2) if kept == proposed else kept + 1

    def release(self, seq: Any) -> None:
        state = seq.speculation
        if state.draft_row is not None:
            self.free_rows.append(state.draft_row)
            state.draft_row = None


def _fit(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """A draft's logits over the target's vocabulary (their logit rows may differ past the tokenizer's tokens)."""
    if logits.shape[-1] >= vocab:
        return logits[..., :vocab]
    return torch.cat([logits, logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))], dim=-1)
