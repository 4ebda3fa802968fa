"""Continuous batching over one preallocated KV cache.

A request asks for ``n`` samples of one prompt. Its prompt is computed once (by its first sequence, the leader) and
the other samples copy it. Requests join and leave between steps, each with its own sampling settings, stop
strings and limits; every sequence draws from its own seeded generator, so what it produces does not depend on
what else is in the batch (up to float rounding between batch shapes).

A step packs, into one forward pass, one token for every decoding sequence and chunks of the prompts being
prefilled (``prefill_chunk`` tokens at most while others decode, so that a long prompt never freezes the streams
of others; the weights are read once for both). Before a prompt is computed, the longest prefix of it that the
engine has already computed (in the prefix cache, or in a running sequence's row) is copied into its row, and
every chunk computed is added to the prefix cache at once, so an abort between chunks keeps what was done.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import CodeGenForCausalLM, KVCache, Segment
from ..tokenizer import CODEGEN_TOKENS
from .compiled import compiled_decode_step, idle_caches, static_decode_shapes
from .prefix_cache import PrefixCache, common_length, device_memory, kv_bytes_per_token
from .sampling import SamplingParams, draw_uniforms, sample
from .speculate import Proposal, SpeculationState, SpeculativeConfig, Speculator
from .text import TextStream

# Prompt tokens a step computes while other sequences decode (their next token waits for the whole step).
# CPU: on the 350M shape (2 threads) a decode step takes ~55 ms and a prompt token ~2.8 ms, so 32 keeps a
# step within ~3x of a plain decode step (docs/benchmarks.md). CUDA: vLLM's order of magnitude (not measured here).
DEFAULT_PREFILL_CHUNK = {"cpu": 32, "cuda": 512}
IDLE_CHUNKS = 8  # with no sequence decoding there is no stream to stall: prefill 8 chunks at once


def default_prefill_chunk(device: torch.device) -> int:
    return DEFAULT_PREFILL_CHUNK.get(device.type, DEFAULT_PREFILL_CHUNK["cpu"])


@dataclass
class Completion:
    """One finished sample: its text (cut before a stop string), its token ids, and why it ended."""

    text: str
    token_ids: list[int]  # ends with EOS when generation stopped there
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed
    forward_passes: int = 0  # steps that produced tokens (several each when speculation kept proposals)
    proposed_tokens: int = 0  # speculative proposals verified
    accepted_tokens: int = 0  # of them, kept


@dataclass
class SequenceOutput:
    """What one sequence produced in one scheduler step."""

    request_id: str
    index: int  # which of the request's n samples
    text: str  # new text since the last output (never a partial character or part of a stop string)
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "error" when the request failed (``error`` says why)
    completion: Completion | None = None  # set when finished (not for "error")
    error: str | None = None
    cached_tokens: int = 0  # of the request's prompt (reused, not computed)


class GenerationError(RuntimeError):
    """A request failed while its tokens were processed (non-finite logits, sampling, decoding, stop strings). The
    scheduler ends that request alone; every other request goes on as if it had never come."""


@dataclass
class SchedulerStats:
    """Counts since the scheduler started (the server exports them as metrics)."""

    prompt_tokens_computed: int = 0
    prompt_tokens_reused: int = 0
    steps: int = 0
    decode_rows: int = 0  # a decoding sequence in a forward pass (a row-step)
    decode_tokens: int = 0  # tokens those rows appended (more than one each when speculation keeps proposals)
    proposed_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    waiting: int  # samples not yet given a cache row
    leader: _Sequence | None = None  # the sequence that computes the prompt
    cached_tokens: int = 0
    first_logits: torch.Tensor | None = None  # the prompt's last logits, once computed
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # prompt keys/values, kept while samples wait without a leader


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int
    seed: int
    generator: torch.Generator
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    computed: int = 0  # tokens whose keys and values are in the sequence's row
    forward_passes: int = 0
    speculation: SpeculationState = field(default_factory=SpeculationState)

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.token_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.request.prompt_ids)

    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.token_ids


@dataclass
class _Plan:
    """One step's work: the packed tokens, their segments, and whose logits are read."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    chunks: dict[int, int] = field(default_factory=dict)  # row -> prompt tokens computed this step
    reads: list[tuple[_Sequence, int, int]] = field(default_factory=list)  # (sequence, first packed index, count)
    proposals: dict[_Sequence, Proposal] = field(default_factory=dict)  # speculated tokens to verify


class Scheduler:
    """Continuous batching: ``add_request``, then ``step`` until ``has_unfinished`` is false.

    Cache rows ``[0, len(running))`` hold the running sequences; a finished sequence's row is refilled with the last
    one. With ``compile=True`` steps that only decode run through ``compiled_decode_step``. ``prefix_cache`` (shared
    by the schedulers of one model, e.g. through ``Generator``) keeps computed prefixes across requests and
    schedulers; without it nothing is reused between requests.
    """

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16, eos_token_id: int | None = None,
                 compile: bool = False, prefix_cache: PrefixCache | None = None, prefill_chunk: int | None = None,
                 speculative: SpeculativeConfig | None = None, draft: CodeGenForCausalLM | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        prefill_chunk = default_prefill_chunk(model.device) if prefill_chunk is None else prefill_chunk
        if prefill_chunk < 1:
            raise ValueError(f"the prefill chunk must be at least 1 token (got {prefill_chunk})")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.prefix_cache, self.prefill_chunk = prefix_cache, prefill_chunk
        self._compiled_step = compiled_decode_step(model) if compile else None
        self._static_shapes = compile and static_decode_shapes(model.device)  # CUDA graphs: see _forward
        self.config = model.config
        self.eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        # Released models have 51200 logit rows for 50295 tokens: the padding rows must never be sampled. Without a
        # tokenizer (id-level generation) the CodeGen tokenizer's size is the limit.
        tokens = len(tokenizer) if tokenizer is not None else CODEGEN_TOKENS
        self.vocab_limit = min(tokens, self.config.vocab_size)
        self.speculative, self.draft = speculative, draft
        self.speculator = Speculator(speculative, model, self.vocab_limit, draft) if speculative else None
        self.cache: KVCache | None = None
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.requests: dict[str, _Request] = {}
        self.stats = SchedulerStats()
        self._ids = itertools.count()

    @property
    def compile(self) -> bool:
        return self._compiled_step is not None

    def fresh(self) -> Scheduler:
        """A scheduler with this one's settings and nothing in flight (a server starts afresh after a failed step)."""
        return Scheduler(self.model, self.tokenizer, self.max_batch, self.eos_token_id, self.compile, self.prefix_cache,
                         self.prefill_chunk, self.speculative, self.draft)

    # -- requests --------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; checks it fully before any work starts."""
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("text prompts and stop strings need a tokenizer; pass token ids or give the scheduler a tokenizer")
        prompt_ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token of text")
        limit = self.config.n_positions
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} exceeds the model's "
                f"{limit} positions; shorten the prompt or lower max_new_tokens"
            )
        if max(prompt_ids) >= self.config.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = _Request(request_id, prompt_ids, params, waiting=params.n)
        self.requests[request_id] = request
        base_seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        for index in range(params.n):
            generator = torch.Generator().manual_seed(base_seed + index)
            self.waiting.append(_Sequence(request, index, base_seed + index, generator,
                                          TextStream(self.tokenizer, params.stop)))
        return request_id

    @torch.inference_mode()
    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its rows are freed at once; what it computed stays in the prefix
        cache."""
        if request_id not in self.requests:
            return
        self.waiting = deque(s for s in self.waiting if s.request.id != request_id)
        for row in reversed(range(len(self.running))):
            if self.running[row].request.id == request_id:
                self._keep(row)
                self._free_row(row)
        del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- stepping --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """Admit waiting sequences into free rows, then one forward pass: a token for every decoding sequence (and
        its speculated tokens) and the next chunks of prompts being prefilled; then sample."""
        outputs = self._admit()
        plan = self._plan()
        if plan.ids:
            logits = self._forward(plan)
            self._advance(plan)
            plain, plain_logits, offset = [], [], 0
            for seq, _, count in plan.reads:
                rows, offset = logits[offset : offset + count], offset + count
                if not seq.token_ids:  # a prompt just completed: its samples start from its last logits
                    seq.request.first_logits = rows[0].clone()
                else:
                    seq.computed += 1  # the token fed this step is in the cache now
                    self.stats.decode_rows += 1
                    self.stats.decode_tokens += seq not in plan.proposals  # (speculating rows count in _verify)
                seq.forward_passes += 1
                if seq in plan.proposals:
                    outputs += self._verify(seq, rows, plan.proposals[seq])
                else:
                    plain.append(seq)
                    plain_logits.append(rows[0])
            if plain:
                outputs += self._append_all(plain, torch.stack(plain_logits))
            outputs += self._admit(siblings_only=True)  # samples of a prompt completed this step start now
        self._release_prefixes()
        self._free_finished()
        for request_id in [r.id for r in self.requests.values() if r.waiting == 0 and not self._has_rows(r.id)]:
            del self.requests[request_id]
        if self.cache is not None and not self.has_unfinished():  # the next scheduler takes it over
            idle_caches(self.model)[:] = [self.cache]
            self.cache = None
        self.stats.steps += 1
        return outputs

    def _has_rows(self, request_id: str) -> bool:
        return any(s.request.id == request_id for s in self.running)

    def _admit(self, siblings_only: bool = False) -> list[SequenceOutput]:
        """Give waiting sequences rows, in order: a request's first sequence computes its prompt (from the longest
        prefix computed before); the others wait until it has, then copy it and sample from its last logits."""
        admitted: list[_Sequence] = []
        skipped: list[_Sequence] = []  # samples whose prompt is not computed yet keep their place
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            seq = self.waiting.popleft()
            request = seq.request
            if request.first_logits is not None:
                admitted.append(seq)
            elif request.leader is None and not siblings_only:
                request.leader = seq
                admitted.append(seq)
            else:
                skipped.append(seq)
        self.waiting.extendleft(reversed(skipped))
        if not admitted:
            return []
        needed = max(s.request.params.max_new_tokens + len(s.request.prompt_ids) for s in admitted)
        self._ensure_cache(len(self.running) + len(admitted), needed)
        siblings = []
        for seq in admitted:
            row = len(self.running)
            self.running.append(seq)
            request = seq.request
            request.waiting -= 1
            if request.leader is seq:
                seq.computed = self._reuse(request.prompt_ids, row)
                request.cached_tokens = seq.computed
                self.stats.prompt_tokens_reused += seq.computed
            else:
                self._copy_prompt(request, row)
                seq.computed = len(request.prompt_ids)
                siblings.append(seq)
        if not siblings:
            return []
        return self._append_all(siblings, torch.stack([seq.request.first_logits for seq in siblings]))

    def _reuse(self, prompt: list[int], row: int) -> int:
        """Give ``row`` the keys and values of the longest prefix of ``prompt`` computed before (by a running
        sequence, kept in the prefix cache, or still in ``row`` from the sequence that left it: an editor's follow-up
        lands where its predecessor was); its length. Only what the row lacks is copied. The prompt's last token is
        always computed (its logits start the sampling)."""
        held = self.cache.holds.pop(row, [])
        if self.prefix_cache is None:
            return 0
        limit = len(prompt) - 1
        own = common_length(held[:limit], prompt)
        cached, slots = self.prefix_cache.match(prompt[:limit])
        best_row, best = None, cached
        for other_row, other in enumerate(self.running[:row]):
            n = common_length(other.tokens()[: min(other.computed, limit)], prompt)
            if n > best:
                best_row, best = other_row, n
        if best <= own:
            return own
        if best_row is not None:
            self.cache.copy_rows(best_row, slice(row, row + 1), best, start=own)
        else:
            self.prefix_cache.load(slots[own:], self.cache, row, start=own)
        return best

    def _copy_prompt(self, request: _Request, row: int) -> None:
        length = len(request.prompt_ids)
        leader = request.leader
        self.cache.holds.pop(row, None)
        if leader is not None and leader in self.running and not leader.prefilling:
            self.cache.copy_rows(self.running.index(leader), slice(row, row + 1), length)
        else:
            self.cache.put(row, *request.prefix)

    def _plan(self) -> _Plan:
        """A token for every decoding sequence (with speculated ones where the step has room); prompt chunks for
        those prefilling, fewest tokens left first (a short follow-up prompt is not kept waiting behind a long one),
        up to the step's budget."""
        plan = _Plan()
        prefilling = [(row, s) for row, s in enumerate(self.running) if s.prefilling]
        budget = self.prefill_chunk if len(prefilling) < len(self.running) else self.prefill_chunk * IDLE_CHUNKS
        for row, seq in sorted(prefilling, key=lambda rs: len(rs[1].request.prompt_ids) - rs[1].computed):
            if budget <= 0:
                break
            plan.chunks[row] = min(len(seq.request.prompt_ids) - seq.computed, budget)
            budget -= plan.chunks[row]
        decoding = [s for s in self.running if not s.prefilling]
        if self.speculator is not None and decoding:
            room = self.speculator.max_step_tokens - len(decoding) - sum(plan.chunks.values())
            plan.proposals = self.speculator.propose(decoding, room) if room > 0 else {}
        width = lambda s: 1 + len(plan.proposals[s].tokens) if s in plan.proposals else 1  # noqa: E731
        run: list[int] = []  # consecutive decoding rows of one width become one segment
        for row, seq in enumerate(self.running + [None]):
            if run and (seq is None or seq.prefilling or width(seq) != width(self.running[run[0]])):
                self._plan_decode(plan, run, width(self.running[run[0]]))
                run = []
            if seq is not None and not seq.prefilling:
                run.append(row)
            elif row in plan.chunks:
                self._plan_chunk(plan, row, seq, plan.chunks[row])
        return plan

    def _plan_decode(self, plan: _Plan, rows: list[int], width: int) -> None:
        starts = [self.running[r].length - 1 for r in rows]  # each row's last token, then its proposals
        for r, start in zip(rows, starts):
            seq = self.running[r]
            plan.reads.append((seq, len(plan.ids), width))
            plan.ids += [seq.token_ids[-1]] + (plan.proposals[seq].tokens if width > 1 else [])
            plan.positions += range(start, start + width)
        kv_len = max(starts) + width
        aligned = width == 1 and min(starts) == kv_len - 1
        plan.segments.append(Segment(rows[0], len(rows), width, kv_len, aligned))

    def _plan_chunk(self, plan: _Plan, row: int, seq: _Sequence, count: int) -> None:
        start = seq.computed
        plan.ids += seq.request.prompt_ids[start : start + count]
        plan.positions += range(start, start + count)
        plan.segments.append(Segment(row, 1, count, start + count, aligned=start == 0))
        if start + count == len(seq.request.prompt_ids):
            plan.reads.append((seq, len(plan.ids) - 1, 1))

    def _forward(self, plan: _Plan) -> torch.Tensor:
        """The step's forward pass; fp32 logits of the tokens read, in ``plan.reads`` order."""
        device, n = self.model.device, len(self.running)
        self._ensure_cache(n, max(s.kv_len for s in plan.segments))
        only = plan.segments[0]
        if self._compiled_step is not None and not plan.chunks and len(plan.segments) == 1 and only.width == 1:
            if self._static_shapes:  # every row decodes one token
                # Static shapes: rows padded to a power of two (the padding rows are free rows, their token at slot
                # 0), keys over the whole cache length.
                rows = min(1 << (n - 1).bit_length(), self.cache.batch_size)
                self.cache.ready(0, rows, self.cache.max_len)
                for row in range(n, rows):  # (their slot 0 is written)
                    self.cache.holds.pop(row, None)
                tokens = torch.tensor(plan.ids + [0] * (rows - n), device=device)[:, None]
                where = torch.tensor(plan.positions + [0] * (rows - n), device=device)[:, None]
                return self._compiled_step(tokens, where, self.cache, slice(0, rows), self.cache.max_len)[:n]
            # (always masked: one graph serves rows of equal and of different lengths; at one token a row the mask costs
            # nothing next to the weights)
            self.cache.ready(only.first_row, only.num_rows, only.kv_len)
            return self._compiled_step(torch.tensor(plan.ids, device=device)[:, None],
                                       torch.tensor(plan.positions, device=device)[:, None], self.cache,
                                       slice(only.first_row, only.first_row + only.num_rows), only.kv_len)
        last = [i for _, start, count in plan.reads for i in range(start, start + count)]
        return self.model.logits_packed(torch.tensor(plan.ids, device=device), torch.tensor(plan.positions, device=device),
                                        plan.segments, self.cache, torch.tensor(last, dtype=torch.long, device=device))

    def _advance(self, plan: _Plan) -> None:
        """Count the prompt chunks computed, and keep them in the prefix cache."""
        for row, count in plan.chunks.items():
            seq = self.running[row]
            seq.computed += count
            self.stats.prompt_tokens_computed += count
            if self.prefix_cache is not None:
                self.prefix_cache.insert(seq.request.prompt_ids[: seq.computed], self.cache, row)

    def _release_prefixes(self) -> None:
        for request in self.requests.values():
            leader = request.leader
            if request.waiting == 0:
                request.prefix = None
            elif (request.prefix is None and request.first_logits is not None and leader is not None
                  and leader in self.running and leader.finish_reason is not None):
                # The leader's row goes now, and samples still wait for rows: keep the prompt's keys and values.
                row, length = self.running.index(leader), len(request.prompt_ids)
                request.prefix = tuple(t.clone() for t in self.cache.span(row, 0, length))

    # -- sampling and text -----------------------------------------------------------------------------

    def _append_all(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[SequenceOutput]:
        """Sample a token for each of ``seqs`` from its row of ``logits`` and add it. A sequence whose logits, sampling
        or text fail ends its request with an error output; the others get exactly what they would have got without it
        (sampling is row-independent, and every draw is taken before any arithmetic)."""
        logits[:, self.vocab_limit :] = float("-inf")
        params = [s.request.params for s in seqs]
        draws = draw_uniforms(params, [s.generator for s in seqs])
        finite = torch.isfinite(logits[:, : self.vocab_limit]).all(dim=-1).tolist()
        failed = {i: "the model's logits hold NaN or inf" for i, ok in enumerate(finite) if not ok}
        tokens = self._sample(logits, params, draws, failed)
        outputs = [out for i in sorted(failed) for out in self._fail_request(seqs[i].request, failed[i])]
        for seq, token, row_logits in zip(seqs, tokens, logits):
            if seq.finish_reason is not None:  # failed above, or a sibling did
                continue
            try:
                outputs.append(self._append(seq, token, row_logits))
            except Exception as e:  # detokenizing, stop strings: this sequence's own text
                outputs.extend(self._fail_request(seq.request, f"processing its text failed ({type(e).__name__}: {e})"))
        return outputs

    def _verify(self, seq: _Sequence, logits: torch.Tensor, proposal: Proposal) -> list[SequenceOutput]:
        """Keep the proposals the target agrees with, and append them with one token of the target's own; stops at the
        first that ends the sequence (EOS, a stop string, the length limit). Failures are the request's alone."""
        logits[:, self.vocab_limit :] = float("-inf")
        if not torch.isfinite(logits[:, : self.vocab_limit]).all():
            return self._fail_request(seq.request, "the model's logits hold NaN or inf")
        try:
            tokens = self.speculator.verify(seq, logits, proposal)
        except Exception as e:
            return self._fail_request(seq.request, f"sampling failed ({type(e).__name__}: {e})")
        self.speculator.settle(seq, len(proposal.tokens), len(tokens) - 1)
        self.stats.proposed_tokens += len(proposal.tokens)
        self.stats.accepted_tokens += len(tokens) - 1
        outputs = []
        for j, (token, row) in enumerate(zip(tokens, logits)):
            try:
                outputs.append(self._append(seq, token, row))
            except Exception as e:  # detokenizing, stop strings: this sequence's own text
                return outputs + self._fail_request(seq.request, f"processing its text failed ({type(e).__name__}: {e})")
            self.stats.decode_tokens += 1
            if seq.finish_reason is not None:
                break
            if j < len(tokens) - 1:  # a kept proposal: it was fed with this step, so its keys and values are cached
                seq.computed += 1
        return outputs

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], draws: torch.Tensor,
                failed: dict[int, str]) -> list[int | None]:
        """``sample`` over the rows not in ``failed``; rows that make it raise, or that pick a token outside the
        vocabulary, join ``failed`` and the rest are sampled again without them."""
        tokens: list[int | None] = [None] * len(params)
        ok = [i for i in range(len(params)) if i not in failed]
        for attempt in range(2):
            if not ok:
                return tokens
            try:
                rows = logits if len(ok) == len(params) else logits[ok]
                picked = sample(rows, [params[i] for i in ok], draws[ok]).tolist()
                break
            except Exception:
                if attempt:
                    raise
                for i in ok:  # find the rows that fail on their own
                    try:
                        sample(logits[i : i + 1], [params[i]], draws[i : i + 1])
                    except Exception as e:
                        failed[i] = f"sampling failed ({type(e).__name__}: {e})"
                ok = [i for i in ok if i not in failed]
        for i, token in zip(ok, picked):
            if 0 <= token < self.vocab_limit:
                tokens[i] = token
            else:
                failed[i] = f"sampling picked token {token}, outside the vocabulary of {self.vocab_limit}"
        return tokens

    def _fail_request(self, request: _Request, message: str) -> list[SequenceOutput]:
        """End every unfinished sequence of ``request`` with an error output (their rows are freed after the step)."""
        outputs = []
        for seq in [s for s in self.running if s.request is request and s.finish_reason is None]:
            seq.finish_reason = "error"
            outputs.append(SequenceOutput(request.id, seq.index, "", [], True, "error", error=message))
        waiting = [s for s in self.waiting if s.request is request]
        self.waiting = deque(s for s in self.waiting if s.request is not request)
        request.waiting -= len(waiting)
        outputs += [SequenceOutput(request.id, s.index, "", [], True, "error", error=message) for s in waiting]
        return outputs

    def _append(self, seq: _Sequence, token: int, logits: torch.Tensor) -> SequenceOutput:
        request, params = seq.request, seq.request.params
        if params.logprobs:
            seq.logprobs.append(float(logits.log_softmax(-1)[token]))
        seq.token_ids.append(token)
        if token == self.eos_token_id and not params.ignore_eos:
            seq.finish_reason = "stop"
            text = seq.stream.flush()
        else:
            text = seq.stream.add(token)
            if seq.stream.stopped:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= params.max_new_tokens:
                seq.finish_reason = "length"
                text += seq.stream.flush()
        out = SequenceOutput(request.id, seq.index, text, [token], seq.finish_reason is not None, seq.finish_reason,
                             cached_tokens=request.cached_tokens)
        if out.finished:
            logprobs = seq.logprobs if params.logprobs else None
            out.completion = Completion(seq.stream.text, list(seq.token_ids), seq.finish_reason, logprobs,
                                        len(request.prompt_ids), request.cached_tokens, seq.forward_passes,
                                        seq.speculation.proposed, seq.speculation.accepted)
        return out

    # -- rows ------------------------------------------------------------------------------------------

    def _free_finished(self) -> None:
        for row in reversed(range(len(self.running))):
            seq = self.running[row]
            if seq.finish_reason is not None:
                if seq.finish_reason != "error":
                    self._keep(row)
                self._free_row(row)

    def _keep(self, row: int) -> None:
        """Put what row ``row`` computed (prompt and generated tokens) into the prefix cache, before the row goes."""
        seq = self.running[row]
        if self.prefix_cache is not None and seq.computed:
            self.prefix_cache.insert(seq.tokens()[: seq.computed], self.cache, row)

    def _free_row(self, row: int) -> None:
        """Free ``row``: the last running sequence moves into it (copying only what differs from what ``row`` held);
        the row left free notes what it still holds."""
        seq = self.running[row]
        if self.speculator is not None:
            self.speculator.release(seq)
        held = seq.tokens()[: seq.computed]
        if seq.finish_reason == "error":  # its keys may be NaN
            self.cache.forget(row)
            held = []
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            tokens = moved.tokens()[: moved.computed]
            self.cache.copy_rows(last, slice(row, row + 1), moved.computed, start=common_length(held, tokens))
            self.running[row], held = moved, tokens
        self.running.pop()
        if held:
            self.cache.holds[last] = held

    def _ensure_cache(self, rows: int, length: int) -> None:
        """Grow the cache so it holds ``rows`` × ``length``. On CPU the first cache has every row and position
        (memory permitting): its pages take memory only once written, and growing would copy what it holds, in the
        middle of a request. Elsewhere (GPU memory is taken at once) rows double up to max_batch and the length
        doubles up to n_positions, so a batch-1 request holds only what it needs and growing stays rare."""
        limit = self.config.n_positions
        length = min(length, limit)
        if self.cache is None and idle_caches(self.model):
            self.cache = idle_caches(self.model).pop()
            if self.cache.holds_of is not self.prefix_cache:  # another generator's rows: its weights may differ
                self.cache.holds.clear()
            self.cache.holds_of = self.prefix_cache
        cache = self.cache
        if cache is not None and cache.batch_size >= rows and cache.max_len >= length:
            return
        if cache is None and self.model.device.type == "cpu":
            whole = self.max_batch * limit * kv_bytes_per_token(self.config, self.model.dtype)
            if whole <= (device_memory(self.model.device) or 0) // 2:
                rows, length = self.max_batch, limit
        old_rows, old_len = (cache.batch_size, cache.max_len) if cache is not None else (0, 0)
        new_rows = old_rows if rows <= old_rows else min(self.max_batch, max(rows, 2 * old_rows))
        new_len = old_len if length <= old_len else min(limit, max(length, 2 * old_len))
        grown = (cache.resized(new_rows, new_len) if cache is not None
                 else KVCache(self.config, new_rows, new_len, self.model.dtype, self.model.device))
        grown.holds_of = self.prefix_cache
        # CUDA graphs write into the cache in place: its address is part of each graph (not so on CPU, where a static
        # address would let freezing take the cache for a constant)
        if self._static_shapes:
            torch._dynamo.mark_static_address(grown.k)
            torch._dynamo.mark_static_address(grown.v)
        self.cache = grown
