"""Peers: what a user might pick instead of the index service, on the same vectors and queries.

Milvus Lite (`pymilvus` with `milvus-lite`: a local file URI, a FLAT index with the L2 metric) and
`qdrant-client` in local mode (in memory; its local mode always searches exactly, by brute force), beside
in-process FAISS `IndexFlatL2` and the index service, at N = 100k (10k with --quick), one query at a time,
k = 10. Both peers are optional: `pip install -e '.[bench]'` (which `make bench` runs) brings them.

All systems are loaded first, then timed interleaved (a few calls each in turn, the same queries in the
same order). Each system's answers are compared with FAISS's: the same ids as a set, and the same k
distances allowing for exact ties (another id at the same distance as FAISS's 10th, in float64
recomputed from the vectors, to float32 rounding).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from bench.index import (
    K,
    OtherLoad,
    Service,
    Timed,
    interleaved,
    label_n,
    load_service,
    make_queries,
    make_vectors,
)
from bench.report import Figure, Section, p50_p99_ms

SPEEDUP_TARGET = 10.0
Search = Callable[[np.ndarray], list[int]]  # one query [dim] -> row ids, nearest first


@dataclass
class System:
    """One system: how long loading took, its answers (row ids per query) and its call times."""

    name: str
    how: str = ""
    setup_s: float = 0.0
    answers: dict[int, list[int]] = field(default_factory=dict)
    times_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    skipped: str = ""  # why it did not run


def answering(system: System, search: Search, queries: np.ndarray) -> Timed:
    """A call that searches the next query (the same order for every system) and keeps its ids."""
    position = [0]

    def call() -> None:
        row = position[0] % len(queries)
        position[0] += 1
        system.answers[row] = search(queries[row])

    return Timed(call)


# ---- the systems: each a context manager that loads the vectors and yields its search ----------------


@contextlib.contextmanager
def faiss_flat(system: System, vectors: np.ndarray, threads: int) -> Iterator[Search]:
    started = time.perf_counter()
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    system.setup_s = time.perf_counter() - started
    system.how = f"`faiss.omp_set_num_threads({threads})` before its turns"

    def search(query: np.ndarray) -> list[int]:
        faiss.omp_set_num_threads(threads)  # a few ns; the other FAISS system shares the setting
        return cast(list[int], index.search(query[None, :], K)[1][0].tolist())

    yield search


@contextlib.contextmanager
def index_service(system: System, vectors: np.ndarray, scratch: Path) -> Iterator[Search]:
    service = Service(scratch / "data", None, scratch / "index.log")
    try:
        system.setup_s = load_service(service, vectors)
        system.how = "`IndexClient.search`; loaded over gRPC in batches of 50,000 (log + fsync)"

        def search(query: np.ndarray) -> list[int]:
            return [int(m.id[4:]) for m in service.client.search(query[None, :], K)[0]]

        yield search
    finally:
        service.stop()


@contextlib.contextmanager
def milvus_lite(system: System, vectors: np.ndarray, scratch: Path) -> Iterator[Search | None]:
    try:
        from pymilvus import DataType, MilvusClient
    except ImportError as error:
        system.skipped = (
            f"not installed ({error}); `pip install -e '.[bench]'` brings pymilvus and milvus-lite"
        )
        yield None
        return
    started = time.perf_counter()
    client: Any = MilvusClient(str(scratch / "milvus.db"))
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
        client.create_collection("bench", schema=schema, index_params=index_params)
        for start in range(0, len(vectors), 10_000):
            stop = min(len(vectors), start + 10_000)
            client.insert("bench", [{"id": i, "vector": vectors[i]} for i in range(start, stop)])
        # Flushed (sealed) segments get the FLAT index; searching unflushed data is far slower.
        client.flush("bench")
        deadline = time.monotonic() + 300
        while client.describe_index("bench", "vector").get("indexed_rows", 0) < len(vectors):
            if time.monotonic() > deadline:
                raise RuntimeError("Milvus Lite did not index the collection within 300 s")
            time.sleep(0.2)
        # (create_collection with index params loaded it; a release + load here sometimes failed with
        # "file seems not fully written".)
        system.setup_s = time.perf_counter() - started
        system.how = (
            "`MilvusClient(file)`; insert in batches of 10,000, flush, wait for the FLAT index; "
            "`search(limit=10, output_fields=['id'])`"
        )

        def search(query: np.ndarray) -> list[int]:
            hits = client.search(
                "bench", data=[query], limit=K, search_params={"metric_type": "L2"}, output_fields=["id"]
            )
            return [int(hit["id"]) for hit in hits[0]]

        yield search
    finally:
        client.close()


@contextlib.contextmanager
def qdrant_local(system: System, vectors: np.ndarray) -> Iterator[Search | None]:
    try:
        from qdrant_client import QdrantClient, models
    except ImportError as error:
        system.skipped = f"not installed ({error}); `pip install -e '.[bench]'` brings qdrant-client"
        yield None
        return
    with warnings.catch_warnings():
        # Local mode warns past 20,000 points that a server would be faster.
        warnings.simplefilter("ignore", UserWarning)
        started = time.perf_counter()
        client: Any = QdrantClient(":memory:")
        try:
            client.create_collection(
                "bench",
                vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.EUCLID),
            )
            for start in range(0, len(vectors), 10_000):
                stop = min(len(vectors), start + 10_000)
                batch = models.Batch(ids=list(range(start, stop)), vectors=cast(Any, vectors[start:stop]))
                client.upsert("bench", points=batch)
            system.setup_s = time.perf_counter() - started
            system.how = (
                '`QdrantClient(":memory:")` (the on-disk local mode, `path=`, stores each point through '
                "SQLite and loads far too slowly for this budget); upserts in batches of 10,000; "
                "`query_points(limit=10)`, exact in local mode"
            )

            def search(query: np.ndarray) -> list[int]:
                return [int(point.id) for point in client.query_points("bench", query=query, limit=K).points]

            yield search
        finally:
            client.close()


# ---- agreement -------------------------------------------------------------------------------------


@dataclass
class Agreement:
    queries: int
    same_sets: int  # queries whose k ids are FAISS's, as a set
    same_with_ties: int  # queries whose k distances are FAISS's (another id at a tied distance is fine)
    recall: float  # share of FAISS's ids found


def agreement(
    answers: dict[int, list[int]], truth: np.ndarray, vectors: np.ndarray, queries: np.ndarray
) -> Agreement:
    same_sets = same_with_ties = found = wanted = 0
    for row, ids in answers.items():
        expected = truth[row].tolist()
        found += len(set(ids) & set(expected))
        wanted += len(expected)
        if set(ids) == set(expected):
            same_sets += 1
            same_with_ties += 1
            continue
        query = queries[row].astype(np.float64)
        ours = np.sort(((vectors[ids].astype(np.float64) - query) ** 2).sum(axis=1))
        theirs = np.sort(((vectors[expected].astype(np.float64) - query) ** 2).sum(axis=1))
        if len(ours) == len(theirs) and np.allclose(ours, theirs, rtol=1e-6, atol=0):
            same_with_ties += 1
    return Agreement(len(answers), same_sets, same_with_ties, found / max(1, wanted))


# ---- the section -----------------------------------------------------------------------------------


def run(out: Path, quick: bool) -> list[Section]:
    n = 10_000 if quick else 100_000
    rounds, per_round = (4, 5) if quick else (10, 10)
    load = OtherLoad()
    vectors = make_vectors(n)
    queries = make_queries()
    truth = faiss.knn(queries, vectors, K)[1]  # exact, the reference for the agreement
    systems = [
        System("FAISS IndexFlatL2 in-process, 1 thread"),
        System("FAISS IndexFlatL2 in-process, 2 threads"),
        System("imgsearch index service (gRPC, default threads)"),
        System("qdrant-client, local mode"),
        System("Milvus Lite (pymilvus + milvus-lite), FLAT, L2"),
    ]
    faiss1, faiss2, service, qdrant, milvus = systems
    scratch = Path(tempfile.mkdtemp(prefix="imgsearch-bench-peers-"))
    saved_threads = faiss.omp_get_max_threads()
    try:
        with contextlib.ExitStack() as stack:
            searches: list[Search | None] = [
                stack.enter_context(faiss_flat(faiss1, vectors, 1)),
                stack.enter_context(faiss_flat(faiss2, vectors, 2)),
                stack.enter_context(index_service(service, vectors, scratch)),
                stack.enter_context(qdrant_local(qdrant, vectors)),
                stack.enter_context(milvus_lite(milvus, vectors, scratch)),
            ]
            timed = {
                system.name: answering(system, search, queries)
                for system, search in zip(systems, searches, strict=True)
                if search is not None
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                # numpy's and FAISS's BLAS threads (qdrant local computes with numpy) spin up to ~0.1 s
                times = interleaved(timed, rounds, per_round, warmup=5, rest_s=0.2)
            for system in systems:
                if system.name in times:
                    system.times_s = times[system.name]
    finally:
        faiss.omp_set_num_threads(saved_threads)
        shutil.rmtree(scratch, ignore_errors=True)

    section = Section(f"Peers: Milvus Lite and qdrant-client local, N = {label_n(n)}")
    service_p50 = p50_p99_ms(service.times_s)[0]
    faiss_p50 = min(p50_p99_ms(faiss1.times_s)[0], p50_p99_ms(faiss2.times_s)[0])
    for peer in (milvus, qdrant):
        if peer.skipped:
            section.notes.append(f"{peer.name}: skipped, {peer.skipped}.")
            continue
        peer_p50 = p50_p99_ms(peer.times_s)[0]
        speedup = peer_p50 / service_p50
        met = speedup >= SPEEDUP_TARGET
        section.figures.append(
            Figure(
                f"index service vs {peer.name}: one query, k = {K}, p50, N = {label_n(n)}",
                service_p50,
                "ms",
                peer.name,
                peer_p50,
                speedup,
                f"reference / value >= {SPEEDUP_TARGET:.0f}",
                met,
                ""
                if met
                else f"the peer takes only {speedup:.1f} times the service's p50; in-process FAISS takes "
                f"{faiss_p50:.2f} ms, the service {service_p50 / faiss_p50:.1f} times that",
            )
        )
    rows = [
        "| system | load N (s) | p50 ms | p99 ms | ids as FAISS's (sets) | same k distances (ties allowed) "
        "| recall@10 | how |",
        "| --- " * 8 + "|",
    ]
    for system in systems:
        if system.skipped:
            rows.append(f"| {system.name} | | | | | | | skipped: {system.skipped} |")
            continue
        p50, p99 = p50_p99_ms(system.times_s)
        agree = agreement(system.answers, truth, vectors, queries)
        rows.append(
            f"| {system.name} | {system.setup_s:.1f} | {p50:.2f} | {p99:.2f} | "
            f"{agree.same_sets} / {agree.queries} | {agree.same_with_ties} / {agree.queries} | "
            f"{agree.recall:.4f} | {system.how} |"
        )
    section.tables.append(
        (f"One query at a time, k = {K}, {rounds * per_round} calls each, interleaved", "\n".join(rows))
    )
    section.notes += [
        f"The same {n:,} seeded 128-d vectors and the same queries as the index section (bench/index.py), "
        "all systems loaded at once and timed in turns. The truth is `faiss.knn` (exact). *Ids as FAISS's*: "
        "the k ids of a query are FAISS's, as a set; *ties allowed* also counts a query whose k distances "
        "(float64, recomputed from the vectors) equal FAISS's, so an id swapped for another at exactly the "
        "same distance still agrees.",
        load.note(),
    ]
    return [section]
