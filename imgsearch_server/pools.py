"""The servers' thread pools: each call goes to the thread that went idle last, and the pool counts its work.

`concurrent.futures.ThreadPoolExecutor` wakes whichever idle thread the lock hands the queue to, about the
one idle longest: one caller's calls, one after the other, went round all eight workers of a service. A
thread's state is per thread (the encoder's LiteRT interpreter and its packed weights, its arena, the
thread's stack), so every call started on state that had gone cold in cache. Here an idle thread waits
on a lock of its own, and a new call goes to the thread that went idle last (a stack): a lone caller's
calls all run on one hot thread, and concurrent callers still get a thread each, up to `max_workers`.

With `place`, a call submitted while nothing else is queued or running has its thread held to the core of
the thread that submitted it (gRPC's polling thread, held to the I/O core: cpus.py), and a thread taking
queued work (the pool busy) is let run on any core again: one syscall when a thread's core changes.
Work that starts threads of its own (FAISS's OpenMP team for a batch or `duplicates`, a helper pool) runs
after `run_on_every_core()`: a thread inherits the core mask of the one starting it, and a team started on a
held worker shared its one core (make bench: batches at 1M 0.48 of in-process instead of 0.93).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from imgsearch_server.cpus import current_cpu

UNSET = -2  # a worker's core before its thread first sets it
Work = tuple[futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_running = threading.local()  # in a placing pool's thread: `placed`, its (pool, worker)


class _Worker:
    """One thread's hand-over: the next work, the lock it sleeps on until given some, and the core it is
    held to (None: any of the pool's)."""

    def __init__(self, cpu: int | None) -> None:
        self.work: Work | None = None
        self.wake = threading.Lock()
        self.wake.acquire()  # held: the thread blocks on it until released with work (or None: stop)
        self.cpu: int | None = UNSET
        self.first_cpu = cpu  # where its thread starts: set then, not inherited from the one starting it
        self.tid = 0  # the thread's native id, once it runs


class LastIdleFirstPool(futures.ThreadPoolExecutor):
    """A thread pool (threads started as work needs them, up to `max_workers`) that hands new work to the
    thread that went idle last, and knows how many of its tasks are queued or running (`pending`).

    A ThreadPoolExecutor by type only (grpc runs a method on its `experimental_thread_pool` only if it is
    one): submit and shutdown are this class's own, and the base's queue and threads are never used."""

    def __init__(self, max_workers: int, name: str, *, place: bool = False) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        super().__init__(max_workers=max_workers, thread_name_prefix=name)
        self.max_workers = max_workers
        self.name = name
        self._handing = threading.Lock()
        self._idle_workers: list[_Worker] = []  # a stack: the last to go idle is taken first
        self._queued: collections.deque[Work] = collections.deque()  # when every thread is busy
        self._started: list[threading.Thread] = []
        self._pending = 0
        self._shut = False
        cores = os.sched_getaffinity(0)
        self._cores = cores if place and len(cores) > 1 else None  # None: threads are never held

    @property
    def pending(self) -> int:
        """Tasks submitted and not finished: queued or running."""
        return self._pending

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        work: Work = (future, fn, args, kwargs)
        with self._handing:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            cpu = self._lone_cpu()
            self._pending += 1
            if self._idle_workers:
                worker = self._idle_workers.pop()
                self._hold(worker, cpu)
                worker.work = work
                worker.wake.release()
            elif len(self._started) < self.max_workers:
                thread = threading.Thread(
                    target=self._serve,
                    args=(_Worker(cpu), work),
                    name=f"{self.name}_{len(self._started)}",
                    daemon=True,  # a server stops its calls before it exits; nothing waits on idle threads
                )
                self._started.append(thread)
                thread.start()
            else:
                self._queued.append(work)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Lets the threads finish what is queued (or cancels it) and stop; waits for them when `wait`."""
        with self._handing:
            self._shut = True
            if cancel_futures:
                while self._queued:
                    future = self._queued.popleft()[0]
                    future.cancel()
                    self._pending -= 1
            idle, self._idle_workers = self._idle_workers, []
            threads = list(self._started)
        for worker in idle:
            worker.work = None
            worker.wake.release()
        if wait:
            current = threading.current_thread()
            for thread in threads:
                if thread is not current:
                    thread.join()

    def _lone_cpu(self) -> int | None:
        """The submitting thread's core when nothing else is queued or running (called under the lock):
        a lone call's thread is held there, so the hand-off stays on one core."""
        if self._cores is None or self._pending:
            return None
        cpu = current_cpu()
        return cpu if cpu in self._cores else None

    def _hold(self, worker: _Worker, cpu: int | None) -> None:
        """Holds the worker's thread to `cpu`, or lets it run on any of the pool's cores (None); nothing
        in a pool that does not place its threads."""
        if self._cores is None or worker.cpu == cpu or not worker.tid:
            return
        try:
            os.sched_setaffinity(worker.tid, {cpu} if cpu is not None else self._cores)
            worker.cpu = cpu
        except OSError:  # the core was taken from this process since, or the system refuses: leave it
            pass

    def _serve(self, worker: _Worker, work: Work | None) -> None:
        worker.tid = threading.get_native_id()
        if self._cores is not None:
            _running.placed = (self, worker)
        self._hold(worker, worker.first_cpu)
        while work is not None:
            _run(work)
            del work  # no reference to the finished call's arguments while idle
            with self._handing:
                self._pending -= 1
                if self._queued:  # busy: calls run on any core
                    work = self._queued.popleft()
                    self._hold(worker, None)
                    continue
                if self._shut:
                    return
                self._idle_workers.append(worker)
            worker.wake.acquire()
            work, worker.work = worker.work, None


def run_on_every_core() -> None:
    """Lets the calling thread, if a placing pool holds it to one core, run on every core of the pool
    until the pool holds it again (at its next lone call): threads it starts meanwhile (OpenMP's team, a
    pool's helpers) inherit every core, and keep them. Elsewhere it does nothing."""
    placed = getattr(_running, "placed", None)
    if placed is not None:
        pool, worker = placed
        pool._hold(worker, None)


def _run(work: Work) -> None:
    future, fn, args, kwargs = work
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:  # handed to the future, as ThreadPoolExecutor does
        future.set_exception(error)
    else:
        future.set_result(result)
