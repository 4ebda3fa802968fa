"""Inference-only linear layers: ``quantize_model(model, "int8" | "int4")`` and, for full precision on CPU,
``pack_model(model)``.

Batch-1 decoding reads every weight once per token, so fewer bytes per weight is more tokens per second.
The kernels are the ones measured fastest on x86 CPUs (docs/benchmarks.md, "Generation engine"):

* **int8**: weights per output channel (symmetric, [-127, 127]); fbgemm's int8 GEMM
  (``torch.ops.quantized.linear_dynamic``, VNNI where the CPU has it) with the activations quantized on the
  fly. fbgemm quantizes a whole activation matrix with one scale; to keep each row independent of the others
  (a request's output must not depend on what else is in the batch) every row is scaled to max |x| = 1 first
  and two anchor columns (+1, -1, with zero weights) pin the matrix range to [-1, 1] whatever the batch holds.
  That makes it per-row activation quantization, bit-for-bit the same alone or batched.
  PyTorch's weight-only ``_weight_int8pack_mm`` and torchao's int8 weight-only layers were 5-10× slower than
  fp32 here, so they are not used.
* **int4**: weights group-wise (asymmetric, groups of 128 along the input) with PyTorch's packed int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``), which is fast with bf16 activations (and slow with fp32 ones); the output
  is cast back to fp32. The LM head stays int8: its errors land on the logits directly.

On other devices (CUDA) the same quantized weights run through a plain dequantize-then-matmul path, which
is exact and portable but not a fast kernel.

* **fp32 on CPU** (``pack_model``): the same weights reordered once into oneDNN's blocked layout and multiplied
  with ``torch.ops.mkldnn._linear_pointwise``. Measured on the 350M shape (2 threads, AMD EPYC with AVX-512),
  PyTorch's default ``F.linear`` (MKL) reached 15 GB/s at batch 1 and 8 GB/s at batch 8; the packed oneDNN
  kernel 28-31 and 24 GB/s, and it is faster for prefill-sized batches too. Results differ from ``F.linear``
  only by summation order (about 1e-6). The model can no longer be trained or saved, so the generator does
  this only to models it loads itself.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 per-channel weights (see the module docstring for the kernel)."""

    def __init__(self, linear: nn.Linear, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        self.backend = backend or ("fbgemm" if device.type == "cpu" and _fbgemm_available() else "dequant")
        q, scale = quantize_per_channel_int8(linear.weight)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        if self.backend == "fbgemm":
            zero_columns = q.new_zeros(self.out_features, 2)  # weights of the two anchor inputs
            with warnings.catch_warnings():  # quantized-tensor constructors are deprecated, the fbgemm ops are not
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    torch.cat([q, zero_columns], dim=1), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.register_buffer("anchors", torch.tensor([[1.0, -1.0]], device=device), persistent=False)
            self.reduce_range = _reduce_range()
        elif self.backend == "dequant":
            self.register_buffer("weight_int8", q, persistent=False)
            self.register_buffer("scale", scale, persistent=False)
        else:
            raise ValueError(f"unknown int8 backend {self.backend!r}; use fbgemm or dequant")
        self._register_state_dict_hook(_refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "dequant":
            y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        norm = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-30)
        x = torch.cat([x / norm, self.anchors.expand(x.shape[0], 2)], dim=1)
        y = torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)
        y = torch.addcmul(self.bias, y, norm) if self.bias is not None else y.mul_(norm)
        return y.view(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class Int4Linear(nn.Module):
    """``nn.Linear`` with group-wise int4 weights (see the module docstring for the kernel)."""

    def __init__(self, linear: nn.Linear, group_size: int, backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        device = linear.weight.device
        self.backend = backend or ("int4pack" if device.type == "cpu" else "dequant")
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
        self._register_state_dict_hook(_refuse_to_save)

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


class PackedLinear(nn.Module):
    """``nn.Linear`` for CPU inference with its weight in oneDNN's blocked layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # An opaque oneDNN tensor: kept as a plain attribute, not a buffer (it cannot be saved or moved).
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.register_buffer("bias", linear.bias.detach() if linear.bias is not None else None, persistent=False)
        self._register_state_dict_hook(_refuse_to_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight_packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend=onednn"


def packing_pays(model: nn.Module) -> bool:
    """Whether ``pack_model`` applies: full-precision linear layers on a CPU with oneDNN."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return (
        bool(linears) and torch.backends.mkldnn.is_available()
        and all(m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in linears)
    )


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every fp32 ``nn.Linear`` of a CPU model by a ``PackedLinear`` in place (inference only: the model
    cannot be trained or saved afterwards). Returns the model."""
    if not packing_pays(model):
        raise ValueError("pack_model needs a float32 model on a CPU with oneDNN (torch.backends.mkldnn)")
    with torch.no_grad():
        for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedLinear(linear))
    _own_memory(model)
    model.packed = True
    return model


def _own_memory(model: nn.Module) -> None:
    # The loader leaves weights as views of the memory-mapped checkpoint, and one remaining view (an embedding,
    # a layer norm) keeps the whole mapping, and every page of it the replaced layers read, resident. Copying
    # what is left lets the mapping go.
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is not None and tensor.device.type == "cpu" and not tensor.is_mkldnn:
                    tensor.data = tensor.data.clone()


def _refuse_to_save(*args: object) -> None:
    raise ValueError("a quantized or packed model cannot be saved; save the model as loaded, before quantizing")


def int4_group_size(linear: nn.Linear) -> int | None:
    """The largest supported group size that fits the layer (the CPU kernel also wants N divisible by 16)."""
    if linear.weight.device.type == "cpu" and linear.out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), None)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the linear layers of a CodeGen model in place: ``"int8"`` everywhere, or ``"int4"`` in the
    blocks with the LM head in int8 (layers whose shape the int4 kernel cannot take stay int8 too).
    Embeddings and layer norms stay in full precision. Returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    if any(isinstance(m, (Int8Linear, Int4Linear, PackedLinear)) for m in model.modules()):
        raise ValueError("the model is already quantized or packed; quantize the model as loaded")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for name, linear in targets:
            group_size = int4_group_size(linear) if mode == "int4" and not name.endswith("lm_head") else None
            quantized = Int4Linear(linear, group_size) if group_size else Int8Linear(linear)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
    _own_memory(model)
    model.quantization = mode
    return model
