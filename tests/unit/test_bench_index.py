"""The index and peers benchmark's helpers, in a second: the data, the timing loop, the agreement check,
the report and its plot. No timing is asserted: measured speed never goes in a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import index, peers
from imgsearch.v1 import index_pb2


def test_vectors_are_seeded_and_a_prefix_of_a_longer_draw() -> None:
    short, longer = index.make_vectors(25_000), index.make_vectors(31_000)
    assert short.shape == (25_000, index.DIM) and short.dtype == np.float32
    np.testing.assert_array_equal(short, longer[:25_000])
    assert not np.array_equal(index.make_queries(10), short[:10])


def test_the_echoed_reply_is_the_size_of_a_real_one() -> None:
    matches = [index_pb2.Match(id=i, distance=3.25) for i in index.item_ids(990, 1000)]
    real = index_pb2.SearchResponse(results=[index_pb2.Neighbors(matches=matches)])
    assert index.search_reply_bytes() == real.ByteSize()


def test_interleaved_takes_turns_and_counts_every_call() -> None:
    order: list[str] = []

    def system(name: str) -> index.Timed:
        def call() -> None:
            order.append(name)

        def prepare() -> None:
            order.append(f"prep-{name}")

        return index.Timed(call, prepare)

    systems = {"a": system("a"), "b": system("b")}
    times = index.interleaved(systems, rounds=3, per_round=2, warmup=1)
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6}
    calls = [step for step in order if not step.startswith("prep")]
    warmups, rounds = ["a", "b"], ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert calls == [*warmups, *rounds]


def test_agreement_allows_exact_ties_only() -> None:
    vectors = np.array([[0, 0], [1, 0], [0, 1], [3, 0]], dtype=np.float32)
    queries = np.zeros((1, 2), dtype=np.float32)
    truth = np.array([[0, 1]])
    same = peers.agreement({0: [1, 0]}, truth, vectors, queries)
    tie = peers.agreement({0: [0, 2]}, truth, vectors, queries)  # vector 2 is as near as vector 1
    wrong = peers.agreement({0: [0, 3]}, truth, vectors, queries)
    assert (same.same_sets, same.same_with_ties, same.recall) == (1, 1, 1.0)
    assert (tie.same_sets, tie.same_with_ties) == (0, 1)
    assert (wrong.same_sets, wrong.same_with_ties, wrong.recall) == (0, 0, 0.5)


def measured_sizes(copies_up_to: int = 100_000) -> list[index.Measured]:
    """Made-up measurements at 10k, 100k and 1M, shaped as measure_n's (no copies past copies_up_to)."""
    rng = np.random.default_rng(0)
    per_n = []
    for n in (10_000, 100_000, 1_000_000):
        scale = n / 10_000
        m = index.Measured(n, load_s=n / 60_000, rss_empty_mib=65, rss_loaded_mib=65 + n * 700 / 2**20)
        keys = [key for key, _ in index.SINGLE_SYSTEMS + index.FILTERED_SYSTEMS]
        if n > copies_up_to:
            keys = [key for key in keys if key not in ("service1", "service2")]
        m.single = {
            name: rng.uniform(0.5, 1.0, 20) * 1e-3 * scale for name in ["echo_request", "echo_reply", *keys]
        }
        batch_keys = [key for key in keys if key in dict(index.SINGLE_SYSTEMS) and key != "store"]
        m.batch_s = {key: rng.uniform(0.5, 1.0, 3) * 0.05 * scale for key in batch_keys}
        m.batch_s |= {key: np.full(3, 2e-3) for key in ("echo_batch_request", "echo_batch_reply")}
        m.bytes_used = 523 * n
        m.faiss_bytes, m.store_bytes = 512.0, 600.0
        m.batch_request_bytes, m.batch_reply_bytes = 512_000, 250_000
        per_n.append(m)
    return per_n


def test_the_report_and_its_plot(tmp_path: Path) -> None:
    per_n = measured_sizes()
    results = index.Results(index.NORMAL, per_n, 2e5, 1e4, 1.7e5, 2e3, 5e2, 523, 203)
    section = index.report(results, tmp_path)
    names = [f.name for f in section.figures]
    assert sum("one query" in name for name in names) == 4  # 10k, 100k, 1M, 1M filtered
    assert sum("queries, N =" in name for name in names) == 3
    memory = next(f for f in section.figures if "memory" in f.name)
    assert abs(memory.value - 700) < 1 and memory.met is False  # 700 / 523 > 1.3
    assert memory.headline == "memory-1M"
    assert next(f.met for f in section.figures if "one query" in f.name) is None  # no target at 10k
    headlines = {f.headline: f for f in section.figures if f.headline}
    assert set(headlines) == {"one-1M", "one-1M-filtered", "batch-10k", "batch-100k", "batch-1M", "memory-1M"}
    one = headlines["one-1M"]
    assert one.reference_value == per_n[-1].p50_ms("faiss1") and one.target == "ratio <= 0.6"
    assert one.ratio == one.value / per_n[-1].p50_ms("faiss1")
    filtered = headlines["one-1M-filtered"]
    assert filtered.value == per_n[-1].p50_ms("service_filtered")
    assert filtered.reference_value == per_n[-1].p50_ms("faiss1_filtered")
    batch = headlines["batch-1M"]  # echo of the batch (2 ms) + the better FAISS setting
    best_s = min(float(np.median(per_n[-1].batch_s[key])) for key in ("faiss1", "faiss2"))
    assert batch.reference_value is not None and abs(batch.reference_value - 1000 / (2e-3 + best_s)) < 1e-6
    assert section.plots == [tmp_path / "index_latency_vs_n.png"] and section.plots[0].stat().st_size > 0
    assert len(section.tables) == 4 and "| 1M (20 calls each) |" in section.tables[0][1]
    assert " |  |  | " in section.tables[0][1].splitlines()[-1], "no copies at 1M: empty cells"


def test_the_filter_mask_keeps_half_and_is_seeded() -> None:
    mask = index.filter_mask(1_000)
    assert mask.sum() == 500 and (index.filter_mask(1_000) == mask).all()
