"""The front ends over the scheduler: ``Generator.complete`` (n samples per prompt), ``Generator.stream``, and
transformers-style ``generate``. A generator owns its model's prefix cache, so every request through it (and
through the schedulers it makes for a server, a chat session or an evaluation) reuses what earlier ones computed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as SequenceT
from typing import Any

import torch

from ..model import CodeGenForCausalLM
from .compiled import compiled_decode_step
from .prefix_cache import PrefixCache, device_memory, kv_bytes_per_token
from .sampling import SamplingParams
from .speculate import SpeculativeConfig
from .scheduler import Completion, GenerationError, Scheduler

CONTEXTS_CACHED = 4  # the default prefix cache holds this many full contexts (see default_prefix_cache_mb)


def default_prefix_cache_mb(model: CodeGenForCausalLM) -> float:
    """The default prefix cache budget: ``CONTEXTS_CACHED`` full contexts of the model (an editor user needs about one,
    the file up to the cursor; a chat session one; so 4 serve 4 people typing at once), but at most a quarter of the
    machine's memory (of the GPU's free memory on CUDA). The 350M model in fp32: 4 × 2048 tokens × 160 KiB = 1280 MiB."""
    wanted = CONTEXTS_CACHED * model.config.n_positions * kv_bytes_per_token(model.config, model.dtype)
    available = device_memory(model.device) or wanted * 4
    return min(wanted, available // 4) / 2**20


class Generator:
    """Model + tokenizer, with the batch front ends: ``complete`` (n samples per prompt) and ``stream``.

    - ``compile=True`` runs decode steps compiled (see ``compiled_decode_step``).
    - ``prefix_cache_mb``: the memory for keys and values kept across requests (``PrefixCache``); None takes
      ``default_prefix_cache_mb``, 0 turns the prefix cache off.
    - ``prefill_chunk``: prompt tokens a step computes while other sequences decode (``Scheduler``); None takes the
      device's measured default.
    - ``speculative``: speculative decoding (``SpeculativeConfig``); ``draft`` is its draft model (for ``draft`` and
      the ``self-*`` methods; ``from_pretrained`` loads it).
    """

    def __init__(self, model: CodeGenForCausalLM, tokenizer: Any, max_batch: int = 16, compile: bool = False,
                 prefix_cache_mb: float | None = None, prefill_chunk: int | None = None,
                 speculative: SpeculativeConfig | None = None, draft: CodeGenForCausalLM | None = None):
        if prefix_cache_mb is not None and not prefix_cache_mb >= 0:
            raise ValueError(f"the prefix cache budget must be >= 0 MB, 0 to turn it off (got {prefix_cache_mb})")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"the prefill chunk must be at least 1 token (got {prefill_chunk})")
        if (draft is not None) != (speculative is not None and speculative.method != "ngram"):
            raise ValueError(f"speculative method {speculative.method if speculative else None!r} "
                             f"{'needs' if draft is None else 'takes no'} draft model")
        if draft is not None and draft.device != model.device:
            raise ValueError(f"the draft model is on {draft.device} and the model on {model.device}; load both on one "
                             "device")
        self.model, self.tokenizer, self.max_batch, self.compile = model, tokenizer, max_batch, compile
        self.prefill_chunk, self.speculative, self.draft = prefill_chunk, speculative, draft
        budget = default_prefix_cache_mb(model) if prefix_cache_mb is None else prefix_cache_mb
        self.prefix_cache = PrefixCache(model.config, model.dtype, model.device, int(budget * 2**20)) if budget else None
        if compile:
            compiled_decode_step(model)  # refuse untraceable weights now, not at the first step

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_batch: int = 16, compile: bool = False,
                        prefix_cache_mb: float | None = None, prefill_chunk: int | None = None,
                        speculative: SpeculativeConfig | str | None = None, several_rows: bool | None = None,
                        **load_kwargs: Any) -> "Generator":
        """Load model and tokenizer for generation, the model prepared for inference only (fused projections;
        int8/int4 with ``quantize=``, else fp32 weights through oneDNN on CPU: see ``codegen_lm.quantize``);
        the generator owns this model. ``speculative`` (a ``SpeculativeConfig``, or just its method's name) loads the
        draft model it needs: the ``draft_model`` checkpoint, or this one quantized for ``self-int4``/``self-int8``.
        ``several_rows``: the decode steps will mostly carry several rows (n samples, many prompts at once as in an
        evaluation; by default, only with ``speculative``, whose verify steps do), so fp32 weights take the layouts
        fastest for those rather than for one (``codegen_lm.kernels.choose_fp32``); a draft model's steps keep one."""
        from ..checkpoint import load_model
        from ..tokenizer import AutoTokenizer

        if isinstance(speculative, str):
            speculative = SpeculativeConfig(speculative)
        quantize = load_kwargs.get("quantize")
        if speculative is not None and speculative.method.startswith("self-"):
            own = speculative.method.removeprefix("self-")
            if quantize in (own, "int4"):
                raise ValueError(f"{speculative.method} drafts with this model quantized to {own}, and it already is "
                                 f"{quantize}; use ngram or a draft model")
        several_rows = speculative is not None if several_rows is None else several_rows
        model = load_model(name_or_path, inference=True, several_rows=several_rows, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        draft = None
        if speculative is not None and speculative.method != "ngram":
            draft_kwargs = {**load_kwargs, "dtype": model.dtype, "device": model.device}
            if speculative.method == "draft":
                draft_tokenizer = AutoTokenizer.from_pretrained(speculative.draft_model)
                if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
                    raise ValueError(f"the draft model {speculative.draft_model} has another tokenizer ("
                                     f"{len(draft_tokenizer)} tokens, {len(tokenizer)} here); a draft must share the "
                                     "model's tokenizer, as every CodeGen checkpoint does")
                draft = load_model(speculative.draft_model, inference=True, **draft_kwargs)
                if draft.config.vocab_size < len(tokenizer):
                    raise ValueError(f"the draft model has {draft.config.vocab_size} logit rows for a tokenizer of "
                                     f"{len(tokenizer)} tokens")
            else:
                draft = load_model(name_or_path, inference=True, **{**draft_kwargs, "quantize": own})
        return cls(model, tokenizer, max_batch, compile, prefix_cache_mb, prefill_chunk, speculative, draft)

    def scheduler(self) -> Scheduler:
        """A scheduler over this generator's model, sharing its prefix cache (and its draft model)."""
        return Scheduler(self.model, self.tokenizer, self.max_batch, compile=self.compile,
                         prefix_cache=self.prefix_cache, prefill_chunk=self.prefill_chunk,
                         speculative=self.speculative, draft=self.draft)

    @torch.inference_mode()
    def warm_up(self) -> int:
        """With ``compile=True``, compile the decode step for the kinds of batch a server meets before any request
        waits for a compile: one row, two rows, three (the row count turns symbolic), one row of a larger cache.
        On CPU the shapes turn symbolic on the way, so later batch sizes and lengths reuse these graphs (tested). CUDA
        graphs are made per padded row count and cache size, so a larger batch or cache still compiles at its first
        step. Returns how many graphs were compiled."""
        if not self.compile:
            return 0
        from torch._dynamo.utils import counters

        compiled_before = counters["stats"]["unique_graphs"]
        for prompts in ([[0] * 4], [[0] * 4, [0] * 6], [[0] * 4, [0] * 6, [0] * 5], [[0] * 4]):
            self.complete(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # (the warm-up's prompts are nobody's)
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
    generator = Generator(model, tokenizer, max_batch=max(16, num_return_sequences), prefix_cache_mb=0)
    results = generator.complete(prompts, params)
    new = [c.token_ids for r in results for c in r]
    longest = max(len(t) for t in new)
    out = torch.full((len(new), width + longest), pad, dtype=input_ids.dtype)
    out[:, :width] = input_ids.cpu().repeat_interleave(num_return_sequences, dim=0)
    for i, tokens in enumerate(new):
        out[i, width : width + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return out.to(input_ids.device)

