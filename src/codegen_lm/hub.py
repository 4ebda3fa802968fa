"""Finding checkpoint files: a local folder, or a hub id downloaded (and cached) through huggingface_hub."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_MODEL = "Salesforce/codegen-350M-mono"
_UMASK = os.umask(0o022)  # read once at import (reading it means setting it), then restored
os.umask(_UMASK)


class CheckpointNotFoundError(FileNotFoundError):
    """A model or tokenizer that is neither a local folder nor reachable on the hub."""


def is_local(name_or_path: str | os.PathLike) -> bool:
    return Path(name_or_path).exists()


def resolve_file(name_or_path: str | os.PathLike, filename: str, required: bool = True) -> Path | None:
    """Path of ``filename`` inside a checkpoint folder or hub repo; None if optional and absent."""
    name = str(name_or_path)
    if is_local(name):
        path = Path(name) / filename
        if path.is_file():
            return path
        if required:
            raise CheckpointNotFoundError(f"{filename} not found in {name}; is this a CodeGen checkpoint folder?")
        return None
    return _hub_file(name, filename, required)


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub answers at all; without this check an offline machine waits through ~25 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


def _hub_file(repo_id: str, filename: str, required: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # no retry chatter: the errors below say what happened
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=not hub_reachable()))
    except HFValidationError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid hub id (like {DEFAULT_MODEL})"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a folder here and not a model on the Hugging Face hub; check the name or path"
        ) from None
    except LocalEntryNotFoundError:
        # Offline (or HF_HUB_OFFLINE=1) and the file is not in the local cache.
        if not required and _cached_elsewhere(repo_id):
            return None
        raise CheckpointNotFoundError(
            f"cannot download {repo_id!r} ({filename}): no network and not in the hub cache; "
            f"connect once to download it, or pass a local checkpoint folder"
        ) from None
    except EntryNotFoundError:  # after its subclass LocalEntryNotFoundError
        if required:
            raise CheckpointNotFoundError(f"{filename} not found in hub repo {repo_id}") from None
        return None
    except OSError as e:  # connection errors and the like
        raise CheckpointNotFoundError(f"cannot download {repo_id!r} ({filename}): {e}") from None


def _cached_elsewhere(repo_id: str) -> bool:
    """True when some file of this repo is in the local cache (so a missing optional file is really absent)."""
    from huggingface_hub import scan_cache_dir

    try:
        return any(repo.repo_id == repo_id for repo in scan_cache_dir().repos)
    except Exception:
        return False


def list_files(name_or_path: str | os.PathLike) -> list[str]:
    """File names of a checkpoint: the folder's listing, or the hub repo's (cached listing when offline)."""
    name = str(name_or_path)
    if is_local(name):
        return sorted(p.name for p in Path(name).iterdir() if p.is_file())
    from huggingface_hub import list_repo_files

    if not hub_reachable():
        return []  # callers fall back to trying well-known names one by one (from the cache)
    try:
        return sorted(list_repo_files(name))
    except Exception:
        return []


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` only if the block succeeds, so
    readers see the old file or the new one, never half of it. The file gets the usual umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private (0600)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
