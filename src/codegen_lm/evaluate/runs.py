"""A run's folder: its settings (a resumed run must match them), and jsonl files appended one record at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..hub import atomic_write_text


class SettingsMismatchError(ValueError):
    """An output folder holds a run made with other settings."""


def start_run(folder: Path, settings: dict[str, Any]) -> None:
    """Create ``folder`` for a run with ``settings``, or check that the run already there used the same ones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    settings = json.loads(json.dumps(settings))  # what it reads back as (tuples become lists, ...)
    if path.exists():
        old = json.loads(path.read_text())
        # a setting added since that run was made, left at None, is the same run
        settings = {k: v for k, v in settings.items() if k in old or v is not None}
        if old != settings:
            diff = ", ".join(f"{key}: {old.get(key)!r} there, {settings.get(key)!r} now"
                             for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key))
            raise SettingsMismatchError(
                f"{folder} holds a run with other settings ({diff}); resume it with the same settings or pick another --out"
            )
        return
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a jsonl file; a last line cut short by a crash is dropped (and removed, so appends stay valid)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good = [], 0
    for line in data.splitlines(keepends=True):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if not line.endswith(b"\n"):
                break
            raise ValueError(f"{path} has a line that is not JSON: {line[:80]!r}; fix or remove it") from None
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return records


class JsonlWriter:
    """Appends records, each flushed and synced as a whole line, so an interrupted run loses at most the line in flight."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
