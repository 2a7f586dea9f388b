"""Collections: a search in one of 10 collections beside the same search in a service that holds only that
collection (`python -m bench --sections collections`).

One index service (a child process) holds 10 collections of different sizes, each its own slice of
bench/index.py's seeded 128-d vectors; for a few of them, another index service holds only that
collection (created under the same name, so that both get byte-identical requests; its `default`
collection is empty). One query at a time, k = 10, through `IndexClient.search(collection=NAME)`, the
services timed interleaved. Issue 18's target: a search in one of the 10 costs what it costs in an index
of that collection alone, within 10 %.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from bench import index
from bench.index import K, OtherLoad, Service, Timed, cycling, interleaved
from bench.report import Figure, Section, p50_p99_ms
from imgsearch.client import IndexClient

TARGET_RATIO = 1.1


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]  # the 10 collections' sizes
    measured: tuple[int, ...]  # the sizes whose collection is also served alone
    headline: int  # the size the target's figure is at
    rounds: int
    per_round: int


NORMAL = Plan(
    sizes=tuple(range(10_000, 100_001, 10_000)),
    measured=(10_000, 50_000, 100_000),
    headline=50_000,
    rounds=10,
    per_round=20,
)
QUICK = Plan(
    sizes=tuple(range(2_000, 20_001, 2_000)), measured=(10_000,), headline=10_000, rounds=4, per_round=10
)


def name_of(size: int) -> str:
    return f"c{size // 1000:03d}k"


@dataclass
class Measured:
    times: dict[str, np.ndarray]
    load_s: float  # the 10 collections over gRPC
    rss_mib: float  # the 10-collection service's, loaded


def run(out: Path, quick: bool) -> list[Section]:
    plan = QUICK if quick else NORMAL
    load = OtherLoad()
    total = sum(plan.sizes)
    vectors = index.make_vectors(total)
    queries = index.make_queries(500)
    singles = [queries[row : row + 1] for row in range(len(queries))]
    starts = np.cumsum((0, *plan.sizes))
    slices = {size: vectors[starts[n] : starts[n + 1]] for n, size in enumerate(plan.sizes)}
    scratch = Path(tempfile.mkdtemp(prefix="imgsearch-bench-collections-"))
    services: list[Service] = []
    try:
        many = Service(scratch / "many", None, scratch / "many.log")
        services.append(many)
        print(
            f"bench: collections, loading {len(plan.sizes)} collections, {total:,} vectors ...",
            file=sys.stderr,
            flush=True,
        )
        started = time.perf_counter()
        for size, part in slices.items():
            upload(many, name_of(size), part)
        load_s = time.perf_counter() - started
        rss = index.settled_rss_mib(many.pid)
        alone: dict[int, Service] = {}
        for size in plan.measured:
            alone[size] = Service(scratch / f"alone-{size}", None, scratch / f"alone-{size}.log")
            services.append(alone[size])
            upload(alone[size], name_of(size), slices[size])
        systems: dict[str, Timed] = {}
        for size in plan.measured:
            name = name_of(size)
            expected = [f"img-{i:07d}" for i in faiss.knn(queries[:1], slices[size], K)[1][0]]
            for label, service in (("many", many), ("alone", alone[size])):
                found = [m.id for m in service.client.search(queries[:1], K, collection=name)[0]]
                if found != expected:
                    raise RuntimeError(
                        f"{label}, collection {name}: the service answered {found}, FAISS {expected}"
                    )
                systems[f"{label}-{size}"] = Timed(cycling(singles, searching(service.client, name)))
        times = interleaved(systems, plan.rounds, plan.per_round, warmup=5)
    finally:
        for service in services:
            service.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    section = report(plan, Measured(times, load_s, rss))
    section.notes.append(load.note())
    return [section]


def searching(client: IndexClient, name: str) -> Callable[[np.ndarray], object]:
    return lambda queries: client.search(queries, K, collection=name)


def upload(service: Service, name: str, part: np.ndarray) -> None:
    """Creates the collection and upserts its vectors (ids `img-0000000` up, in each collection)."""
    service.client.create_collection(name)
    for start in range(0, len(part), index.LOAD_BATCH):
        stop = min(len(part), start + index.LOAD_BATCH)
        service.client.upsert(index.item_ids(start, stop), part[start:stop], collection=name)
    count = service.client.stats(collection=name).count
    if count != len(part):
        raise RuntimeError(f"collection {name} holds {count} vectors; {len(part)} were loaded")


def report(plan: Plan, measured: Measured) -> Section:
    section = Section("Collections: one of 10 collections against an index of that collection alone")
    sizes = ", ".join(index.label_n(size) for size in plan.sizes)
    section.notes += [
        f"One index service holds 10 collections of {sizes} vectors ({sum(plan.sizes):,} in all, loaded "
        f"over gRPC in {measured.load_s:.1f} s; {measured.rss_mib:,.0f} MiB resident), each its own slice of "
        "bench/index.py's seeded 128-d vectors. For the collections of "
        f"{', '.join(index.label_n(size) for size in plan.measured)}, another service holds that collection "
        "alone (created under the same name, so that both get the same requests; its `default` collection "
        f"is empty). One query at a time, k = {K}, `IndexClient.search(collection=NAME)`, every service "
        f"timed interleaved, {plan.rounds} x {plan.per_round} calls each.",
    ]
    rows = [
        "| collection | vectors | in the 10-collection service p50 / p99 ms | alone p50 / p99 ms | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size in plan.measured:
        many_p50, many_p99 = p50_p99_ms(measured.times[f"many-{size}"])
        alone_p50, alone_p99 = p50_p99_ms(measured.times[f"alone-{size}"])
        rows.append(
            f"| {name_of(size)} | {size:,} | {many_p50:.2f} / {many_p99:.2f} | {alone_p50:.2f} / "
            f"{alone_p99:.2f} | {many_p50 / alone_p50:.2f} |"
        )
        if size != plan.headline:
            continue
        ratio = many_p50 / alone_p50
        met = ratio <= TARGET_RATIO
        section.figures.append(
            Figure(
                f"index service search in one of 10 collections ({name_of(size)}, {index.label_n(size)} of "
                f"{sum(plan.sizes):,} vectors), one query, k = {K}, p50",
                many_p50,
                "ms",
                f"a service holding only that collection ({index.label_n(size)}), the same calls (p50)",
                alone_p50,
                ratio,
                f"ratio <= {TARGET_RATIO}",
                met,
                f"p99 {many_p99:.2f} against {alone_p99:.2f} ms"
                + ("" if met else "; the other collections cost this one's searches: see the table"),
                headline="collections",
            )
        )
    section.tables.append(("One query in one collection, k = 10", "\n".join(rows)))
    return section
