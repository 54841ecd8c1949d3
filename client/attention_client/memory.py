"""Allocator settings for processes that move multi-MB attention buffers.

glibc serves allocations above a (dynamic) threshold with fresh mmap()s and
returns freed memory at the heap top to the kernel: every 5 MB response then
costs about 1,200 page faults per copy. Keeping such buffers in the heap lets
them be reused. Measured here: 128-token responses with full attention, client
CPU per call 8-10 ms -> 3.7-4.8 ms (thresholds raised); one 512-token response
(76 MB), client parse + decode 120 ms -> 18 ms and the whole call 400 -> 210 ms
(mmap off). `make bench` runs with it.

Opt-in for client processes (`tune_malloc()`); the server calls it at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD_MAX = 32 << 20


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = 256 << 20,
                use_mmap: bool = False) -> bool:
    """Keep large buffers in the heap for reuse: no mmap() per allocation (unless
    use_mmap; then only above mmap_threshold, at most 32 MiB) and up to
    trim_threshold bytes of free heap kept. False where the C library is not
    glibc (nothing changes then)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, MMAP_THRESHOLD_MAX)) == 1)
    ok = bool(mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1) and ok
    if not use_mmap:
        ok = bool(mallopt(M_MMAP_MAX, 0) == 1) and ok
    if not ok:
        log.warning("mallopt refused the allocator settings")
    return ok


def trim_heap() -> bool:
    """Give the heap's free memory back to the kernel now (glibc's malloc_trim):
    with raised thresholds the heap otherwise keeps up to trim_threshold of freed
    buffers. False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        malloc_trim = ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
