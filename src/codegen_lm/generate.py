"""Generation: sampling, a continuous-batching scheduler over a preallocated KV cache, and the front ends
built on it (``Generator.complete``/``stream`` and transformers-style ``generate``).

A request asks for ``n`` samples of one prompt. Its prompt is prefilled once; the n sequences copy that
prefix into their own cache rows. Requests join and leave between decode steps, each with its own
sampling settings, stop strings and limits. Every sequence draws from its own seeded generator, so what
it produces does not depend on what else is in the batch.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import CodeGenForCausalLM, KVCache


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature`` 0 means greedy."""

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
            (self.temperature >= 0, f"temperature must be >= 0, 0 for greedy (got {self.temperature})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 for no limit (got {self.top_k})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
    finish_reason: str | None = None
    completion: Completion | None = None  # set when finished


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of fp32 ``logits`` ``[b, vocab]``: argmax for greedy rows, else temperature, top-k and
    top-p, then inverse-CDF sampling with one uniform draw from the row's own generator."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    temps = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype)[:, None]
    probs, order = (logits[rows] / temps).softmax(dim=-1).sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1])
    top_k = torch.tensor([params[i].top_k or probs.shape[-1] for i in rows])[:, None]
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=probs.dtype)[:, None]
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    keep = (rank < top_k) & (probs.cumsum(dim=-1) - probs < top_p)
    cdf = (probs * keep).cumsum(dim=-1)
    draws = torch.stack([torch.rand((), generator=generators[i], dtype=cdf.dtype) for i in rows])
    picked = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    tokens[rows] = order.gather(1, picked).squeeze(1)
    return tokens


class TextStream:
    """Incremental detokenization: yields text only at character boundaries, and holds back a tail that
    could still grow into a stop string. ``text`` is everything confirmed so far."""

    def __init__(self, tokenizer: Any, stop: SequenceT[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""  # id-level generation: no text
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is still incomplete
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        delta = text[self.emitted : len(text) - hold]
        self.emitted += len(delta)
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
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


class Scheduler:
    """Continuous batching: ``add_request``, then ``step`` until ``has_unfinished`` is false.

    Cache rows ``[0, len(running))`` hold the running sequences; a finished sequence's row is refilled
    with the last one, so a decode step always runs over one contiguous slice of the cache.
    """

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16, eos_token_id: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.config = model.config
        self.eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        # Released models have 51200 logit rows for 50295 tokens: the padding rows must never be sampled.
        self.vocab_limit = min(len(tokenizer), self.config.vocab_size) if tokenizer is not None else self.config.vocab_size
        self.cache: KVCache | None = None
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()

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
        admitted = self._admit()
        outputs = []
        if admitted:  # first tokens come from the prompt's logits
            first = torch.stack([seq.request.first_logits for seq in admitted])
            outputs = self._append_all(admitted, first)
        self._release_prefixes()
        if any(seq.finish_reason is None for seq in self.running):
            outputs.extend(self._decode())
        for row in reversed(range(len(self.running))):
            if self.running[row].finish_reason is not None:
                self._free_row(row)
        for request_id in [r.id for r in self.requests.values() if r.waiting == 0 and not self._has_rows(r.id)]:
            del self.requests[request_id]
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
        needed = max(s.length for s in ordered) + max(s.request.params.max_new_tokens for s in ordered)
        self._ensure_cache(len(self.running) + len(ordered), needed)
        start = len(self.running)
        self.running.extend(ordered)
        if leaders:
            self._prefill(list(leaders.values()), start)
        for row, seq in enumerate(ordered, start):
            request = seq.request
            request.waiting -= 1
            if seq not in leaders.values():
                k, v = request.prefix
                length = k.shape[2]
                self.cache.k[:, row, :, :length] = k
                self.cache.v[:, row, :, :length] = v
        return ordered

    def _prefill(self, leaders: list[_Sequence], start: int) -> None:
        lengths = [len(s.request.prompt_ids) for s in leaders]
        width = max(lengths)
        pad = 0  # any valid id: right padding is never attended to by real tokens
        ids = torch.tensor([s.request.prompt_ids + [pad] * (width - len(s.request.prompt_ids)) for s in leaders])
        positions = torch.arange(width).expand(len(leaders), width)
        last = torch.tensor(lengths) - 1
        rows = slice(start, start + len(leaders))
        logits = self.model.logits_cached(
            ids.to(self.model.device), positions.to(self.model.device), self.cache, rows, width, last.to(self.model.device)
        ).cpu()
        for i, (seq, length) in enumerate(zip(leaders, lengths)):
            request = seq.request
            request.first_logits = logits[i]
            if request.waiting > 1:  # siblings admitted now or later copy this prompt's keys and values
                row = start + i
                request.prefix = (self.cache.k[:, row, :, :length].clone(), self.cache.v[:, row, :, :length].clone())

    def _release_prefixes(self) -> None:
        for request in self.requests.values():
            if request.waiting == 0:
                request.prefix = None

    def _decode(self) -> list[SequenceOutput]:
        n = len(self.running)
        device = self.model.device
        last = torch.tensor([[s.token_ids[-1]] for s in self.running])  # finished rows compute a discarded token
        positions = torch.tensor([[s.length - 1] for s in self.running])
        kv_len = int(positions.max()) + 1
        self._ensure_cache(n, kv_len)
        logits = self.model.logits_cached(last.to(device), positions.to(device), self.cache, slice(0, n), kv_len).cpu()
        rows = [i for i, s in enumerate(self.running) if s.finish_reason is None]
        return self._append_all([self.running[i] for i in rows], logits[rows])

    def _append_all(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[SequenceOutput]:
        logits[:, self.vocab_limit :] = float("-inf")
        tokens = sample(logits, [s.request.params for s in seqs], [s.generator for s in seqs]).tolist()
        return [self._append(seq, token, row_logits) for seq, token, row_logits in zip(seqs, tokens, logits)]

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

    def _free_row(self, row: int) -> None:
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            length = moved.length
            self.cache.k[:, row, :, :length] = self.cache.k[:, last, :, :length]
            self.cache.v[:, row, :, :length] = self.cache.v[:, last, :, :length]
            self.running[row] = moved
        self.running.pop()

    def _ensure_cache(self, rows: int, length: int) -> None:
        """Grow the cache (doubling its length, up to n_positions) so it holds ``rows`` × ``length``."""
        limit = self.config.n_positions
        length = min(length, limit)
        cache = self.cache
        if cache is not None and cache.batch_size >= rows and cache.max_len >= length:
            return
        new_rows = max(self.max_batch if cache is None else cache.batch_size, rows)
        new_len = max(length, min(limit, 2 * cache.max_len) if cache is not None else length)
        grown = KVCache(self.config, new_rows, new_len, self.model.dtype, self.model.device)
        if cache is not None:
            grown.k[:, : cache.batch_size, :, : cache.max_len] = cache.k
            grown.v[:, : cache.batch_size, :, : cache.max_len] = cache.v
        self.cache = grown


class Generator:
    """Model + tokenizer, with the batch front ends: ``complete`` (n samples per prompt) and ``stream``."""

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_batch: int = 16, **load_kwargs: Any) -> "Generator":
        from .checkpoint import load_model
        from .tokenizer import AutoTokenizer

        return cls(load_model(name_or_path, **load_kwargs), AutoTokenizer.from_pretrained(name_or_path), max_batch)

    def scheduler(self) -> Scheduler:
        return Scheduler(self.model, self.tokenizer, self.max_batch)

    def complete(
        self, prompts: SequenceT[str | list[int]], params: SamplingParams, on_output: Any = None
    ) -> list[list[Completion]]:
        """``params.n`` completions of each prompt; ``on_output(SequenceOutput)`` sees every step (progress)."""
        scheduler = self.scheduler()
        ids = [scheduler.add_request(p, params, request_id=str(i)) for i, p in enumerate(prompts)]
        results: dict[tuple[str, int], Completion] = {}
        while scheduler.has_unfinished():
            for out in scheduler.step():
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

