"""Inference-only weights: ``prepare_for_inference(model, quantize=None | "int8" | "int4")``.

Each block's four projections are first fused into two matmuls (``CodeGenBlock.fuse_projections``); then every
linear layer takes the fastest form measured for its precision on this device (docs/benchmarks.md,
"Generation engine"). Batch-1 decoding reads every weight once per token, so fewer bytes per weight and fewer,
larger matmuls are more tokens per second.

* **fp32 on CPU**: oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``), the weights kept in the layout
  that ``codegen_lm.kernels`` measured fastest for the shape on this CPU (row-major, or reordered once into a
  blocked layout), few-row products padded to the row count that layout runs fastest (timed once per machine
  and cached). Measured on the 350M shape (2 threads, AMD EPYC): with AVX-512, PyTorch's default ``F.linear``
  (MKL) reached 15 GB/s at batch 1 and 8 GB/s at batch 8, the blocked oneDNN kernel 28-31 and 24 GB/s; AVX2-only,
  MKL reached half of oneDNN's speed at every batch size, and the row-major weight was as fast as the blocked one
  at 1-8 rows and 1.3-1.5× faster from 64. Results differ from ``F.linear`` only by summation order (about 1e-6).
* **int8**: weights per output channel (symmetric, [-127, 127]), one copy per layer, in the layout of the kernel
  that ``codegen_lm.kernels`` measured fastest for the layer's shape on this CPU (fbgemm's or oneDNN's int8 GEMM
  with u8 activations on x86, ``_weight_int8pack_mm`` or a dequantizing fp32 matmul elsewhere; the choice is
  timed once per machine and cached). The u8 kernels take each row scaled to max |x| = 1 on one fixed activation
  grid, so a row's output does not depend on what else is in the batch. A compiled decode step reaches those
  kernels through the custom op ``codegen_lm::int8_gemm`` (their packed weights cannot be traced) and fuses the
  small ops around it. The token embedding is int8 too (one scale per row, as CTranslate2 stores it), and so is
  the LM head, also under int4.
* **int4**: weights group-wise (asymmetric, groups of 128 along the input) with PyTorch's packed int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``), which is fast with bf16 activations (and slow with fp32 ones); the output
  is cast back to fp32. The LM head stays int8: its errors land on the logits directly. It pays on CPUs with
  AVX-512 BF16; on AVX2 alone it decoded slower than int8 and prefilled 3.6× slower (docs/benchmarks.md). Where
  that kernel does not run, int4 falls back to dequantizing into an fp32 matmul (``CODEGEN_LM_INT4_KERNEL``
  forces either).

On other devices (CUDA) the same quantized weights run through a plain dequantize-then-matmul path, which
is exact and portable but not a fast kernel; full-precision layers stay ``nn.Linear`` there.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import has_vnni
from .model import refuse_to_save

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)
INT4_FORCE_ENV = "CODEGEN_LM_INT4_KERNEL"
_has_vnni = has_vnni  # the name tests/test_convert.py imports
_QUANTIZE_CHUNK_BYTES = 8 << 20


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]``, q in [-127, 127]. Computed a few MB
    of rows at a time, so that quantizing a large matrix (the 200 MB embedding) adds no full-size temporaries."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, _QUANTIZE_CHUNK_BYTES // (4 * k))
    for start in range(0, n, step):
        w = weight[start : start + step].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[start : start + step] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start : start + step] = s
    return q, scale


def quantize_groupwise_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group_size`` inputs: ``weight ≈ (q - 8) * scale + zero``, q in [0, 15]
    (the CPU kernel's convention). Returns q ``[N, K]`` int32, scale and zero ``[N, K / group_size]``."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32).view(n, k)
    return q, scale, low + 8 * scale


# Packed int8 weights are opaque objects that torch.compile cannot trace, so a compiled graph reaches each layer's
# GEMM through the custom op below, by the layer's key in this table.
_INT8_LAYERS: weakref.WeakValueDictionary[int, "Int8Linear"] = weakref.WeakValueDictionary()
_INT8_KEYS = itertools.count()


@torch.library.custom_op("codegen_lm::int8_gemm", mutates_args=())
def int8_gemm(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """The int8 GEMM of the ``Int8Linear`` whose key is ``layer`` (the kernel its plan gives ``x``'s row count)."""
    return _INT8_LAYERS[layer].gemm(x)


@int8_gemm.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 per-channel weights, run by the kernel plan measured for its shape (``head``: the LM
    head's, chosen for the few rows it sees when generating; ``codegen_lm.kernels``), or by ``kernel`` for every
    row count when given."""

    def __init__(self, linear: nn.Linear, kernel: str | None = None, head: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if linear.weight.device.type != "cpu":
            self.plan = kernels.Plan.single(kernel or "dequant")
        elif kernel is not None:
            if kernel not in kernels.available_kernels():
                raise ValueError(f"int8 kernel {kernel!r} does not run here; use one of {', '.join(kernels.available_kernels())}")
            self.plan = kernels.Plan.single(kernel)
        else:
            self.plan = kernels.int8_plan(self.out_features, self.in_features, head)
        storage = kernels.STORAGES[self.plan.storage]
        self.weights = storage.pack(*quantize_per_channel_int8(linear.weight))
        self.scaled_rows = storage.scaled_rows
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.key = next(_INT8_KEYS)
        _INT8_LAYERS[self.key] = self
        self._register_state_dict_hook(refuse_to_save)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[rows, in]`` times the int8 weights, by the plan's kernel for that many rows."""
        return self.plan.kernel(x.shape[0]).run(self.weights, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if not self.scaled_rows:  # weight-only kernels take the activations as they are
            y = self.gemm(x)
            y = y + self.bias.to(y.dtype) if self.bias is not None else y
            return y.view(*shape[:-1], self.out_features).to(dtype)
        x = x.float()
        # A compiled graph reaches the kernel through a custom op, and inductor fuses the small ops around it.
        compiling = torch.compiler.is_compiling()
        # max |x| per row: a few rows (decoding) take one op, since there each small op costs its overhead; for many
        # rows max(amax, -amin) is 5× faster
        if compiling or x.shape[0] < 16:
            norm = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-30)
        else:
            norm = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_(min=1e-30)
        y = int8_gemm(x / norm, self.key, self.out_features) if compiling else self.gemm(x / norm)
        y = torch.addcmul(self.bias, y, norm, out=y) if self.bias is not None else y.mul_(norm)  # y is the kernel's own
        return y.view(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.plan.describe()}"


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with int8 rows (symmetric, one scale per row, as CTranslate2 stores its embeddings): a
    quarter of the fp32 table's memory, and only the looked-up rows are ever converted."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.dtype = embedding.weight.dtype
        q, scale = quantize_per_channel_int8(embedding.weight)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self._register_state_dict_hook(refuse_to_save)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.weight_int8).to(self.dtype) * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


@functools.cache
def _int4pack_runs() -> str | None:
    """Why PyTorch's packed int4 CPU kernel cannot run here, or None when it can (checked on a small layer)."""
    try:
        q = torch.randint(0, 16, (32, 128), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        scales_zeros = torch.ones(1, 32, 2, dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(2, 128, dtype=torch.bfloat16), packed, 128, scales_zeros)
    except Exception as e:  # missing op, unsupported CPU
        return kernels.error_summary(e)
    expected = (q.float() - 8).sum(dim=1) + 128  # (q - 8) * 1 + 1 summed over 128 ones
    return None if torch.allclose(y[0].float(), expected, rtol=1e-2) else "wrong results"


def int4_backend(device: torch.device) -> str:
    """``int4pack`` (PyTorch's packed CPU kernel) where it runs, else ``dequant``; ``CODEGEN_LM_INT4_KERNEL`` forces one."""
    forced = os.environ.get(INT4_FORCE_ENV)
    if forced:
        if forced not in ("int4pack", "dequant"):
            raise ValueError(f"{INT4_FORCE_ENV}={forced} is not an int4 kernel; use int4pack or dequant, or unset it")
        if forced == "int4pack" and (device.type != "cpu" or _int4pack_runs()):
            raise ValueError(f"{INT4_FORCE_ENV}=int4pack: that kernel does not run here; use dequant, or unset it")
        return forced
    if device.type != "cpu":
        return "dequant"
    if (reason := _int4pack_runs()) is not None:
        _warn_int4_fallback(reason)
        return "dequant"
    return "int4pack"


@functools.cache
def _warn_int4_fallback(reason: str) -> None:
    log.warning("int4: PyTorch's packed int4 CPU kernel does not run here (%s); using the portable path "
                "(dequantize, then an fp32 matmul), which is slower", reason)


class Int4Linear(nn.Module):
    """``nn.Linear`` with group-wise int4 weights (see the module docstring for the kernel)."""

    def __init__(self, linear: nn.Linear, group_size: int, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        device = linear.weight.device
        self.backend = backend or int4_backend(device)
        self.opaque_to_compile = self.backend != "dequant"
        q, scale, zero = quantize_groupwise_int4(linear.weight, group_size)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        if self.backend == "int4pack":
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), persistent=False)
            # [K / group_size, N, 2] (scale, zero), as the kernel wants.
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        elif self.backend == "dequant":
            self.register_buffer("weight_int4", q.to(torch.uint8), persistent=False)
            self.register_buffer("scale", scale, persistent=False)
            self.register_buffer("zero", zero, persistent=False)
        else:
            raise ValueError(f"unknown int4 backend {self.backend!r}; use int4pack or dequant")
        self._register_state_dict_hook(refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if self.backend == "dequant":
            groups = self.weight_int4.view(self.out_features, -1, self.group_size).to(torch.float32) - 8
            weight = (groups * self.scale[..., None] + self.zero[..., None]).view(self.out_features, self.in_features)
            y = F.linear(x, weight.to(dtype))
        else:
            x = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
            y = y.view(*shape[:-1], self.out_features).to(dtype)
        return y + self.bias.to(dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"backend={self.backend}")


class OneDNNLinear(nn.Module):
    """``nn.Linear`` for CPU fp32 inference through oneDNN's matmul, its weight in the layout measured fastest for
    its shape on this CPU, and products of fewer rows than that layout runs fastest padded with zero rows
    (``codegen_lm.kernels.fp32_plan``, or ``plan`` when given)."""

    def __init__(self, linear: nn.Linear, plan: kernels.Fp32Plan | None = None, head: bool = False,
                 several_rows: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plan = plan or kernels.fp32_plan(self.out_features, self.in_features, head, several_rows)
        weight = kernels.fp32_weight(linear.weight, self.plan.layout)
        if weight.is_mkldnn:  # kept as a plain attribute, not a buffer: an opaque tensor cannot be saved or moved
            self.weight = weight
        else:
            self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None, persistent=False)
        self._register_state_dict_hook(refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows, least = flat.shape[0], self.plan.min_rows
        if least == 1 or not (torch.compiler.is_compiling() or rows < least):
            return kernels.fp32_gemm(flat, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        # padded with zero rows up to ``least``; branch-free when compiled, where the row count may be symbolic
        y = kernels.fp32_gemm(F.pad(flat, (0, 0, 0, torch.sym_max(least - rows, 0))), self.weight, self.bias)
        return y[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend=onednn ({self.plan.describe()})"


def int4_group_size(linear: nn.Linear) -> int | None:
    """The largest supported group size that fits the layer (the CPU kernel also wants N divisible by 16)."""
    if linear.weight.device.type == "cpu" and linear.out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), None)


def prepare_linear(linear: nn.Linear, quantize: str | None, head: bool = False, several_rows: bool = False) -> nn.Module:
    """The inference form of one linear layer: int4 (int8 for the LM ``head`` and shapes the int4 kernel cannot
    take), int8, fp32 through oneDNN on CPU (its layout chosen for decode steps of ``several_rows`` when asked), or
    the layer itself."""
    if quantize == "int4" and not head and (group_size := int4_group_size(linear)):
        return Int4Linear(linear, group_size)
    if quantize:
        return Int8Linear(linear, head=head)
    weight = linear.weight
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and kernels.fp32_layouts():
        return OneDNNLinear(linear, head=head, several_rows=several_rows)
    return linear


def prepare_block(block: nn.Module, quantize: str | None, several_rows: bool = False) -> None:
    """Fuse a ``CodeGenBlock``'s projections and convert them (in place)."""
    block.fuse_projections(lambda linear: prepare_linear(linear, quantize, several_rows=several_rows))


def prepare_embedding(body: nn.Module, quantize: str | None) -> None:
    """Quantized models keep the token embedding in int8 (in place; a tied LM head must be converted first)."""
    if quantize and isinstance(body.wte, nn.Embedding):
        body.wte = Int8Embedding(body.wte)


def kernel_choices(model: nn.Module) -> dict[str, str]:
    """What runs each kind of linear layer, by precision and shape (out x in): ``{"int8 7168x1024": "fbgemm"}``;
    shown by ``codegen-lm complete --json`` and the benchmarks."""
    choices = {}
    for m in model.modules():
        shape = f"{getattr(m, 'out_features', 0)}x{getattr(m, 'in_features', 0)}"
        if isinstance(m, Int8Linear):
            choices[f"int8 {shape}"] = m.plan.describe()
        elif isinstance(m, Int4Linear):
            choices[f"int4 {shape}"] = m.backend
        elif isinstance(m, OneDNNLinear):
            choices[f"fp32 {shape}"] = "onednn " + m.plan.describe()
    return choices


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(MODES)}")


def prepare_for_inference(model: nn.Module, quantize: str | None = None, several_rows: bool = False) -> nn.Module:
    """Convert a ``CodeGenForCausalLM`` or ``CodeGenModel`` in place for inference only: fused projections,
    then int8/int4 weights when ``quantize`` says so (the token embedding and LM head in int8), else fp32 weights
    through oneDNN on CPU, in the layouts fastest for decode steps of one row, or of ``several_rows`` (n samples,
    batches of prompts, speculative verify steps; ``codegen_lm.kernels.choose_fp32``). Layer norms keep their
    precision. The model can no longer be trained or saved. Returns the model.
    (``load_model(..., inference=True)`` does this block by block while reading the checkpoint.)"""
    check_quantize(quantize)
    body = getattr(model, "transformer", model)
    if any(block.in_proj is not None for block in body.h):
        raise ValueError("the model is already prepared for inference (fused, packed or quantized); "
                         "start from the model as loaded")
    with torch.no_grad():
        for block in body.h:
            prepare_block(block, quantize, several_rows)
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            model.lm_head = prepare_linear(model.lm_head, quantize, head=True, several_rows=several_rows)
        prepare_embedding(body, quantize)
    own_memory(model)
    model.quantization = quantize
    return model


def own_memory(model: nn.Module) -> None:
    """Copy tensors that still view a memory-mapped checkpoint, so the mapping can go.

    ``load_model`` (without ``inference=True``) leaves weights as views of the mapped file, and one remaining
    view (an embedding, a layer norm) keeps the whole mapping, and every page of it that was read, resident."""
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is not None and tensor.device.type == "cpu" and not tensor.is_mkldnn:
                    tensor.data = tensor.data.clone()
