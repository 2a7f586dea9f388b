"""Giving freed heap memory back to the system, so bulk loads and bursts leave no resident slack."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# FAISS grows its vector storage by doubling; glibc keeps the freed smaller buffers (under its mmap
# threshold, up to 32 MiB) on the heap. malloc_trim hands them back: measured here, 804 -> 671 bytes
# resident per 128-d vector after loading 200k.


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Returns the heap's free pages to the system (glibc only; elsewhere a no-op)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
