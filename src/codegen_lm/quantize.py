"""Inference-only weights: ``prepare_for_inference(model, quantize=None | "int8" | "int4")``.

Each block's four projections are first fused into two matmuls (``CodeGenBlock.fuse_projections``); then every
linear layer takes the fastest form measured for its precision on this device (docs/benchmarks.md,
"Generation engine"). Batch-1 decoding reads every weight once per token, so fewer bytes per weight and fewer,
larger matmuls are more tokens per second.

* **fp32 on CPU**: oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``), with the weights reordered once
  into oneDNN's blocked layout on CPUs with AVX-512 and kept row-major elsewhere (``pack_fp32_weights``).
  Measured on the 350M shape (2 threads, AMD EPYC): with AVX-512, PyTorch's default ``F.linear`` (MKL) reached
  15 GB/s at batch 1 and 8 GB/s at batch 8, the blocked oneDNN kernel 28-31 and 24 GB/s; AVX2-only, MKL
  reached half of oneDNN's speed at every batch size, and the row-major weight was as fast as the blocked one
  at 1-8 rows and 1.3-1.5× faster from 64. Results differ from ``F.linear`` only by summation order (about 1e-6).
* **int8**: weights per output channel (symmetric, [-127, 127]), activations quantized on the fly per row. Few
  rows (decoding) go through fbgemm's int8 GEMM (``torch.ops.quantized.linear_dynamic``), many rows (prefill)
  through oneDNN's (``torch.ops.onednn.qlinear_pointwise``, 1.3-1.8× faster there, slower for a few rows; from
  16 rows with VNNI, from 256 without). Without VNNI both take 7-bit activations, since their u8×s8 products
  are summed in pairs in int16 there, which 8 bits could overflow. fbgemm quantizes a whole activation matrix
  with one scale; to keep each row independent of the others (a request's output must not depend on what else
  is in the batch) every row is scaled to max |x| = 1 first and two anchor columns (+1, -1, with zero weights)
  pin the matrix range to [-1, 1] whatever the batch holds. The oneDNN path quantizes the same way, so both
  compute the same integer products and differ only in the rounding of the final float scaling (1 ulp).
  PyTorch's weight-only ``_weight_int8pack_mm`` and torchao's int8 weight-only layers were 5-10× slower than
  fp32 here, so they are not used. A compiled decode step reaches fbgemm through the custom op
  ``codegen_lm::fbgemm_linear`` (its packed weights cannot be traced) and fuses the small ops around it.
* **int4**: weights group-wise (asymmetric, groups of 128 along the input) with PyTorch's packed int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``), which is fast with bf16 activations (and slow with fp32 ones); the output
  is cast back to fp32. The LM head stays int8: its errors land on the logits directly. It pays on CPUs with
  AVX-512 BF16; on AVX2 alone it decoded slower than int8 and prefilled 3.6× slower (docs/benchmarks.md).

On other devices (CUDA) the same quantized weights run through a plain dequantize-then-matmul path, which
is exact and portable but not a fast kernel; full-precision layers stay ``nn.Linear`` there.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import refuse_to_save

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _reduce_range() -> bool:
    # Without VNNI, fbgemm's u8×s8 kernels add pairs of products in int16, which can saturate unless the
    # activations use 7 bits. VNNI accumulates in int32, so the full 8 bits are safe.
    return "avx512_vnni" not in cpu_flags()


def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _has_vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@functools.cache
def _onednn_int8_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.onednn.qlinear_pointwise, torch.ops.onednn.qlinear_prepack
    except (AttributeError, RuntimeError):
        return False
    return True


def quantize_per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ≈ q * scale[:, None]``, q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
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


# fbgemm's packed weights are an opaque object that torch.compile cannot trace, so a compiled graph reaches each
# layer's GEMM through the custom op below, by the layer's key in this table.
_FBGEMM_LAYERS: weakref.WeakValueDictionary[int, "Int8Linear"] = weakref.WeakValueDictionary()
_FBGEMM_KEYS = itertools.count()


@torch.library.custom_op("codegen_lm::fbgemm_linear", mutates_args=())
def fbgemm_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    """fbgemm's int8 GEMM (``quantized.linear_dynamic``) of the ``Int8Linear`` whose key is ``layer``."""
    module = _FBGEMM_LAYERS[layer]
    return torch.ops.quantized.linear_dynamic(x, module._packed, module.reduce_range)


@fbgemm_linear.register_fake
def _(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 per-channel weights (see the module docstring for the kernels)."""

    def __init__(self, linear: nn.Linear, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        self.backend = backend or ("fbgemm" if device.type == "cpu" and _fbgemm_available() else "dequant")
        q, scale = quantize_per_channel_int8(linear.weight)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self._onednn = None
        if self.backend == "fbgemm":
            zero_columns = q.new_zeros(self.out_features, 2)  # weights of the two anchor inputs
            # PyTorch deprecates creating quantized tensors (the fbgemm and oneDNN ops still take them, checked with
            # torch 2.13) and warns once per process, at the first one: here, before any forward quantizes.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    torch.cat([q, zero_columns], dim=1), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.register_buffer("anchors", torch.tensor([[1.0, -1.0]], device=device), persistent=False)
            self.key = next(_FBGEMM_KEYS)
            _FBGEMM_LAYERS[self.key] = self
            self.reduce_range = _reduce_range()
            # The activation grid both kernels use for rows scaled to [-1, 1]: what fbgemm picks for that range
            # (7 bits with reduce_range), so that both compute the same integer products. From onednn_min_rows rows
            # on, oneDNN's GEMM beats fbgemm's (measured with AVX-512 VNNI: 8 rows 0.8×, 16 rows 1.2×, 2048 1.75×;
            # AVX2 only: 64 rows 0.76×, 256 1.06×, 2048 1.5×).
            self.x_scale, self.x_zero_point = (2 / 127, 64) if self.reduce_range else (2 / 255, 128)
            self.onednn_min_rows = 16 if _has_vnni() else 256
            if _onednn_int8_available():
                self._onednn = (torch.ops.onednn.qlinear_prepack(q, None), scale.float(), torch.zeros_like(scale, dtype=torch.long))
        elif self.backend == "dequant":
            self.register_buffer("weight_int8", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            raise ValueError(f"unknown int8 backend {self.backend!r}; use fbgemm or dequant")
        self._register_state_dict_hook(refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dequant":
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        rows = x.shape[0]
        # A compiled graph (decoding: few rows) always takes fbgemm, and inductor fuses the small ops around it.
        compiling = torch.compiler.is_compiling()
        # max |x| per row: a few rows (decoding) take one op, since there each small op costs its overhead (this and
        # the single cat below: 3 % of an int8 decode step on AVX2); for many rows max(amax, -amin) is 5× faster
        if compiling or rows < 16:
            norm = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-30)
        else:
            norm = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_()).clamp_(min=1e-30)
        if self._onednn is not None and not compiling and rows >= self.onednn_min_rows:
            x_q = torch.quantize_per_tensor(x / norm, self.x_scale, self.x_zero_point, torch.quint8).int_repr()
            weight, w_scale, w_zero = self._onednn
            y = torch.ops.onednn.qlinear_pointwise(x_q, self.x_scale, self.x_zero_point, weight, w_scale, w_zero, None,
                                                   1.0, 0, torch.float32, "none", [], "")
        else:
            scaled = torch.cat([x / norm, self.anchors.expand(rows, 2)], dim=1)
            if compiling:
                y = fbgemm_linear(scaled, self.key, self.out_features)
            else:
                y = torch.ops.quantized.linear_dynamic(scaled, self._packed, self.reduce_range)
        y = torch.addcmul(self.bias, y, norm) if self.bias is not None else y.mul_(norm)
        return y.view(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        kernels = self.backend + ("+onednn" if self._onednn is not None else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={kernels}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with group-wise int4 weights (see the module docstring for the kernel)."""

    def __init__(self, linear: nn.Linear, group_size: int, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        device = linear.weight.device
        self.backend = backend or ("int4pack" if device.type == "cpu" else "dequant")
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


def pack_fp32_weights() -> bool:
    """Whether fp32 weights are reordered into oneDNN's blocked layout on this CPU, or kept row-major.

    Measured (docs/benchmarks.md): with AVX-512 the blocked layout read weights at 28-31 GB/s at batch 1, MKL's
    ``F.linear`` at 15. On an AVX2-only EPYC the same oneDNN primitive over the row-major weight matched the blocked
    one at batch 1 and 8 and was 1.3-1.5× faster from 64 rows on (prefill), while MKL reached half of either."""
    return "avx512f" in cpu_flags()


class OneDNNLinear(nn.Module):
    """``nn.Linear`` for CPU fp32 inference through oneDNN's matmul (``mkldnn._linear_pointwise``), its weight
    reordered into oneDNN's blocked layout where that pays (``pack_fp32_weights``), else kept row-major."""

    def __init__(self, linear: nn.Linear, packed: bool | None = None, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_fp32_weights() if packed is None else packed
        weight = linear.weight.detach()
        if self.packed:  # kept as a plain attribute, not a buffer: an opaque tensor cannot be saved or moved
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        else:
            self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None, persistent=False)
        self._register_state_dict_hook(refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inductor lowers this op to the same oneDNN call, for weights it treats as constants: compiled with
        # freezing (``generate.compiled_decode_step``), in either layout
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "blocked" if self.packed else "row-major"
        return f"in_features={self.in_features}, out_features={self.out_features}, backend=onednn ({layout})"


def int4_group_size(linear: nn.Linear) -> int | None:
    """The largest supported group size that fits the layer (the CPU kernel also wants N divisible by 16)."""
    if linear.weight.device.type == "cpu" and linear.out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), None)


def prepare_linear(linear: nn.Linear, quantize: str | None, head: bool = False) -> nn.Module:
    """The inference form of one linear layer: int4 (int8 for the LM ``head`` and shapes the int4 kernel cannot
    take), int8, fp32 through oneDNN on CPU, or the layer itself."""
    if quantize == "int4" and not head and (group_size := int4_group_size(linear)):
        return Int4Linear(linear, group_size)
    if quantize:
        return Int8Linear(linear)
    weight = linear.weight
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return OneDNNLinear(linear)
    return linear


def prepare_block(block: nn.Module, quantize: str | None) -> None:
    """Fuse a ``CodeGenBlock``'s projections and convert them (in place)."""
    block.fuse_projections(lambda linear: prepare_linear(linear, quantize))


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(MODES)}")


def prepare_for_inference(model: nn.Module, quantize: str | None = None) -> nn.Module:
    """Convert a ``CodeGenForCausalLM`` or ``CodeGenModel`` in place for inference only: fused projections,
    then int8/int4 weights when ``quantize`` says so, else fp32 weights through oneDNN on CPU. Embeddings
    and layer norms keep their precision. The model can no longer be trained or saved. Returns the model.
    (``load_model(..., inference=True)`` does this block by block while reading the checkpoint.)"""
    check_quantize(quantize)
    body = getattr(model, "transformer", model)
    if any(block.in_proj is not None for block in body.h):
        raise ValueError("the model is already prepared for inference (fused, packed or quantized); "
                         "start from the model as loaded")
    with torch.no_grad():
        for block in body.h:
            prepare_block(block, quantize)
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            model.lm_head = prepare_linear(model.lm_head, quantize, head=True)
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
