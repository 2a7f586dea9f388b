"""Concurrent writers: single-vector upserts into the index service from 1, 2, 4 and 8 client threads at
once (`python -m bench --sections writers`).

Each writer is a thread of this process with its own `IndexClient` (its own channel), upserting one new id
with one vector per call, back to back, for a fixed time. The service is a child process
(`python -m index_service`) with its data dir on disk, so every acknowledged write is in the write-ahead
log and fsync'd before its reply; snapshots are held off while timing. The runs alternate over rounds (the
order reversed every other round); each writer count's rate is the median over its rounds. Issue 18's
target: 8 writers together store at least 4 times as many vectors a second as one, which needs the log to
commit the writes that arrive together with one fsync (group commit). In the same rounds 1 and 8 threads
of this process echo the upsert's payload through a bare gRPC echo in its own process (bench/echo.py): the
floor's own scaling with the same client and the same cores, which no Python service's ratio passes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import index
from bench.echo import EchoServer
from bench.index import OtherLoad, Service
from bench.report import Figure, Section, p50_p99_ms
from imgsearch import convert
from imgsearch.client import IndexClient

WRITERS = (1, 2, 4, 8)
TARGET_WRITERS = 8
ECHO_THREADS = (1, TARGET_WRITERS)  # the floor's own scaling, timed in the same rounds
TARGET_RATIO = 4.0
SERVER_THREADS = max(8, max(WRITERS))  # the service's --workers, and the echo's: one per writer at least
POOL = 4_096  # distinct vectors the writers cycle through (each call a new id)


@dataclass(frozen=True)
class Plan:
    seconds: float  # each run of writers
    rounds: int
    preload: int  # vectors stored before the timing
    fsyncs: int  # fsyncs of a 4 KiB write timed in the data dir, for the note


NORMAL = Plan(seconds=1.0, rounds=3, preload=10_000, fsyncs=200)
QUICK = Plan(seconds=0.4, rounds=2, preload=2_000, fsyncs=50)


@dataclass
class Run:
    writers: int
    vectors: int
    seconds: float
    latencies_s: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def rate(self) -> float:
        return self.vectors / self.seconds


Caller = Callable[[int], object]  # makes call number n (-1: the warm-up) of one thread


def concurrent_calls(callers: list[Caller], seconds: float) -> Run:
    """One thread per caller, each making its calls back to back for `seconds` after a shared start."""
    times: list[list[float]] = [[] for _ in callers]
    began = [0.0]
    stop_at = [float("inf")]

    def go() -> None:  # run by one thread as the barrier opens, before any caller goes on
        began[0] = time.perf_counter()
        stop_at[0] = began[0] + seconds

    ready = threading.Barrier(len(callers) + 1, action=go)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        caller, own = callers[n], times[n]
        try:
            caller(-1)  # connected, a server thread warm
            ready.wait()
            call = 0
            while True:
                started = time.perf_counter()
                caller(call)
                own.append(time.perf_counter() - started)
                call += 1
                if started + own[-1] >= stop_at[0]:
                    break
        except BaseException as error:  # reported below, after every thread has stopped
            failures.append(error)
            ready.abort()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(callers))]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a caller failed: reported below
        ready.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began[0]
    if failures:
        raise RuntimeError(f"a caller failed: {failures[0]}") from failures[0]
    every = np.concatenate([np.asarray(t) for t in times])
    return Run(len(callers), len(every), elapsed, every)


def concurrent_writes(address: str, writers: int, seconds: float, vectors: np.ndarray, tag: str) -> Run:
    """`writers` threads, each with its own client, upsert one new id at a time for `seconds`."""
    clients = [IndexClient(address, timeout_s=60) for _ in range(writers)]

    def writer(n: int) -> Caller:
        def upsert(call: int) -> object:
            row = n if call < 0 else (n * 997 + call) % len(vectors)
            return clients[n].upsert([f"{tag}-{n}-{'warm' if call < 0 else call}"], vectors[row : row + 1])

        return upsert

    try:
        return concurrent_calls([writer(n) for n in range(writers)], seconds)
    finally:
        for client in clients:
            client.close()


def concurrent_echoes(echo: EchoServer, threads: int, seconds: float, payload: bytes) -> Run:
    """The floor of `concurrent_writes`: `threads` threads, each on its own channel, echo the payload."""
    channels = [echo.new_channel() for _ in range(threads)]

    def caller(n: int) -> Caller:
        call = echo.method(channels[n])
        return lambda _: call(payload, timeout=30)

    try:
        return concurrent_calls([caller(n) for n in range(threads)], seconds)
    finally:
        for channel in channels:
            channel.close()


def upsert_request_bytes(vector: np.ndarray) -> int:
    """The size of one writer's request (one id, one vector), for the echo of the same payload."""
    return convert.upsert_request(["r0-w8-7-1234"], vector[None, :], (), "").ByteSize()


def fsync_ms(directory: Path, count: int) -> float:
    """The median time of a 4 KiB append + fsync in `directory` (what one commit of the log costs)."""
    path = directory / "fsync-probe"
    times = []
    with open(path, "ab") as file:
        for _ in range(count):
            started = time.perf_counter()
            file.write(b"x" * 4096)
            file.flush()
            os.fsync(file.fileno())
            times.append(time.perf_counter() - started)
    path.unlink()
    return float(np.median(times) * 1e3)


def filesystem(path: Path) -> str:
    """The file system type `path` is on (from /proc/mounts), or "?"."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    resolved, best = str(path.resolve()), ("", "?")
    for fields in mounts:
        if len(fields) > 2 and resolved.startswith(fields[1]) and len(fields[1]) > len(best[0]):
            best = (fields[1], fields[2])
    return best[1]


def run(out: Path, quick: bool) -> list[Section]:
    plan = QUICK if quick else NORMAL
    load = OtherLoad()
    vectors = index.make_vectors(max(plan.preload, POOL))
    scratch = Path(tempfile.mkdtemp(prefix="imgsearch-bench-writers-"))
    runs: dict[int, list[Run]] = {count: [] for count in WRITERS}
    echoes: dict[int, list[Run]] = {count: [] for count in ECHO_THREADS}
    payload = b"x" * upsert_request_bytes(vectors[0])
    service: Service | None = None
    echo: EchoServer | None = None
    try:
        probe_ms = fsync_ms(scratch, plan.fsyncs)
        service = Service(
            scratch / "data",
            None,
            scratch / "index.log",
            ["--snapshot-every-ops", str(10**9), "--workers", str(SERVER_THREADS)],
        )
        service.client.upsert(index.item_ids(0, plan.preload), vectors[: plan.preload])
        address = service.process.address
        pool = vectors[:POOL]
        echo = EchoServer(workers=SERVER_THREADS)
        for round_ in range(plan.rounds):
            order = WRITERS if round_ % 2 == 0 else tuple(reversed(WRITERS))
            for count in order:
                time.sleep(0.1)
                runs[count].append(
                    concurrent_writes(address, count, plan.seconds, pool, f"r{round_}-w{count}")
                )
                if count in echoes:
                    time.sleep(0.1)
                    echoes[count].append(concurrent_echoes(echo, count, plan.seconds, payload))
        expected = plan.preload + sum(r.vectors + r.writers for by in runs.values() for r in by)
        stored = service.client.stats().count
        if stored != expected:
            raise RuntimeError(f"the service holds {stored} items; {expected} writes were acknowledged")
    finally:
        if echo is not None:
            echo.close()
        if service is not None:
            service.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    section = report(plan, runs, probe_ms, filesystem(scratch.parent), echoes, len(payload))
    section.notes.append(load.note())
    return [section]


def rate(runs: list[Run]) -> float:
    return float(np.median([r.rate for r in runs]))


def report(
    plan: Plan,
    runs: dict[int, list[Run]],
    probe_ms: float,
    fs: str,
    echoes: dict[int, list[Run]],
    echo_bytes: int,
) -> Section:
    section = Section("Writers: concurrent single-vector upserts through the index service")
    section.notes += [
        f"{', '.join(map(str, WRITERS))} writer threads in this process, each with its own `IndexClient` "
        f"(channel), upserting one new id with one 128-d vector per call, back to back, for "
        f"{plan.seconds:g} s a run; {plan.rounds} rounds, the writer counts in turn (reversed every other "
        "round), each count's rate the median of its rounds. The service: `python -m index_service`, a "
        f"child process, its data dir on disk ({fs}) with {plan.preload:,} vectors stored first, "
        "`--snapshot-every-ops 1000000000` so that no snapshot runs while timing; every reply waits for "
        f"the fsync of the log that covers its write. A 4 KiB append + fsync in that dir takes "
        f"{probe_ms:.2f} ms here (median of {plan.fsyncs}): one writer at a time can at most reach "
        f"{1e3 / probe_ms:,.0f} writes/s; more only if a commit covers several writes. Afterwards the "
        "service's count is checked against every acknowledged write.",
        f"The floor's own scaling, timed in the same rounds: {' and '.join(map(str, ECHO_THREADS))} "
        f"threads, each on its own channel, calling a bare gRPC echo (bench/echo.py, its own process, "
        f"as many server threads as the service) with a payload of the upsert's {echo_bytes} bytes: no "
        "Python server is faster than its echo, so the writers' ratio cannot pass the echo's for long.",
    ]
    one = rate(runs[1])
    many = rate(runs[TARGET_WRITERS])
    ratio = many / one
    met = ratio >= TARGET_RATIO
    echo_one, echo_many = rate(echoes[1]), rate(echoes[TARGET_WRITERS])
    echo_ratio = echo_many / echo_one
    p50, p99 = p50_p99_ms(np.concatenate([r.latencies_s for r in runs[TARGET_WRITERS]]))
    section.figures.append(
        Figure(
            f"index service, {TARGET_WRITERS} concurrent writers, one vector a call",
            many,
            "vectors/s",
            "one writer, the same calls (median of its rounds)",
            one,
            ratio,
            f"ratio >= {TARGET_RATIO:g}",
            met,
            f"call p50 / p99 with {TARGET_WRITERS} writers {p50:.2f} / {p99:.2f} ms; "
            f"fsync {probe_ms:.2f} ms; the bare echo of the same payload scales {echo_ratio:.2f}x "
            f"from 1 to {TARGET_WRITERS} threads "
            f"({echo_one:,.0f} to {echo_many:,.0f} calls/s)"
            + (
                ""
                if met
                else f"; met would need {TARGET_RATIO * one:,.0f} vectors/s"
                + (
                    f", more than the echo itself scales to here ({echo_ratio * one:,.0f} at its ratio)"
                    if echo_ratio < TARGET_RATIO
                    else ": the writes arriving together committed with one fsync (group commit)"
                )
            ),
            headline="writers",
        )
    )
    rows = [
        "| writers | vectors/s (median) | per writer | against one writer | call p50 ms | call p99 ms "
        "| each round's vectors/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows += _rows(runs, one, "{count}", "")
    rows += _rows(echoes, echo_one, "{count}, bare echo (floor)", " calls/s")
    section.tables.append(("Single-vector upserts by concurrent writers", "\n".join(rows)))
    return section


def _rows(by_count: dict[int, list[Run]], one: float, label: str, unit: str) -> list[str]:
    """The table's rows of one kind of run, each count's rate against `one` thread's."""
    rows = []
    for count, by in by_count.items():
        p50, p99 = p50_p99_ms(np.concatenate([r.latencies_s for r in by]))
        rates = ", ".join(f"{r.rate:,.0f}" for r in by)
        rows.append(
            f"| {label.format(count=count)} | {rate(by):,.0f}{unit} | {rate(by) / count:,.0f} | "
            f"{rate(by) / one:.2f} | {p50:.2f} | {p99:.2f} | {rates} |"
        )
    return rows
