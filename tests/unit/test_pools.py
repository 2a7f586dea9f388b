"""imgsearch_server.pools.LastIdleFirstPool: work goes to the thread that went idle last; bounds, counts."""

from __future__ import annotations

import os
import threading
import time

import pytest

from imgsearch_server.pools import LastIdleFirstPool, run_on_every_core


def busy_threads(pool: LastIdleFirstPool, count: int) -> tuple[list[threading.Event], list[str]]:
    """`count` tasks holding a thread each until their event is set; returns the events and the threads'
    names in the order the tasks started."""
    started: list[str] = []
    releases = [threading.Event() for _ in range(count)]
    ready = threading.Barrier(count + 1)

    def hold(release: threading.Event) -> None:
        started.append(threading.current_thread().name)
        ready.wait(10)
        release.wait(10)

    for release in releases:
        pool.submit(hold, release)
    ready.wait(10)
    return releases, started


def wait_until(condition: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.001)


def test_new_work_goes_to_the_thread_that_went_idle_last() -> None:
    pool = LastIdleFirstPool(4, "test")
    try:
        releases, names = busy_threads(pool, 3)
        assert len(set(names)) == 3
        for release in releases:  # the threads go idle in this order: the last of them is names[2]
            pending = pool.pending
            release.set()
            wait_until(lambda pending=pending: pool.pending == pending - 1)
        assert pool.pending == 0
        ran_on = [pool.submit(lambda: threading.current_thread().name).result(10) for _ in range(20)]
        assert set(ran_on) == {names[2]}  # one caller's calls, one after the other: one hot thread
    finally:
        pool.shutdown()


def test_at_most_max_workers_threads_and_the_rest_queued() -> None:
    pool = LastIdleFirstPool(2, "test")
    try:
        releases, _ = busy_threads(pool, 2)
        ran = threading.Event()
        queued = pool.submit(ran.set)
        assert pool.pending == 3
        time.sleep(0.05)
        assert not ran.is_set()  # both threads busy: it waits for one
        assert len([t for t in threading.enumerate() if t.name.startswith("test_")]) == 2
        releases[0].set()
        queued.result(10)
        releases[1].set()
        wait_until(lambda: pool.pending == 0)
        assert pool.pending == 0
    finally:
        pool.shutdown()


def test_results_exceptions_and_cancelled_work() -> None:
    pool = LastIdleFirstPool(1, "test")
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(10) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(10)
        releases, _ = busy_threads(pool, 1)
        ran = threading.Event()
        cancelled = pool.submit(ran.set)
        assert cancelled.cancel()
        releases[0].set()
        assert pool.submit(lambda: "after").result(10) == "after"
        assert not ran.is_set()
        wait_until(lambda: pool.pending == 0)
        assert pool.pending == 0
    finally:
        pool.shutdown()


def test_shutdown_finishes_or_cancels_what_is_queued_and_stops_every_thread() -> None:
    pool = LastIdleFirstPool(1, "test-stop")
    releases, _ = busy_threads(pool, 1)
    kept = pool.submit(lambda: "kept")
    releases[0].set()
    pool.shutdown(wait=True)
    assert kept.result(0) == "kept"
    assert not [t for t in threading.enumerate() if t.name.startswith("test-stop_")]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(lambda: None)

    pool = LastIdleFirstPool(1, "test-cancel")
    releases, _ = busy_threads(pool, 1)
    dropped = pool.submit(lambda: "dropped")
    pool.shutdown(wait=False, cancel_futures=True)
    assert dropped.cancelled()
    releases[0].set()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("test-cancel_")])
    assert not [t for t in threading.enumerate() if t.name.startswith("test-cancel_")]
    assert pool.pending == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to hold")
def test_placed_a_lone_call_runs_on_one_core_and_a_concurrent_one_on_any() -> None:
    every = os.sched_getaffinity(0)
    pool = LastIdleFirstPool(2, "test-place", place=True)
    try:
        lone = pool.submit(lambda: os.sched_getaffinity(0)).result(10)
        assert len(lone) == 1 and lone <= every  # held to the submitting thread's core
        releases, _ = busy_threads(pool, 1)  # now a call is in flight: the next one is not alone
        concurrent = pool.submit(lambda: os.sched_getaffinity(0)).result(10)
        assert concurrent == every
        releases[0].set()
        wait_until(lambda: pool.pending == 0)
    finally:
        pool.shutdown()
    unplaced = LastIdleFirstPool(1, "test-unplaced")
    try:
        assert unplaced.submit(lambda: os.sched_getaffinity(0)).result(10) == every
    finally:
        unplaced.shutdown()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to hold")
def test_run_on_every_core_frees_a_held_worker_and_the_threads_it_starts() -> None:
    every = os.sched_getaffinity(0)

    def held_then_freed() -> tuple[set[int], set[int], set[int]]:
        held = os.sched_getaffinity(0)
        run_on_every_core()
        started: list[set[int]] = []
        helper = threading.Thread(target=lambda: started.append(os.sched_getaffinity(0)))
        helper.start()
        helper.join(10)
        return held, os.sched_getaffinity(0), started[0]

    pool = LastIdleFirstPool(1, "test-every", place=True)
    try:
        held, freed, inherited = pool.submit(held_then_freed).result(10)
        assert len(held) == 1
        assert freed == every and inherited == every
        again = pool.submit(lambda: os.sched_getaffinity(0)).result(10)
        assert len(again) == 1  # the next lone call is held again
    finally:
        pool.shutdown()
    run_on_every_core()  # outside a placing pool: nothing to do, and no error
    assert os.sched_getaffinity(0) == every
