"""Which core a thread runs on, and holding gRPC's I/O threads to one core (--io-core).

A call crosses several threads: gRPC core's event-engine threads read the socket and signal the completion
queue, grpc's polling thread (Python) takes the call and hands it to a worker, and the reply goes back the
same way. On this project's 2-vCPU VM each hand-off to a thread on the other core could land on a halted
vCPU, which takes a while to run it. Held to one core, those threads hand off on it: a one-PNG Embed went
from 1.22 to 1.04 ms p50 (echo 0.57), a one-query search at 60k from 2.74 to 2.20 ms (echo 0.48), the
services side by side in one run each (2026-12-02). The workers are not held, but a call that is the only
one in flight runs on the I/O core (pools.py): concurrent calls still get every core. Threads a held
worker starts inherit its one core, so work that starts threads (FAISS's OpenMP team for a batch or
`duplicates`) first calls pools.run_on_every_core(). The index service still defaults to none: with that
fix, auto measured the same as none within noise (one query at 60k 2.37-2.75 ms against 2.49-2.63)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast


def _current_cpu() -> Callable[[], int]:
    """glibc's sched_getcpu (the core this thread runs on now; Python 3.11 has no os.sched_getcpu), or a
    function answering -1 where there is none."""
    try:
        getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return lambda: -1
    getcpu.restype = ctypes.c_int
    getcpu.argtypes = []
    return cast(Callable[[], int], getcpu)


current_cpu = _current_cpu()


IO_THREAD_NAMES = ("event_engine", "grpc_global_tim")  # gRPC core's own threads (/proc comm, 15 chars)
SERVE_THREAD_SUFFIX = "(_serve)"  # grpc's Python thread that polls the completion queue and submits calls


def io_thread_ids() -> list[int]:
    """The native ids of this process's gRPC I/O threads: gRPC core's (by their names) and the server's
    polling thread (a Python thread running grpc's `_serve`)."""
    ids = [t.native_id for t in threading.enumerate() if t.name.endswith(SERVE_THREAD_SUFFIX) and t.native_id]
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(IO_THREAD_NAMES):
            ids.append(int(task.name))
    return ids


def hold_io_threads(cpu: int) -> int:
    """Holds the gRPC I/O threads to one core (threads they start later inherit it): a call's hand-offs
    (socket, completion queue, worker) then stay on that core. Returns how many threads it held."""
    held = 0
    for tid in io_thread_ids():
        try:
            os.sched_setaffinity(tid, {cpu})
            held += 1
        except OSError:  # ended meanwhile, or refused
            pass
    return held


IO_CORE_CHOICES = ("auto", "none")


def check_io_core(setting: str) -> str:
    """The --io-core setting, checked: auto, none, or one of this process's cores (as a string)."""
    if setting in IO_CORE_CHOICES:
        return setting
    cores = sorted(os.sched_getaffinity(0))
    if not setting.isdigit() or int(setting) not in cores:
        raise ValueError(
            f"--io-core must be auto, none or one of this process's cores {cores}, got {setting!r}"
        )
    return setting


def io_core(setting: str) -> int | None:
    """The core to hold the I/O threads to, or None (none asked, or one core only: nothing to gain).
    auto picks one of this process's cores by its pid, so replicas on one machine spread."""
    cores = sorted(os.sched_getaffinity(0))
    if setting == "none" or len(cores) < 2:
        return None
    if setting == "auto":
        return cores[os.getpid() % len(cores)]
    return int(setting)
