"""Giving freed heap memory back to the system, so bulk loads and bursts leave no resident slack."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

# FAISS grows its vector storage by doubling; glibc keeps the freed smaller buffers (under its mmap
# threshold, up to 32 MiB) on the heap. malloc_trim hands them back: measured here, 804 -> 671 bytes
# resident per 128-d vector after loading 200k.


def _load_libc(function: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_libc("malloc_trim")
_MALLOPT = _load_libc("mallopt")
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
# A bulk load's request buffers are freed after its handler returns, when its own trim has run: a second
# trim this long after the last bulk write hands them back too.
TRIM_AFTER_S = 0.2


def release_free_memory() -> None:
    """Returns the heap's free pages to the system (glibc only; elsewhere a no-op)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def limit_arenas(arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas (one per thread by default, up to 8 per core), unless the environment
    sets MALLOC_ARENA_MAX itself; call it before the server's threads start. Each gRPC worker thread's
    arena kept its own freed request buffers: loading 1M vectors over gRPC in batches of 50,000 left
    645-700 bytes resident per vector (the store's arrays are 535), 648-656 with 2 arenas, 602-610 with
    2 arenas and a trim after the last request was freed (three runs each, 2026-12-02). Returns whether
    it set the cap."""
    if _MALLOPT is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_MALLOPT(M_ARENA_MAX, arenas))


class _LaterTrim:
    """One daemon thread that trims TRIM_AFTER_S after the last request for it; requests in between
    coalesce into one trim."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="malloc-trim", daemon=True)
                self._thread.start()
        self._asked.set()

    def _run(self) -> None:
        while True:
            self._asked.wait()
            while True:  # quiet for TRIM_AFTER_S since the last ask
                self._asked.clear()
                if not self._asked.wait(TRIM_AFTER_S):
                    break
            release_free_memory()


_LATER = _LaterTrim()


def release_free_memory_soon() -> None:
    """`release_free_memory` once the caller's request has been freed too (TRIM_AFTER_S after the last
    call of this), in a thread of its own: for the end of a bulk write, whose request buffers outlive
    its handler."""
    if _MALLOC_TRIM is not None:
        _LATER.ask()
