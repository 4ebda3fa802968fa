"""Training data: folders of source files, jsonl files or a `datasets` dataset → tokens → packed blocks.

Documents are read twice: a first pass hashes them (dropping exact duplicates) to find the cache key; on a
cache miss a second pass tokenizes them in parallel (the `tokenizers` thread pool) and appends each one,
followed by EOS, to a flat token file. The token files are memory-mapped at training time and cut into
fixed blocks, so a corpus is tokenized once per (content, tokenizer, split) and never held in memory.

Skipped, with a count in the summary: files that are not UTF-8 (corpora such as a language's standard
library carry a few test files in legacy encodings on purpose), empty documents and exact duplicates.
Errors: a missing path, a folder with no matching file, a file that cannot be read, a jsonl line that is
not a JSON object holding the text field, and data too small to hold out a validation document.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
EOS_TOKEN_ID = 50256
DEFAULT_EXTENSIONS = (".py",)
DEFAULT_EXCLUDE = (".*", "__pycache__")
_TOKENIZE_CHUNK_CHARS = 4 << 20  # documents handed to the tokenizer's thread pool at once


class DataError(ValueError):
    """Training data that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class DataSpec:
    """Where the documents come from and how they are selected and split."""

    paths: tuple[str, ...]
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    text_field: str = "text"
    val_fraction: float = 0.01


@dataclass
class Summary:
    """Counts from reading the documents; written to the cache's meta.json and shown to the user."""

    documents: int = 0
    duplicates: int = 0
    empty: int = 0
    not_utf8: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{self.documents} documents"]
        if self.duplicates:
            parts.append(f"{self.duplicates} exact duplicates dropped")
        if self.empty:
            parts.append(f"{self.empty} empty skipped")
        if self.not_utf8:
            parts.append(f"{len(self.not_utf8)} non-UTF-8 files skipped (first: {self.not_utf8[0]})")
        return ", ".join(parts)


@dataclass
class TokenizedData:
    """A prepared corpus: flat token streams (documents each followed by EOS), memory-mapped."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# Reading documents


def iter_documents(spec: DataSpec, summary: Summary | None = None) -> Iterator[tuple[str, str]]:
    """(label, text) of every document, in a fixed order; records skipped files in ``summary``."""
    summary = summary if summary is not None else Summary()
    if not spec.paths:
        raise DataError("no training data given; pass --data with a folder, a .jsonl file or hf:DATASET")
    for path in spec.paths:
        yield from _iter_source(path, spec, summary)


def _iter_source(path: str, spec: DataSpec, summary: Summary) -> Iterator[tuple[str, str]]:
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        yield from _iter_dataset(_load_hub_dataset(name, split or "train"), path, spec.text_field)
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {path} does not exist; pass a folder, a .jsonl file or hf:DATASET")
    if p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
        yield from _iter_dataset(_load_disk_dataset(p), path, spec.text_field)
    elif p.is_dir():
        files = list(_walk(p, spec.extensions, spec.exclude))
        if not files:
            raise DataError(
                f"no files ending in {', '.join(spec.extensions)} under {path}; check the folder or pass --ext"
            )
        for f in files:
            text = _read_text(f, summary)
            if text is not None:
                yield str(f), text
    elif p.suffix == ".jsonl":
        yield from _iter_jsonl(p, spec.text_field)
    else:
        text = _read_text(p, summary)
        if text is not None:
            yield str(p), text


def _walk(root: Path, extensions: Sequence[str], exclude: Sequence[str]) -> Iterator[Path]:
    """Files under root with one of the extensions, sorted, skipping names matching an exclude pattern."""
    exts = tuple(e if e.startswith(".") else f".{e}" for e in extensions)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in exclude)

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not excluded(d))
        for name in sorted(filenames):
            if name.endswith(exts) and not excluded(name):
                yield Path(dirpath) / name


def _read_text(path: Path, summary: Summary) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); fix it or exclude it from the data") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        summary.not_utf8.append(str(path))
        return None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); fix it or leave it out") from None
    with f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
                yield f"{path}:{lineno}", _field(row, text_field, f"{path}:{lineno}")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 (after line {lineno}); jsonl files must be UTF-8") from None


def _field(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object; each line must be an object with a {text_field!r} field")
    if text_field not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where} has no {text_field!r} field (its keys: {keys}); pass --text-field to pick one")
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a `datasets` dataset needs the datasets package: pip install 'codegen-lm[train]'") from None
    return datasets


def _load_hub_dataset(name: str, split: str) -> Any:
    return _datasets_module().load_dataset(name, split=split)


def _load_disk_dataset(path: Path) -> Any:
    ds = _datasets_module().load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: train on its train split
        if "train" not in ds:
            raise DataError(f"{path} holds splits {', '.join(ds)}, none named 'train'; save the split to train on")
        ds = ds["train"]
    return ds


def _iter_dataset(ds: Any, label: str, text_field: str) -> Iterator[tuple[str, str]]:
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {label} has no {text_field!r} column (columns: {', '.join(ds.column_names)}); pass --text-field"
        )
    for i, row in enumerate(ds.select_columns([text_field])):
        yield f"{label}[{i}]", _field(row, text_field, f"{label} row {i}")


# --------------------------------------------------------------------------------------------------------
# Tokenizing into the cache


def backend_tokenizer(tokenizer: Any) -> Any:
    """A private copy of the `tokenizers.Tokenizer` behind a (fast) tokenizer, set up for corpus encoding.

    No truncation or padding, and special-token text inside a document (source code that mentions
    ``<|endoftext|>``) stays text, so EOS marks document boundaries only.
    """
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer)")
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = True
    return copy


def _val_position(digest: bytes) -> float:
    """Where a document falls in [0, 1): the split depends on content only, not on file order."""
    return int.from_bytes(digest[:8], "big") / 2.0**64


def default_cache_dir() -> Path:
    root = os.environ.get("CODEGEN_LM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codegen_lm"
    return Path(root) / "train-data"


def prepare(
    spec: DataSpec,
    tokenizer: Any,
    cache_dir: str | os.PathLike | None = None,
    eos_token_id: int = EOS_TOKEN_ID,
    progress: bool = True,
) -> TokenizedData:
    """Tokenize the documents once into ``cache_dir/<key>/`` (reused when inputs and tokenizer match)."""
    if not 0.0 <= spec.val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {spec.val_fraction}")
    backend = backend_tokenizer(tokenizer)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    summary = Summary()
    digests: list[bytes] = []
    seen: set[bytes] = set()
    with _progress(progress) as bar:
        task = bar.add_task("reading", total=None)
        for _, text in iter_documents(spec, summary):
            bar.advance(task)
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if not text:
                summary.empty += 1
            elif digest in seen:
                summary.duplicates += 1
            else:
                seen.add(digest)
                digests.append(digest)
    summary.documents = len(digests)
    val_set = _choose_val(digests, spec.val_fraction, spec.paths)

    key = hashlib.sha256()
    key.update(json.dumps([FORMAT_VERSION, eos_token_id, spec.val_fraction]).encode())
    key.update(hashlib.sha256(backend.to_str().encode()).digest())
    for d in digests:
        key.update(d)
    directory = cache_root / key.hexdigest()[:32]
    if not (directory / "meta.json").is_file():
        _tokenize_into(directory, spec, backend, eos_token_id, val_set, summary, progress)
    return load_tokenized(directory)


def _choose_val(digests: list[bytes], fraction: float, paths: Sequence[str]) -> set[bytes]:
    if not digests:
        raise DataError(f"no usable documents in {', '.join(paths)} (all empty, duplicated or not UTF-8)")
    if fraction == 0:
        return set()
    if len(digests) < 2:
        raise DataError("only one document: a held-out split needs at least two; add data or pass --val-fraction 0")
    val = {d for d in digests if _val_position(d) < fraction}
    if not val:  # small corpora: hold out at least one document
        val = {min(digests, key=_val_position)}
    if len(val) == len(digests):
        raise DataError(f"val_fraction {fraction} leaves no training documents; lower it")
    return val


def _tokenize_into(
    directory: Path,
    spec: DataSpec,
    backend: Any,
    eos_token_id: int,
    val_set: set[bytes],
    summary: Summary,
    progress: bool,
) -> None:
    vocab = backend.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if max(vocab, eos_token_id + 1) <= 1 << 16 else np.uint32
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    counts = {"train": [0, 0], "val": [0, 0]}  # split -> [documents, tokens]
    seen: set[bytes] = set()
    try:
        with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f, _progress(progress) as bar:
            task = bar.add_task("tokenizing", total=summary.documents)
            chunk: list[tuple[str, bytes]] = []
            size = 0

            def flush() -> None:
                for (text, digest), enc in zip(chunk, backend.encode_batch([t for t, _ in chunk], add_special_tokens=False)):
                    split = "val" if digest in val_set else "train"
                    ids = np.asarray(enc.ids + [eos_token_id], dtype=dtype)
                    (val_f if split == "val" else train_f).write(ids.tobytes())
                    counts[split][0] += 1
                    counts[split][1] += len(ids)
                bar.advance(task, len(chunk))
                chunk.clear()

            for label, text in iter_documents(spec, Summary()):
                digest = hashlib.sha256(text.encode("utf-8")).digest()
                if not text or digest in seen:
                    continue
                seen.add(digest)
                chunk.append((text, digest))
                size += len(text)
                if size >= _TOKENIZE_CHUNK_CHARS:
                    flush()
                    size = 0
            flush()
        if counts["train"][0] + counts["val"][0] != summary.documents:
            raise DataError(f"the data in {', '.join(spec.paths)} changed while it was being tokenized; run again")
        meta = {
            "version": FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "eos_token_id": eos_token_id,
            "sources": list(spec.paths),
            "train_documents": counts["train"][0],
            "train_tokens": counts["train"][1],
            "val_documents": counts["val"][0],
            "val_tokens": counts["val"][1],
            "duplicates": summary.duplicates,
            "empty": summary.empty,
            "not_utf8": summary.not_utf8,
            "summary": summary.describe(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, directory)
        except OSError:  # another process (a second node's rank 0) finished the same key first
            if not (directory / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenized(directory: str | os.PathLike) -> TokenizedData:
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))

    def mmap(name: str) -> np.ndarray:
        path = directory / name
        if path.stat().st_size == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r")

    return TokenizedData(directory, mmap("train.bin"), mmap("val.bin"), meta)


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, *args: Any) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=True,
    )


# --------------------------------------------------------------------------------------------------------
# Packing


class PackedBlocks:
    """A token stream cut into consecutive blocks of ``seq_len`` tokens (no overlap, nothing dropped).

    The last block is padded with ``pad_id``; its padded positions get label -100 so they carry no loss.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int = EOS_TOKEN_ID) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return -(-len(self.tokens) // self.seq_len)

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of block i, both int64 of length seq_len."""
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range (0..{len(self) - 1})")
        piece = np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len], dtype=np.int64)
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, -100, dtype=np.int64)
        ids[: len(piece)] = piece
        labels[: len(piece)] = piece
        return ids, labels

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.block(i) for i in indices]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


class BlockOrder:
    """Which blocks each optimizer step trains on: consecutive slices of a seeded per-epoch permutation.

    A pure function of (seed, step, global batch), the same on every rank and for any number of ranks,
    so a resumed run and a run on more processes see exactly the blocks of the uninterrupted one-process run.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        if n_blocks < 1:
            raise ValueError("no blocks to train on")
        self.n_blocks = n_blocks
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            import torch

            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_blocks, generator=g).tolist()}  # keep one epoch
        return self._perms[epoch]

    def step_indices(self, step: int, global_batch: int) -> list[int]:
        out: list[int] = []
        pos, end = step * global_batch, (step + 1) * global_batch
        while pos < end:
            epoch, offset = divmod(pos, self.n_blocks)
            take = min(end - pos, self.n_blocks - offset)
            out.extend(self._perm(epoch)[offset : offset + take])
            pos += take
        return out
