"""How the C allocator treats large buffers (glibc only; elsewhere these do nothing).

Loading wants freed memory given back at once, so that converting a model block by block peaks near the final
size. Inference wants the opposite: a prefill allocates activations of tens of MB per layer, and glibc serves
each one above its mmap threshold (32 MB at most) with fresh pages that the kernel must fault in and zero every
time: measured 10-25 % of an 8×256 prefill on the 350M shape. Raising the threshold keeps those buffers in the
heap for reuse, which is what jemalloc or tcmalloc do for PyTorch on CPU.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # glibc has both
        return libc
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> None:
    """Give freed memory back to the system now (glibc otherwise keeps it for reuse)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def reuse_large_buffers() -> None:
    """From now on keep freed buffers of up to 1 GB in the heap for reuse instead of unmapping them."""
    if (libc := _libc()) is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)
