"""Keep freed host memory in the process for the next batch instead of handing it back.

torch's CPU tensors come from glibc's malloc, and glibc hands memory back to the kernel when a
large block or the top of the heap is freed (thresholds that move with the process's history).
A model's activations are freed after every layer and allocated again for the next batch, so a
worker can fault its whole working set in again, page by page, every batch: on the CPU
benchmark's small BLIP, 97,000 (one caption per image) to 283,000 (ten) minor page faults per
16-image batch in an actor left to glibc, and a batch 4% and 12% slower than in a process that
kept its pages. Fixed thresholds keep those pages: the resident memory stays at its peak instead of
falling between batches. Blocks above 32 MiB (glibc's largest mmap threshold; BLIP-2's ten
captions make several) are mapped and unmapped whatever the threshold, so mapping is turned
off: they come from the heap too, and stay. On the benchmark's ten-caption batches that took
faults from 63,000-144,000 to under 3,000 per batch, for up to 8% more peak memory
(bench/README.md, "the actor's slowdown was page faults").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt's parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MIB = 1 << 20
MMAP_THRESHOLD = 32 * MIB  # glibc's largest; moot with mapping off, but fixed (not moving)
TRIM_THRESHOLD = 1024 * MIB
TOP_PAD = 64 * MIB

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_MMAP_MAX_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Set glibc's malloc so freed blocks stay in the process; True if it took the settings.

    Leaves the process alone where the user chose an allocator or its settings (``MALLOC_*_``,
    ``LD_PRELOAD``) and where the C library is not glibc."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
        (M_MMAP_MAX, 0)))
