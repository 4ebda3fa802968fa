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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


MADV_NOHUGEPAGE = 15  # madvise advice (linux/mman.h)


def small_pages(tensor: "torch.Tensor") -> None:
    """Back ``tensor``'s untouched memory with 4 KB pages instead of 2 MB ones (Linux; elsewhere nothing). For memory
    that is written sparsely, as a KV cache is (each layer's row is a few MB, of which a short sequence writes the
    start): on 2 MB pages every spot touched takes 2 MB (measured: 0.8 GB more for 8 rows of 320 tokens on the 350M
    shape)."""
    if (libc := _libc()) is None or tensor.device.type != "cpu" or not tensor.numel():
        return
    page = 4096
    start = (tensor.data_ptr() + page - 1) // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t((end - start) // page * page), MADV_NOHUGEPAGE)
