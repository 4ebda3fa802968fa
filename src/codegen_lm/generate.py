"""Generation: sampling, a continuous-batching scheduler over a preallocated KV cache, and the front ends
built on it (``Generator.complete``/``stream`` and transformers-style ``generate``).

A request asks for ``n`` samples of one prompt. Its prompt is prefilled once; the n sequences copy that
prefix into their own cache rows. Requests join and leave between decode steps, each with its own
sampling settings, stop strings and limits. Every sequence draws from its own seeded generator, so what
it produces does not depend on what else is in the batch (up to float rounding between batch shapes).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .model import CodeGenForCausalLM, KVCache
from .tokenizer import CODEGEN_TOKENS


GREEDY_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM): softmax(logits / T) is one-hot up to rounding


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature`` 0 (or anything below ``GREEDY_TEMPERATURE``) means greedy; a
    ``top_p`` below the most probable token's probability keeps only that token."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1 (got {self.max_new_tokens})"),
            (self.n >= 1, f"n must be at least 1 (got {self.n})"),
            (0 <= self.temperature < math.inf, f"temperature must be a finite number >= 0, 0 for greedy (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 for no limit (got {self.top_k})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass
class Completion:
    """One finished sample: its text (cut before a stop string), its token ids, and why it ended."""

    text: str
    token_ids: list[int]  # ends with EOS when generation stopped there
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort"
    logprobs: list[float] | None = None


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


class GenerationError(RuntimeError):
    """A request failed while its tokens were processed (non-finite logits, sampling, decoding, stop strings). The
    scheduler ends that request alone; every other request goes on as if it had never come."""


def draw_uniforms(params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One uniform draw ``[b]`` per sampled row from its own generator (0 for greedy rows, which draw nothing).
    Drawn before any sampling arithmetic, so that a row can be sampled again, alone, with the same draw."""
    return torch.stack([torch.zeros(()) if p.greedy else torch.rand((), generator=g) for p, g in zip(params, generators)])


def sample(logits: torch.Tensor, params: list[SamplingParams], draws: torch.Tensor) -> torch.Tensor:
    """One token per row of fp32 ``logits`` ``[b, vocab]``: argmax for greedy rows; else softmax(logits / T)
    restricted to the top-k tokens and to the top-p nucleus, then inverse-CDF sampling (in vocabulary order)
    at the row's uniform draw (``draw_uniforms``). Nothing here sorts the vocabulary: a full sort of 50k
    probabilities per row and step costs more than the rest of sampling together. Rows are independent: a row
    gets the same token whatever else is in the batch."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    tokens = logits.argmax(dim=-1) if len(rows) < len(params) else logits.new_zeros(len(params), dtype=torch.long)
    if not rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype, device=device)[:, None]
    probs = (logits[rows] / temps).softmax(dim=-1)
    floor = torch.zeros(len(rows), dtype=probs.dtype, device=device)  # keep the tokens with p >= floor
    top_k = [params[i].top_k if 0 < params[i].top_k < vocab else 0 for i in rows]
    if any(top_k):
        ranked = probs.topk(max(top_k), dim=-1).values  # ties with the k-th token are kept, as in transformers
        kth = ranked.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None]).squeeze(1)
        floor = torch.where(torch.tensor(top_k, device=device) > 0, kth, floor)
    top_p = [params[i].top_p for i in rows]
    if min(top_p) < 1:
        nucleus = nucleus_floor(probs, torch.tensor(top_p, dtype=probs.dtype, device=device))
        floor = torch.maximum(floor, nucleus)
    cdf = torch.where(probs >= floor[:, None], probs, 0).cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, draws[rows].to(device=device, dtype=cdf.dtype)[:, None] * total, right=True)
    # A draw that rounds up to the total would land past the last kept token (on a padding row, say): stop there.
    last_kept = torch.searchsorted(cdf, total)
    tokens[rows] = torch.minimum(picked, last_kept).squeeze(1)
    return tokens


def nucleus_floor(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """The least probability in each row's top-p nucleus ``[r]`` (0 where top_p is 1).

    A token is in the nucleus when the tokens strictly more probable than it hold less than top_p of the mass:
    the smallest set of most probable tokens that reaches top_p, plus any tied with its least probable one.
    The top ``candidates`` tokens settle peaked rows; flat rows (high temperature, random weights) are settled by
    a histogram of the probabilities' bit patterns (no full sort either way)."""
    rows = probs.shape[0]
    floor = torch.zeros(rows, dtype=probs.dtype, device=probs.device)
    ranked = probs.topk(min(candidates, probs.shape[-1]), dim=-1).values
    # The most probable token is always kept, even where top_p is below float precision (5e-324 becomes 0 in fp32).
    kept = ((ranked.cumsum(dim=-1) - ranked) < top_p[:, None]).sum(dim=-1).clamp_(min=1)
    settled = kept < ranked.shape[-1]
    floor = torch.where(settled, ranked.gather(1, (kept - 1)[:, None]).squeeze(1), floor)
    flat = (~settled & (top_p < 1)).nonzero().squeeze(1).tolist()
    if flat:
        floor[flat] = _histogram_floor(probs[flat], top_p[flat])
    return torch.where(top_p < 1, floor, 0)


def _histogram_floor(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # Positive floats order like their int32 bit patterns, so the top 16 bits put each probability in one of 2^15
    # ordered bins. One pass sums the mass per bin; the nucleus ends in the bin where the mass of the bins above
    # it first falls below top_p (every bin above is kept whole, every bin below dropped), and only that bin's
    # few tokens are sorted to find the exact floor.
    rows = probs.shape[0]
    keys = (probs.view(torch.int32) >> 16).long()
    mass = torch.zeros(rows, 1 << 15, dtype=probs.dtype, device=probs.device).scatter_add_(1, keys, probs)
    above = mass.flip(-1).cumsum(dim=-1).flip(-1) - mass  # mass of the bins above each bin
    boundary = ((above < top_p[:, None]) & (mass > 0)).int().argmax(dim=-1)  # the lowest such bin
    floors = []
    for row in range(rows):
        members = probs[row][keys[row] == boundary[row]].sort(descending=True).values
        kept = int(((members.cumsum(dim=0) - members + above[row, boundary[row]]) < top_p[row]).sum())
        floors.append(members[max(kept, 1) - 1])
    return torch.stack(floors)


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


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    waiting: int  # samples not yet given a cache row
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # prompt keys/values, kept while samples wait
    first_logits: torch.Tensor | None = None


@dataclass
class _Sequence:
    request: _Request
    index: int
    generator: torch.Generator
    stream: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.token_ids)


def compiled_decode_step(model: CodeGenForCausalLM) -> Callable[..., torch.Tensor]:
    """``model.logits_cached`` under ``torch.compile``, made once per model and shared by its schedulers.

    On CUDA it runs as CUDA graphs (mode "reduce-overhead"): a decode step is one graph replay instead of hundreds
    of kernel launches. Graphs need static shapes, so the scheduler pads rows to a power of two and attends over
    the whole cache behind a mask (``static_decode_shapes``): a generation needs a handful of graphs.
    On CPU the gain is the Python and dispatch work between kernels (on the 350M shape 12 % of an fp32 step and 25 %
    of an int8 one, docs/benchmarks.md): the graph is frozen (weights become constants, so inductor keeps oneDNN's
    matmul on them) and its wrapper is C++; shapes stay live and turn symbolic at the first recompile, since a CPU
    compile costs a minute or more. fbgemm's int8 GEMMs are reached through a custom op
    (``quantize.fbgemm_linear``); packed int4 layers cannot be traced and are refused."""
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        opaque = sorted({type(m).__name__ for m in model.modules() if getattr(m, "opaque_to_compile", False)})
        if opaque:
            raise ValueError(f"compile needs weights that torch.compile can trace, and this model's {', '.join(opaque)} "
                             "layers are packed for the CPU's own kernels; drop --compile, or compile fp32 or int8 weights")
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)  # graphs per (rows, cache length): a few dozen at most
        if static_decode_shapes(model.device):
            step = torch.compile(model.logits_cached, mode="reduce-overhead", dynamic=False, fullgraph=True)
        else:
            step = _frozen(torch.compile(model.logits_cached, fullgraph=True, options={"cpp_wrapper": True}))
        model.__dict__["_compiled_decode_step"] = step
    return step


def _frozen(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``compiled`` traced with inductor's freezing on. Dynamo reads that setting while it traces (to make weights
    graph constants), before per-compile options apply, so it is set around each call instead."""
    def step(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)
    return step


def static_decode_shapes(device: torch.device) -> bool:
    """Whether compiled decode steps take static shapes (CUDA graphs) or the batch's live ones."""
    return device.type == "cuda"


def _idle_caches(model: CodeGenForCausalLM) -> list[KVCache]:
    """Caches that compiled decode steps of ``model`` were made for, and that no scheduler is using."""
    return model.__dict__.setdefault("_idle_caches", [])


class Scheduler:
    """Continuous batching: ``add_request``, then ``step`` until ``has_unfinished`` is false.

    Cache rows ``[0, len(running))`` hold the running sequences; a finished sequence's row is refilled
    with the last one, so a decode step always runs over one contiguous slice of the cache. With
    ``compile=True`` decode steps run through ``compiled_decode_step``.
    """

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16, eos_token_id: int | None = None,
                 compile: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self._compiled_step = compiled_decode_step(model) if compile else None
        self._static_shapes = compile and static_decode_shapes(model.device)  # CUDA graphs: see _decode
        self.config = model.config
        self.eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        # Released models have 51200 logit rows for 50295 tokens: the padding rows must never be sampled. Without a
        # tokenizer (id-level generation) the CodeGen tokenizer's size is the limit.
        tokens = len(tokenizer) if tokenizer is not None else CODEGEN_TOKENS
        self.vocab_limit = min(tokens, self.config.vocab_size)
        self.cache: KVCache | None = None
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

    @property
    def compile(self) -> bool:
        return self._compiled_step is not None

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
            self.waiting.append(_Sequence(request, index, generator, TextStream(self.tokenizer, params.stop)))
        return request_id

    @torch.inference_mode()
    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its rows are freed at once."""
        if request_id not in self.requests:
            return
        self.waiting = deque(s for s in self.waiting if s.request.id != request_id)
        for row in reversed(range(len(self.running))):
            if self.running[row].request.id == request_id:
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
        """Admit waiting sequences into free rows (prefilling new prompts), then decode one token for all."""
        outputs: list[SequenceOutput] = []
        admitted = self._admit()
        if admitted:  # first tokens come from the prompt's logits
            outputs = self._append_all(admitted, torch.stack([seq.request.first_logits for seq in admitted]))
            self._free_finished()
        self._release_prefixes()
        if self.running:
            outputs.extend(self._decode())
            self._free_finished()
        for request_id in [r.id for r in self.requests.values() if r.waiting == 0 and not self._has_rows(r.id)]:
            del self.requests[request_id]
        if self.compile and self.cache is not None and not self.has_unfinished():  # the next scheduler takes it over
            _idle_caches(self.model).append(self.cache)
            self.cache = None
        return outputs

    def _has_rows(self, request_id: str) -> bool:
        return any(s.request.id == request_id for s in self.running)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        if not admitted:
            return []
        # Prompts never prefilled go first, into consecutive rows, so one batched prefill covers them.
        leaders: dict[str, _Sequence] = {}
        for seq in admitted:
            if seq.request.first_logits is None:
                leaders.setdefault(seq.request.id, seq)
        ordered = list(leaders.values()) + [s for s in admitted if s not in leaders.values()]
        needed = max(len(s.request.prompt_ids) + s.request.params.max_new_tokens for s in ordered)
        self._ensure_cache(len(self.running) + len(ordered), needed)
        start = len(self.running)
        self.running.extend(ordered)
        if leaders:
            self._prefill(list(leaders.values()), start)
        leader_rows = {seq.request.id: row for row, seq in enumerate(leaders.values(), start)}
        for row, seq in enumerate(ordered, start):
            request = seq.request
            request.waiting -= 1
            if row in leader_rows.values():
                continue
            length = len(request.prompt_ids)
            if request.id in leader_rows:  # a sibling admitted with its leader copies the leader's row
                self.cache.copy_rows(leader_rows[request.id], slice(row, row + 1), length)
            else:
                self.cache.k[:, row, :length], self.cache.v[:, row, :length] = request.prefix
        for request_id, row in leader_rows.items():
            request = self.requests[request_id]
            if request.waiting > 0:  # siblings admitted later copy the prompt's keys and values from here
                length = len(request.prompt_ids)
                request.prefix = (self.cache.k[:, row, :length].clone(), self.cache.v[:, row, :length].clone())
        return ordered

    def _prefill(self, leaders: list[_Sequence], start: int) -> None:
        device = self.model.device
        lengths = [len(s.request.prompt_ids) for s in leaders]
        width = max(lengths)
        pad = 0  # any valid id: right padding is never attended to by real tokens
        ids = torch.tensor([s.request.prompt_ids + [pad] * (width - len(s.request.prompt_ids)) for s in leaders], device=device)
        positions = torch.arange(width, device=device).expand(len(leaders), width)
        last = torch.tensor(lengths, device=device) - 1
        rows = slice(start, start + len(leaders))
        # Rows of one length need no mask; with different lengths a row's padding must stay out of the others' keys.
        aligned = min(lengths) == width
        logits = self.model.logits_cached(ids, positions, self.cache, rows, width, last, aligned=aligned)
        for seq, row_logits in zip(leaders, logits):
            seq.request.first_logits = row_logits

    def _release_prefixes(self) -> None:
        for request in self.requests.values():
            if request.waiting == 0:
                request.prefix = None

    def _decode(self) -> list[SequenceOutput]:
        n = len(self.running)
        device = self.model.device
        positions = [s.length - 1 for s in self.running]
        kv_len = max(positions) + 1
        self._ensure_cache(n, kv_len)
        last = [s.token_ids[-1] for s in self.running]
        if self._static_shapes:
            # Static shapes: rows padded to a power of two (the padding rows are free rows, their token at slot 0),
            # keys over the whole cache length.
            rows = min(1 << (n - 1).bit_length(), self.cache.batch_size)
            tokens = torch.tensor(last + [0] * (rows - n), device=device)[:, None]
            where = torch.tensor(positions + [0] * (rows - n), device=device)[:, None]
            logits = self._compiled_step(tokens, where, self.cache, slice(0, rows), self.cache.max_len)[:n]
        else:
            step = self._compiled_step or self.model.logits_cached
            logits = step(torch.tensor(last, device=device)[:, None], torch.tensor(positions, device=device)[:, None],
                          self.cache, slice(0, n), kv_len, aligned=min(positions) == kv_len - 1)
        return self._append_all(self.running, logits)

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
        params = seq.request.params
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
        out = SequenceOutput(seq.request.id, seq.index, text, [token], seq.finish_reason is not None, seq.finish_reason)
        if out.finished:
            logprobs = seq.logprobs if params.logprobs else None
            out.completion = Completion(seq.stream.text, list(seq.token_ids), seq.finish_reason, logprobs)
        return out

    def _free_finished(self) -> None:
        for row in reversed(range(len(self.running))):
            if self.running[row].finish_reason is not None:
                self._free_row(row)

    def _free_row(self, row: int) -> None:
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.copy_rows(last, slice(row, row + 1), moved.length)
            self.running[row] = moved
        self.running.pop()

    def _ensure_cache(self, rows: int, length: int) -> None:
        """Grow the cache so it holds ``rows`` × ``length``: rows double up to max_batch, the length doubles up to
        n_positions, so a batch-1 request holds only what it needs and growing stays rare."""
        limit = self.config.n_positions
        length = min(length, limit)
        if self.cache is None and self.compile and _idle_caches(self.model):
            self.cache = _idle_caches(self.model).pop()  # graphs are bound to a cache's address (CUDA) or shape
        cache = self.cache
        if cache is not None and cache.batch_size >= rows and cache.max_len >= length:
            return
        old_rows, old_len = (cache.batch_size, cache.max_len) if cache is not None else (0, 0)
        new_rows = min(self.max_batch, max(rows, 2 * old_rows))
        new_len = old_len if length <= old_len else min(limit, max(length, 2 * old_len))
        grown = KVCache(self.config, new_rows, new_len, self.model.dtype, self.model.device)
        # CUDA graphs write into the cache in place: its address is part of each graph (not so on CPU, where a static
        # address would let freezing take the cache for a constant)
        if self._static_shapes:
            torch._dynamo.mark_static_address(grown.k)
            torch._dynamo.mark_static_address(grown.v)
        if cache is not None:
            grown.k[:, :old_rows, :old_len] = cache.k
            grown.v[:, :old_rows, :old_len] = cache.v
        self.cache = grown


class Generator:
    """Model + tokenizer, with the batch front ends: ``complete`` (n samples per prompt) and ``stream``.
    ``compile=True`` runs decode steps compiled (see ``compiled_decode_step``)."""

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16, compile: bool = False):
        self.model, self.tokenizer, self.max_batch, self.compile = model, tokenizer, max_batch, compile
        if compile:
            compiled_decode_step(model)  # refuse untraceable weights now, not at the first step

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_batch: int = 16, compile: bool = False,
                        **load_kwargs: Any) -> "Generator":
        """Load model and tokenizer for generation, the model prepared for inference only (fused projections;
        int8/int4 with ``quantize=``, else fp32 weights through oneDNN on CPU: see ``codegen_lm.quantize``);
        the generator owns this model."""
        from .checkpoint import load_model
        from .tokenizer import AutoTokenizer

        model = load_model(name_or_path, inference=True, **load_kwargs)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), max_batch, compile)

    def scheduler(self) -> Scheduler:
        return Scheduler(self.model, self.tokenizer, self.max_batch, compile=self.compile)

    @torch.inference_mode()
    def warm_up(self) -> int:
        """With ``compile=True``, compile the decode step for the kinds of batch a server meets before any request
        waits for a compile: one row, rows of different lengths (masked attention), one row of a larger cache, equal rows.
        On CPU the shapes turn symbolic on the way, so later batch sizes and lengths reuse these graphs (tested). CUDA
        graphs are made per padded row count and cache size, so a larger batch or cache still compiles at its first
        step. Returns how many graphs were compiled."""
        if not self.compile:
            return 0
        from torch._dynamo.utils import counters

        compiled_before = counters["stats"]["unique_graphs"]
        for prompts in ([[0] * 4], [[0] * 4, [0] * 6], [[0] * 4], [[0] * 4] * 2):
            self.complete(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
        return counters["stats"]["unique_graphs"] - compiled_before

    def complete(
        self, prompts: SequenceT[str | list[int]], params: SamplingParams, on_output: Any = None
    ) -> list[list[Completion]]:
        """``params.n`` completions of each prompt; ``on_output(SequenceOutput)`` sees every step (progress).
        Raises ``GenerationError`` when a request fails."""
        scheduler = self.scheduler()
        ids = [scheduler.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
        results: dict[tuple[str, int], Completion] = {}
        while scheduler.has_unfinished():
            for out in scheduler.step():
                if out.error is not None:
                    raise GenerationError(f"generating for prompt {out.request_id} failed: {out.error}")
                if on_output is not None:
                    on_output(out)
                if out.completion is not None:
                    results[(out.request_id, out.index)] = out.completion
        return [[results[(rid, j)] for j in range(params.n)] for rid in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion as they are generated (``params.n`` must be 1)."""
        if params.n != 1:
            raise ValueError("stream() produces one completion; use n=1")
        scheduler = self.scheduler()
        scheduler.add_request(prompt, params)
        while scheduler.has_unfinished():
            for out in scheduler.step():
                if out.error is not None:
                    raise GenerationError(f"generation failed: {out.error}")
                if out.text:
                    yield out.text


def hf_generate(
    model: CodeGenForCausalLM,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | list[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    **unsupported: Any,
) -> torch.Tensor:
    """transformers' ``generate`` contract: ``[batch × num_return_sequences, input + new]`` ids, the input's
    left padding kept, rows that end early filled with ``pad_token_id``. Defaults follow transformers
    (max_length 20; top_k 50 when sampling)."""
    unsupported.pop("use_cache", None)
    unsupported.pop("return_dict_in_generate", None)
    if unsupported:
        raise ValueError(f"generate() does not support {', '.join(sorted(unsupported))}")
    if input_ids is None:
        raise ValueError("generate() needs input_ids")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    width = input_ids.shape[1]
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else 20) - width
    if max_new_tokens < 1:
        raise ValueError(f"the input has {width} tokens, so max_length {max_length} leaves nothing to generate")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer=... to decode the generated text")
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature if do_sample else 0.0,
        top_k=top_k if do_sample else 0,
        top_p=top_p if do_sample else 1.0,
        n=num_return_sequences,
        stop=[stop_strings] if isinstance(stop_strings, str) else list(stop_strings or []),
        seed=seed,
    )
    prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]
    results = Generator(model, tokenizer, max_batch=max(16, num_return_sequences)).complete(prompts, params)
    new = [c.token_ids for r in results for c in r]
    longest = max(len(t) for t in new)
    out = torch.full((len(new), width + longest), pad, dtype=input_ids.dtype)
    out[:, :width] = input_ids.cpu().repeat_interleave(num_return_sequences, dim=0)
    for i, tokens in enumerate(new):
        out[i, width : width + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return out.to(input_ids.device)

