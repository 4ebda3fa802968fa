"""codegen-lm: run, serve, evaluate and fine-tune Salesforce CodeGen models.

The public names match transformers' so existing code runs with only the import changed. They are
imported lazily: ``import codegen_lm`` stays fast, and torch loads only when a model is touched.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Decoding streams every weight from memory once per token. On 2 MB pages the CPU's prefetchers run on across
# what would be 4 KB page boundaries: measured 5-15 % faster decode matmuls (docs/benchmarks.md). torch reads
# this once, at its first allocation, so it applies when codegen_lm is imported before torch (as the CLI does).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "CodeGenConfig": "config",
    "CodeGenTokenizer": "tokenizer",
    "CodeGenTokenizerFast": "tokenizer",
    "AutoTokenizer": "tokenizer",
    "CodeGenModel": "model",
    "CodeGenForCausalLM": "model",
    "AutoModelForCausalLM": "model",
    "AutoConfig": "model",
    "load_model": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'codegen_lm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
