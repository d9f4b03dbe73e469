"""Keep freed memory in the process: glibc's malloc tuned for CPU training's large, repeated allocations.

A training step on CPU allocates and frees the same large activation and gradient buffers every iteration.
glibc serves allocations above its mmap threshold (at most 32 MB) with fresh ``mmap`` calls and unmaps them
when freed, so every step faults each buffer's pages in again (system time). With mmap off for the heap
(``M_MMAP_MAX`` 0) and trimming only above 2 GB of free heap (``M_TRIM_THRESHOLD``), freed buffers stay mapped
and are reused. The process keeps its peak memory (which it reaches every step anyway) instead of handing it
back between steps; benchmarks/README.md has measurements.

This changes malloc for the whole process, so it is applied only where it was measured to help:
``tools/train_net.py`` calls :func:`setup_malloc`, which applies it when ``KEEP_FREED_MEMORY`` is on and the
model runs on CPU (``MODEL.DEVICE``), and only under glibc (Linux; musl and other C libraries are left alone).
``KEEP_FREED_MEMORY False`` turns it off; preloading another allocator (jemalloc, tcmalloc) avoids the faults
as well.
"""
import ctypes
import ctypes.util
import logging
import sys

import torch
from detectron2.config import CfgNode

__all__ = ["keep_freed_memory", "setup_malloc"]

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: trim only when over 2 GB of the heap's top is free


def keep_freed_memory() -> bool:
    """Tune glibc's malloc in this process so freed large buffers are reused, not unmapped and faulted in again.

    Calls ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``. Returns whether both were
    applied: False, with nothing called, off Linux or when the C library is not glibc; False when ``mallopt``
    refused a setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    gnu_get_libc_version.restype = ctypes.c_char_p
    applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if applied:
        logger.info(f"glibc {gnu_get_libc_version().decode()} malloc: freed memory is kept for reuse "
                    "(no mmap for large blocks, trim above 2 GB); KEEP_FREED_MEMORY False turns this off")
    return applied


def setup_malloc(cfg: CfgNode) -> bool:
    """:func:`keep_freed_memory` when ``cfg.KEEP_FREED_MEMORY`` is on and ``cfg.MODEL.DEVICE`` is a CPU; returns
    whether it was applied. On GPU runs (where the activations live in CUDA's own caching allocator) and with the
    switch off, malloc is left as it is."""
    if not cfg.KEEP_FREED_MEMORY or torch.device(cfg.MODEL.DEVICE).type != "cpu":
        return False
    return keep_freed_memory()
