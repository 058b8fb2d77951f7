"""The C library's heap, where torch's CPU tensors live: memory freed there handed back to the
system, or kept for reuse. glibc only; elsewhere (another C library, another OS) nothing is done.

Kept for reuse matters at large batches. glibc serves every allocation above its mmap threshold
(128 KB, adapting up to 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so
a model whose intermediate tensors are that large pays the kernel's page faults and page zeroing
for each of them on every call (measured in docs/benchmarks.md). ONNX Runtime and OpenVINO keep
arenas of their own and pay none of it."""

from __future__ import annotations

import ctypes
from typing import Any

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: The largest trim threshold ``mallopt`` takes (an ``int``).
_KEEP_UP_TO_BYTES = 2**31 - 1

_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def return_freed_memory() -> None:
    """Hand memory freed on the heap back to the system (glibc's ``malloc_trim``). A prologue's
    float64 intermediates (twice the weights it folds) are freed when it ends, but glibc's dynamic
    mmap threshold keeps blocks of that size on the heap once one was freed, where the process
    holds them."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def reuse_freed_memory() -> bool:
    """From now on, serve every allocation of this process from the heap and keep freed memory
    there (up to 2 GB at its top) for the next allocation, instead of mapping and unmapping large
    blocks on each call. For a process that serves a model: its tensors' memory is reused call after
    call, without page faults; the process's resident memory stays at its peak instead of
    shrinking after it. Process-wide and not undone. Returns whether it took effect (False where
    the C library is not glibc)."""
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO_BYTES))
