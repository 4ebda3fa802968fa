"""Load and save checkpoints in the official layout: config.json plus .safetensors or .bin, single or sharded.

Loading builds the model on the meta device and assigns each tensor of the memory-mapped file as it is read,
so the weights are never held twice in memory; a model loaded for inference is converted block by block as
it is read, from copies of the tensors (``load_model(..., inference=True)``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .config import CodeGenConfig
from .hub import CheckpointNotFoundError, atomic_path, atomic_write_text, is_local, list_files, resolve_file
from .memory import release_freed_memory, reuse_large_buffers
from .model import CodeGenForCausalLM, CodeGenPreTrainedModel, rotary_table
from .quantize import check_quantize, prepare_block, prepare_embedding, prepare_linear

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None, config: CodeGenConfig | None = None, device: str = "cpu") -> torch.dtype:
    """``None`` → fp32; ``"auto"`` → the checkpoint's dtype on GPU, fp32 on CPU (half matmuls are slow there)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        saved = (config.extra.get("torch_dtype") if config else None) or "float32"
        return DTYPES.get(saved, torch.float32) if saved != "float16" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16 or auto")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None, device_map: str | dict | None = None) -> torch.device:
    """``None`` → CPU (as in transformers); ``"auto"`` → the GPU when there is one, else CPU."""
    if device_map is not None:
        if isinstance(device_map, dict):
            devices = set(device_map.values())
            if len(devices) != 1:
                raise ValueError("device_map across several devices is not supported; give one device")
            device = devices.pop()
        else:
            device = device_map
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here; use --device cpu")
    return device


def weight_files(name_or_path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint, preferring safetensors; resolves shards through their index."""
    listed = list_files(name_or_path)
    candidates = [f for f in WEIGHT_FILES if f in listed] if listed else list(WEIGHT_FILES)
    for name in candidates:
        path = resolve_file(name_or_path, name, required=False)
        if path is None:
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path} is not a valid shard index ({e}); re-download the checkpoint") from None
            return [resolve_file(name_or_path, shard) for shard in sorted(set(weight_map.values()))]
        return [path]
    where = "folder" if is_local(name_or_path) else "hub repo"
    raise CheckpointNotFoundError(f"no weights ({' or '.join(WEIGHT_FILES[::2])}) in {where} {name_or_path}")


def _read_order(key: str, convert_embedding: bool = False) -> tuple[int, int]:
    """The LM head first: preparing it for inference makes a second copy, best made while little else is in
    memory (so does quantizing the embedding, read next then). Then the blocks one after another, so that each
    block is complete, and converted, before the next is read. Everything else (an embedding kept as read, the
    final norm) comes last and adds no copy to the memory peak."""
    if key.startswith("lm_head."):
        return (0, 0)
    if convert_embedding and key.endswith("wte.weight"):
        return (0, 1)
    block = re.search(r"(?:^|\.)h\.(\d+)\.", key)
    return (1, int(block.group(1))) if block else (2, 0)


_COPY_SLICE_BYTES = 8 << 20


def _copy_tensor(path: Path, key: str) -> torch.Tensor:
    """A copy of one safetensors tensor that no mapping outlives. safetensors maps the file as a whole, and every
    page read through the mapping stays resident until it closes: a large tensor is therefore copied in slices
    of at most 8 MB, each read under its own mapping, so that reading adds at most that much to the copy."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shape = f.get_slice(key).get_shape()
        if not shape or math.prod(shape) * 4 <= _COPY_SLICE_BYTES:  # small (at most 4 bytes per element)
            return f.get_tensor(key).clone()
    rows = max(1, _COPY_SLICE_BYTES * shape[0] // (math.prod(shape) * 4))
    copy = None
    for start in range(0, shape[0], rows):
        with safe_open(str(path), framework="pt") as f:
            piece = f.get_slice(key)[start : start + rows]
            if copy is None:
                copy = piece.new_empty(shape)
            copy[start : start + rows] = piece
    return copy


def iter_tensors(files: list[Path], owned: bool = False, convert_embedding: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from .safetensors or .bin files, in ``_read_order``. The tensors view the memory-mapped file
    (its pages are read as they are used), or with ``owned`` are copies: then no mapping outlives the load."""
    order = functools.partial(_read_order, convert_embedding=convert_embedding)
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = sorted(f.keys(), key=order)
                    if not owned:
                        for key in keys:
                            yield key, f.get_tensor(key)
                        continue
                for key in keys:
                    yield key, _copy_tensor(path, key)
            except SafetensorError as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download the checkpoint") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # pickle errors come in many types
                raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
            for key in sorted(state, key=order):
                tensor = state.pop(key)  # one mapping for the file: it goes when its last view does
                yield key, tensor.clone() if owned else tensor


def load_model(
    name_or_path: str | os.PathLike,
    model_class: type[CodeGenPreTrainedModel] = CodeGenForCausalLM,
    torch_dtype: str | torch.dtype | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    quantize: str | None = None,
    inference: bool = False,
    config: CodeGenConfig | None = None,
    several_rows: bool = False,
) -> CodeGenPreTrainedModel:
    """Load a CodeGen checkpoint (hub id or folder) into ``model_class``, in eval mode.

    ``quantize`` (int8/int4) or ``inference=True`` prepare the model for inference only
    (``codegen_lm.quantize.prepare_for_inference``: fused projections, int8/int4 or oneDNN fp32 weights).
    That happens block by block as the checkpoint is read, and each block's full-precision tensors are let go
    at once, so memory peaks near the final size instead of the full-precision model plus its converted copy
    (each safetensors tensor is copied with its file open alone; a .bin file is one mapping, resident until
    loading ends). No tensor of such a model views the file afterwards. ``several_rows``: fp32 weights take the
    layouts fastest for decode steps of several rows (n samples, batches of prompts, speculative verify steps)
    rather than of one."""
    check_quantize(quantize)
    prepare = inference or quantize is not None
    config = config or CodeGenConfig.from_pretrained(name_or_path)
    target = parse_device(device, device_map)
    dtype = parse_dtype(dtype if dtype is not None else torch_dtype, config, str(target))
    with torch.device("meta"), _no_init():
        model = model_class(config)
    # the state dict's names and shapes, without running its hooks on meta tensors (see _no_init)
    expected = {k: v.shape for k, v in model.named_parameters(remove_duplicate=False)}
    prefix = "" if model_class is CodeGenForCausalLM else "transformer."
    tied = config.tie_word_embeddings
    body = model if prefix else model.transformer
    # What is converted as soon as all its tensors are read: each block and the (untied) LM head.
    units: dict[str, Callable[[], None]] = {}
    if prepare:
        for i, block in enumerate(body.h):
            units[f"{'' if prefix else 'transformer.'}h.{i}."] = functools.partial(prepare_block, block, quantize, several_rows)
        if not prefix and not tied:
            units["lm_head."] = functools.partial(_prepare_head, model, quantize, several_rows)
    convert_embedding = quantize is not None and not (tied and not prefix)  # a tied head is made from it at the end
    if convert_embedding:
        units[f"{'' if prefix else 'transformer.'}wte."] = functools.partial(prepare_embedding, body, quantize)
    wanted = {unit: sum(key.startswith(unit) for key in expected) for unit in units}

    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    for key, tensor in iter_tensors(weight_files(name_or_path), owned=prepare, convert_embedding=convert_embedding):
        if key.endswith(("attn.causal_mask", "attn.masked_bias")):
            continue
        if prefix:  # a CodeGenModel reads the body of a CausalLM checkpoint
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        if key not in expected:
            raise ValueError(f"unexpected weight {key!r} in {name_or_path}; is this a CodeGen checkpoint?")
        if tensor.shape != expected[key]:
            raise ValueError(
                f"weight {key!r} has shape {tuple(tensor.shape)} in {name_or_path}, "
                f"but the config expects {tuple(expected[key])}; config.json and the weights disagree"
            )
        seen.add(key)
        unit = next((u for u in units if key.startswith(u)), "")
        pending.setdefault(unit, {})[key] = tensor.to(device=target, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if unit and len(pending[unit]) == wanted[unit]:
            del tensor  # the block's modules hold the only references, so converting frees each tensor
            model.load_state_dict(pending.pop(unit), strict=False, assign=True)
            with torch.no_grad():
                units[unit]()
            release_freed_memory()
    missing = sorted(set(expected) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(
            f"weight {missing[0]!r} (shape {tuple(expected[missing[0]])}) is missing from {name_or_path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model.load_state_dict(pending.pop("", {}), strict=False, assign=True)
    body.rotary = rotary_table(config).to(target)
    if tied and not prefix:
        model.lm_head.weight = model.transformer.wte.weight
        if prepare:
            _prepare_head(model, quantize, several_rows)
            prepare_embedding(body, quantize)
    model.eval()
    model.quantization = quantize
    if prepare:
        release_freed_memory()
        reuse_large_buffers()  # the process runs inference from here on (see codegen_lm.memory)
    return model


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """torch.nn.init's functions do nothing meanwhile (as in transformers' ``no_init_weights``): a model built on
    the meta device gets its weights from the checkpoint, and most ops on meta tensors (``normal_`` among them) import
    sympy and torch._dynamo for their shape checks, about 70 MB that stay resident (torch 2.13)."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _prepare_head(model: CodeGenForCausalLM, quantize: str | None, several_rows: bool) -> None:
    with torch.no_grad():
        model.lm_head = prepare_linear(model.lm_head, quantize, head=True, several_rows=several_rows)


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def parse_size(size: int | str) -> int:
    """Bytes in ``5GB``, ``500MB``, ``2GiB`` or a plain number."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text, scale = size.strip().upper(), 1
    for unit, factor in units.items():
        if text.endswith(unit):
            text, scale = text[: -len(unit)], factor
            break
    try:
        return int(float(text) * scale)
    except ValueError:
        raise ValueError(f"{size!r} is not a size; write it like 2GiB, 500MB or 1000000") from None


def save_model(
    model: CodeGenPreTrainedModel,
    save_directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """config.json + weights in the official layout (what transformers' ``save_pretrained`` writes)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    saved_dtype = next(iter(state.values())).dtype
    config.extra["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    config.save_pretrained(out)

    base, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    shards = _shards(state, parse_size(max_shard_size))
    names = [f"{base}.{ext}"] if len(shards) == 1 else [
        f"{base}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        _atomic_save_tensors(shard, out / name, safe_serialization)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        names.append(f"{base}.{ext}.index.json")
        atomic_write_text(out / names[-1], json.dumps(index, indent=2) + "\n")
    # Only now, so that a save failing part way leaves the earlier one loadable (each file is replaced atomically;
    # only a sharded save over one with as many shards mixes them until its index is in place): the earlier save's
    # other files (shards an index would pick up, a single file that would take precedence over an index).
    for old in out.glob(f"{base}*.{ext}*"):
        if old.name not in names:
            old.unlink()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, safe: bool) -> None:
    with atomic_path(path) as tmp:
        if safe:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
