"""Convert CodeGen checkpoints to the formats other engines serve, and back.

* ``gptj``: a transformers ``GPTJForCausalLM`` checkpoint (vLLM, TGI, FasterTransformer and llama.cpp serve
  GPT-J, not CodeGen). The networks are the same but for the fused qkv projection, which is re-ordered and
  split into q/k/v (DESIGN §2), so the export is exact in fp32.
* ``codegen``: a GPT-J checkpoint back to the official CodeGen layout (the round trip is bit-identical).
* ``ctranslate2``: through CTranslate2's own converter (it loads the model with transformers, so this target
  needs the ``ctranslate2`` and ``transformers`` packages).

The gptj/codegen conversions stream: tensors are read one at a time from memory-mapped files and written
as safetensors shards, so peak memory is about one output shard, not the model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import weight_files
from .config import CodeGenConfig
from .hub import CheckpointNotFoundError, atomic_write_text, is_local, list_files, resolve_file
from .model import qkv_official_to_plain, qkv_plain_to_official

FORMATS = ("gptj", "codegen", "ctranslate2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES), checked before the slow load.
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
CT2_TYPE_OF_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Copied along so the converted folder is self-contained (engines load the tokenizer from the model folder).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json",
)
DEFAULT_SHARD_BYTES = 2 * 2**30
# Buffers that old pickles carry (CodeGen's causal_mask/masked_bias, GPT-J's bias/masked_bias): not weights.
IGNORED = re.compile(r"\.attn\.(causal_mask|masked_bias|bias)$")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ConversionError(ValueError):
    """The source, target or options of a conversion are not usable; the message says what to do."""


# --- qkv layout -------------------------------------------------------------------------------------------


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CodeGen's fused [3E, E] qkv_proj weight (4 shards of q, v, k) → GPT-J's q, k, v projections [E, E]."""
    q, k, v = (t.clone() for t in qkv_official_to_plain(qkv).chunk(3))  # own storage each: safetensors refuses shared memory
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor]:
    """Inverse of :func:`split_qkv`."""
    return (qkv_plain_to_official(torch.cat([q, k, v])),)


# --- names and shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Source tensors ``inputs`` become ``outputs`` through ``fn`` (a rename when fn is None)."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]] | None = None


def codegen_shapes(c: CodeGenConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the official CodeGen layout with its shape, in file order."""
    e, inner, vocab = c.n_embd, c.inner_dim, c.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, e)}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (e,), p + "ln_1.bias": (e,),
            p + "attn.qkv_proj.weight": (3 * e, e), p + "attn.out_proj.weight": (e, e),
            p + "mlp.fc_in.weight": (inner, e), p + "mlp.fc_in.bias": (inner,),
            p + "mlp.fc_out.weight": (e, inner), p + "mlp.fc_out.bias": (e,),
        }
    shapes |= {"transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,), "lm_head.weight": (vocab, e), "lm_head.bias": (vocab,)}
    return shapes


def _qkv_names(qkv_name: str) -> tuple[str, str, str]:
    prefix = qkv_name.removesuffix("qkv_proj.weight")
    return prefix + "q_proj.weight", prefix + "k_proj.weight", prefix + "v_proj.weight"


def gptj_shapes(c: CodeGenConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in codegen_shapes(c).items():
        if name.endswith("qkv_proj.weight"):
            shapes |= dict.fromkeys(_qkv_names(name), (c.n_embd, c.n_embd))
        else:
            shapes[name] = shape
    return shapes


def codegen_to_gptj_steps(c: CodeGenConfig) -> list[Step]:
    return [
        Step(_qkv_names(name), (name,), split_qkv) if name.endswith("qkv_proj.weight") else Step((name,), (name,))
        for name in codegen_shapes(c)
    ]


def gptj_to_codegen_steps(c: CodeGenConfig) -> list[Step]:
    return [
        Step((name,), _qkv_names(name), fuse_qkv)
        if name.endswith("qkv_proj.weight") else Step((name,), (name,))
        for name in codegen_shapes(c)
    ]


# --- configs ----------------------------------------------------------------------------------------------

# Keys that describe the file rather than the network: rewritten for the target.
_FILE_KEYS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map"}


def gptj_config(c: CodeGenConfig, dtype: torch.dtype) -> dict[str, Any]:
    """GPT-J's config.json: the same field names as CodeGen's; other keys (n_ctx, ...) ride along for the round trip."""
    data = {k: v for k, v in c.to_dict().items() if k not in _FILE_KEYS}
    data |= {
        "architectures": ["GPTJForCausalLM"], "model_type": "gptj",
        "rotary_dim": c.rotary_dims,  # GPT-J's config wants a number; CodeGen's None means the whole head
        "tie_word_embeddings": False, "torch_dtype": DTYPE_NAMES[dtype],
    }
    return dict(sorted(data.items()))


def codegen_config_from_gptj(data: dict[str, Any]) -> CodeGenConfig:
    """CodeGen's config from GPT-J's (same field names and defaults); other keys are kept."""
    return CodeGenConfig.from_dict({k: v for k, v in data.items() if k not in _FILE_KEYS})


# --- reading ----------------------------------------------------------------------------------------------


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Pre-1.6 pickles (not zip files) cannot be memory-mapped: they are read whole.
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types, with messages of many lines
        raise ConversionError(
            f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}): it is damaged or holds more than "
            f"tensors; re-download it, or re-save it with torch.save(model.state_dict())"
        ) from None


class TensorReader:
    """Reads a checkpoint's tensors one at a time from its weight files (safetensors or torch pickles).

    Files are memory-mapped, so reading a tensor costs only its pages; :meth:`release` unmaps them so that the
    pages already read stop counting against this process.
    """

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
        self._open: dict[Path, Any] = {}
        for path in self.files:
            handle = self._handle(path)
            for name in handle.keys():
                self.where[name] = path
                self.meta[name] = self._meta(handle, name)
        self.release()

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            if path.suffix == ".safetensors":
                try:
                    self._open[path] = safe_open(path, framework="pt")
                except Exception as e:
                    raise ConversionError(f"cannot read {path} as safetensors ({e}); re-download or re-save it") from None
            else:
                self._open[path] = _load_pickle(path)
        return self._open[path]

    @staticmethod
    def _meta(handle: Any, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        if isinstance(handle, dict):
            t = handle[name]
            return tuple(t.shape), t.dtype
        s = handle.get_slice(name)
        return tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype())

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(self.where[name])
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)

    def release(self) -> None:
        self._open.clear()


def _weight_files(src: str) -> list[Path]:
    try:
        return weight_files(src)
    except CheckpointNotFoundError:
        if "adapter_config.json" in list_files(src):
            raise ConversionError(
                f"{src} holds a LoRA adapter, not full weights; merge it into its base model first, then convert the merged folder"
            ) from None
        raise


def _read_config(src: str) -> dict[str, Any]:
    path = resolve_file(src, "config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a model config (expected a JSON object)")
    return data


def _check_tensors(reader: TensorReader, expected: dict[str, tuple[int, ...]], src: str) -> None:
    names = {n for n in reader.where if not IGNORED.search(n)}
    missing = [n for n in expected if n not in names]
    if missing:
        raise ConversionError(
            f"{src} lacks {len(missing)} tensor(s) its config.json implies (first: {missing[0]}); "
            f"is it a complete checkpoint of this architecture?"
        )
    unexpected = sorted(names - expected.keys())
    if unexpected:
        hint = "merge LoRA adapters first" if any("lora" in n for n in unexpected) else "is it a different architecture?"
        raise ConversionError(f"{src} has {len(unexpected)} tensor(s) this conversion does not know (first: {unexpected[0]}); {hint}")
    for name, shape in expected.items():
        found, dtype = reader.meta[name]
        if found != shape:
            raise ConversionError(f"{name} in {src} has shape {list(found)} but config.json implies {list(shape)}")
        if dtype is None or not dtype.is_floating_point:
            raise ConversionError(f"{name} in {src} is not a floating-point tensor; is this a quantized checkpoint?")


# --- writing ----------------------------------------------------------------------------------------------


def _plan_shards(reader: TensorReader, steps: list[Step], dtype: torch.dtype | None, max_bytes: int) -> list[list[Step]]:
    shards: list[list[Step]] = [[]]
    used = 0
    for step in steps:
        nbytes = sum(_nbytes(reader.meta[n], dtype) for n in step.inputs)
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(step)
        used += nbytes
    return shards


def _nbytes(meta: tuple[tuple[int, ...], torch.dtype | None], dtype: torch.dtype | None) -> int:
    shape, src_dtype = meta
    numel = 1
    for d in shape:
        numel *= d
    return numel * (dtype or src_dtype).itemsize  # type: ignore[union-attr]


def _progress(enabled: bool, total: int, description: str) -> Any:
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    progress.add_task(description, total=total)
    return progress


def _run_steps(reader: TensorReader, steps: list[Step], dtype: torch.dtype | None, bar: Any) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for step in steps:
        inputs = [reader.get(n) for n in step.inputs]
        outputs = step.fn(*inputs) if step.fn else tuple(inputs)
        tensors |= {name: t.to(dtype or t.dtype).contiguous() for name, t in zip(step.outputs, outputs)}
        if bar is not None:
            bar.advance(bar.task_ids[0], sum(_nbytes(reader.meta[n], dtype) for n in step.inputs))
    return tensors


def write_safetensors(
    reader: TensorReader, steps: list[Step], out_dir: Path, dtype: torch.dtype | None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
) -> list[str]:
    """Run ``steps`` and write their outputs as (sharded) safetensors with an index; returns the file names."""
    shards = _plan_shards(reader, steps, dtype, max_shard_bytes)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(_nbytes(reader.meta[n], dtype) for s in steps for n in s.inputs)
    weight_map: dict[str, str] = {}
    total_size = 0
    with _progress(progress, total, "converting") as bar:
        for filename, shard in zip(names, shards):
            tensors = _run_steps(reader, shard, dtype, bar)
            save_file(tensors, out_dir / filename, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, filename)
            total_size += sum(t.nbytes for t in tensors.values())
            # Drop every reference into the mapped source before unmapping it: one tensor left alive would keep
            # the whole mapping, and every page read through it, resident.
            del tensors
            reader.release()
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return names


def _side_files(src: str) -> dict[str, Path]:
    """Tokenizer (and generation config) files of the source, by name."""
    listing = set(list_files(src))
    found = {}
    for name in SIDE_FILES:
        if listing and name not in listing:
            continue
        path = resolve_file(src, name, required=False)
        if path is not None:
            found[name] = path
    return found


@contextmanager
def _atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``dst`` that replaces it only when the body succeeds."""
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists; pass --force to replace it, or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- targets ----------------------------------------------------------------------------------------------


def _model_type(data: dict[str, Any]) -> str:
    return str(data.get("model_type", "?"))


def _convert_layout(src: str, out_dir: Path, to: str, data: dict[str, Any], dtype: torch.dtype | None,
                    max_shard_bytes: int, progress: bool) -> None:
    model_type = _model_type(data)
    if to == "gptj":
        if model_type == "gptj":
            raise ConversionError(f"{src} is already a GPT-J checkpoint; use --to codegen to convert it back, or --to ctranslate2")
        if model_type != "codegen":
            raise ConversionError(f"{src} is a {model_type!r} model; --to gptj converts CodeGen checkpoints (model_type 'codegen')")
        config = CodeGenConfig.from_dict(data)
        expected, steps = codegen_shapes(config), codegen_to_gptj_steps(config)
    else:
        if model_type == "codegen":
            raise ConversionError(f"{src} is already in the CodeGen layout; use --to gptj or --to ctranslate2")
        if model_type != "gptj":
            raise ConversionError(f"{src} is a {model_type!r} model; --to codegen converts GPT-J checkpoints (model_type 'gptj')")
        config = codegen_config_from_gptj(data)
        expected, steps = gptj_shapes(config), gptj_to_codegen_steps(config)
    reader = TensorReader(_weight_files(src))
    _check_tensors(reader, expected, src)
    out_dtype = dtype or reader.meta["transformer.wte.weight"][1]
    write_safetensors(reader, steps, out_dir, dtype, max_shard_bytes, progress)
    if to == "gptj":
        atomic_write_text(out_dir / "config.json", json.dumps(gptj_config(config, out_dtype), indent=2) + "\n")
    else:
        config.extra["torch_dtype"] = DTYPE_NAMES[out_dtype]  # type: ignore[index]
        config.save_pretrained(out_dir)
    for name, path in _side_files(src).items():
        shutil.copyfile(path, out_dir / name)


def _convert_ctranslate2(src: str, out_dir: Path, data: dict[str, Any], quantization: str | None) -> None:
    model_type = _model_type(data)
    if model_type not in ("codegen", "gptj"):
        raise ConversionError(f"{src} is a {model_type!r} model; --to ctranslate2 converts CodeGen (or GPT-J export) checkpoints")
    missing = [pkg for pkg in ("ctranslate2", "transformers") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ConversionError(
            f"--to ctranslate2 needs the {' and '.join(missing)} package(s): pip install 'codegen-lm[convert]'"
        )
    side = list(_side_files(src))
    if "tokenizer.json" not in side and not {"vocab.json", "merges.txt"} <= set(side):
        raise ConversionError(
            f"{src} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); CTranslate2 stores the "
            f"vocabulary with the model: copy the base model's tokenizer files into {src}"
        )
    if model_type == "gptj":
        # CTranslate2's GPT-J loader, unlike its CodeGen one, does not pad the vocabulary to the embedding's rows
        # (51200 for 50295 tokens in the released models): go through the CodeGen layout.
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f"{out_dir.name}.codegen.") as staged:
            _convert_layout(src, Path(staged), "codegen", data, None, DEFAULT_SHARD_BYTES, progress=False)
            _run_ctranslate2(staged, out_dir, side, quantization)
    else:
        _weight_files(src)  # a clear error for missing weights before transformers' own
        _run_ctranslate2(src, out_dir, side, quantization)


def _run_ctranslate2(src: str, out_dir: Path, copy_files: list[str], quantization: str | None) -> None:
    from ctranslate2.converters import TransformersConverter

    converter = TransformersConverter(
        src, copy_files=copy_files, low_cpu_mem_usage=True, load_as_float16=quantization in ("float16", "int8_float16"),
    )
    converter.convert(str(out_dir), quantization=quantization, force=True)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    dtype: str | None = None,
    quantization: str | None = None,
    force: bool = False,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Convert the checkpoint ``src`` (folder or hub id) into a new folder ``dst`` in format ``to``.

    ``dtype`` (fp32, fp16, bf16) casts the weights (default: keep the source's); ``quantization`` is CTranslate2's
    weight type. ``dst`` appears only complete: it is built in a temporary folder beside it, then renamed.
    """
    if to not in FORMATS:
        raise ConversionError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantization is not None:
        if to != "ctranslate2":
            raise ConversionError(f"--quantization applies to --to ctranslate2 only; for {to} use --dtype")
        if quantization not in QUANTIZATIONS:
            raise ConversionError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if dtype is not None:
            raise ConversionError("for ctranslate2 pass either --dtype or --quantization (e.g. int8_float16), not both")
    src, dst = str(src), Path(dst)
    if is_local(src) and (Path(src).resolve() == dst.resolve() or dst.resolve() in Path(src).resolve().parents):
        raise ConversionError(f"the destination {dst} would replace the source {src}; choose another destination")
    data = _read_config(src)
    with _atomic_dir(dst, force) as tmp:
        if to == "ctranslate2":
            _convert_ctranslate2(src, tmp, data, quantization or (CT2_TYPE_OF_DTYPE[dtype] if dtype else None))
        else:
            _convert_layout(src, tmp, to, data, DTYPES[dtype] if dtype else None, max_shard_size, progress)
    return dst
