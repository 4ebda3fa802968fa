"""The compiled decode step: ``model.logits_cached`` under ``torch.compile``, one per model, shared by its schedulers."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..model import CodeGenForCausalLM, KVCache


def compiled_decode_step(model: CodeGenForCausalLM) -> Callable[..., torch.Tensor]:
    """``model.logits_cached`` under ``torch.compile``, made once per model and shared by its schedulers.

    On CUDA it runs as CUDA graphs (mode "reduce-overhead"): a decode step is one graph replay instead of hundreds
    of kernel launches. Graphs need static shapes, so the scheduler pads rows to a power of two and attends over
    the whole cache behind a mask (``static_decode_shapes``): a generation needs a handful of graphs.
    On CPU the gain is the Python and dispatch work between kernels (on the 350M shape 12 % of an fp32 step and 25 %
    of an int8 one, docs/benchmarks.md): the graph is frozen (weights become constants, so inductor keeps oneDNN's
    matmul on them) and its wrapper is C++; shapes stay live and turn symbolic at the first recompile, since a CPU
    compile costs a minute or more. The int8 kernels (whichever the chooser picked) are reached through a custom op
    (``quantize.int8_gemm``); packed int4 layers cannot be traced and are refused."""
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


def idle_caches(model: CodeGenForCausalLM) -> list[KVCache]:
    """The KV cache a finished scheduler of ``model`` left for the next one (at most one): allocating and zeroing a
    new one for every request costs more than a short prefill, and CUDA graphs are bound to a cache's address."""
    return model.__dict__.setdefault("_idle_caches", [])
