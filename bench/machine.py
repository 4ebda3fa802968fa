"""What every benchmark prints about the machine it ran on: CPU flags differ between machines and decide the kernels.

Standard library only, so importing it changes nothing in a benchmark's process (importing codegen_lm would,
see its __init__).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(field: str) -> str | None:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(field))
    except (OSError, StopIteration):
        return None


def cpu_flags() -> str:
    """The CPU's vector and matrix extensions (avx*, amx*, fma), or its name where Linux's flags are not readable."""
    flags = _cpuinfo("flags")
    if flags is None:
        return platform.processor() or "unknown"
    return " ".join(f for f in flags.split() if f.startswith(("avx", "amx", "fma")))


def cpu_summary() -> str:
    return f"{_cpuinfo('model name') or platform.processor()}; {os.cpu_count()} CPUs; flags: {cpu_flags()}"
