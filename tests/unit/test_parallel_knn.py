"""ParallelKnn against numpy and against one single-threaded FAISS search: bitwise the same answers.

Splitting is forced (min_rows=1) on small indexes, with more workers than this machine may have cores, so
every path runs in several shards: unfiltered, and filtered ones: many rows selected (dense: every distance
computed, the others masked; at ROW_BY_ROW_DIMS through a bitmap) and few (a list of row numbers)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import faiss
import numpy as np
import pytest

from index_service.parallel_knn import (
    BLOCK,
    DENSE_SUBSET_FRACTION,
    PAD_DISTANCE,
    PAD_ROW,
    SUBSET_FRACTION,
    ParallelKnn,
    current_cpu,
)

WORKERS = 3


@pytest.fixture
def knn() -> Iterator[ParallelKnn]:
    with ParallelKnn(WORKERS, min_rows=1, min_subset_rows=1, dense_from_bytes=0) as searcher:
        yield searcher


@pytest.fixture(autouse=True)
def one_omp_thread() -> Iterator[None]:
    """The reference searches run as faiss_store runs one query: FAISS on one OpenMP thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def flat(vectors: np.ndarray) -> tuple[faiss.IndexFlatL2, np.ndarray]:
    """An IndexFlatL2 holding the vectors, and the [n, d] view of its storage (as VectorStore._rows)."""
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    pointer = index.get_xb()  # type: ignore[attr-defined]
    return index, faiss.rev_swig_ptr(pointer, vectors.size).reshape(vectors.shape)


def faiss_search(
    index: faiss.IndexFlatL2, queries: np.ndarray, k: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One single-threaded FAISS search, through a bitmap of the selected rows when filtered."""
    if mask is None:
        return index.search(queries, k)
    bits = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bits))
    return index.search(queries, k, params=faiss.SearchParameters(sel=selector))  # type: ignore[call-arg]


def brute_force(
    vectors: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """numpy's k nearest selected rows in float64, ties to the lower row, padded as FAISS pads."""
    selected = np.arange(len(vectors)) if mask is None else np.flatnonzero(mask)
    squared = ((queries[:, None, :].astype(np.float64) - vectors[selected][None]) ** 2).sum(axis=2)
    distances = np.full((len(queries), k), PAD_DISTANCE)
    rows = np.full((len(queries), k), PAD_ROW, np.int64)
    for query in range(len(queries)):
        order = np.lexsort((selected, squared[query]))[:k]
        distances[query, : len(order)] = squared[query, order]
        rows[query, : len(order)] = selected[order]
    return distances, rows


def random_case(count: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((count, dim)).astype(np.float32),
        rng.standard_normal((5, dim)).astype(np.float32),
    )


def masks(count: int, seed: int) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    clustered = np.zeros(count, bool)
    clustered[count // 2 : count // 2 + count * 9 // 20] = (
        True  # 45 %: a dense or bitmap search, bunched in the end
    )
    few_at_end = np.zeros(count, bool)
    few_at_end[-count // 50 :] = (
        True  # subset path (row numbers), every selected row in the last block or two
    )
    return {
        "unfiltered": None,
        "many-50%": rng.random(count) < 0.5,
        "few-5%": rng.random(count) < 0.05,
        "many-clustered": clustered,
        "few-at-end": few_at_end,
    }


def test_the_masks_take_the_paths_they_are_named_for() -> None:
    for name, mask in masks(20_000, 0).items():
        if mask is not None:
            for fraction in (SUBSET_FRACTION, DENSE_SUBSET_FRACTION):
                assert (mask.mean() <= fraction) == name.startswith("few"), name


@pytest.mark.parametrize("dim", [32, 8], ids=["dense", "bitmap"])
@pytest.mark.parametrize("k", [1, 10, 100])
@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("name", list(masks(1, 0)))
def test_equals_single_threaded_faiss_and_numpy(
    knn: ParallelKnn, name: str, nq: int, k: int, dim: int
) -> None:
    vectors, queries = random_case(20_000, dim, seed=k)
    mask = masks(len(vectors), seed=nq)[name]
    index, rows = flat(vectors)
    squared, found = knn.search(rows, queries[:nq], k, mask)
    expected_squared, expected_rows = faiss_search(index, queries[:nq], k, mask)
    assert squared.dtype == np.float32 and found.dtype == np.int64 and squared.shape == (nq, k)
    np.testing.assert_array_equal(found, expected_rows)
    np.testing.assert_array_equal(squared, expected_squared)  # bitwise: the same kernel in every shard
    reference_squared, reference_rows = brute_force(vectors, queries[:nq], k, mask)
    np.testing.assert_array_equal(found, reference_rows)
    np.testing.assert_allclose(squared, reference_squared, rtol=1e-5)


@pytest.mark.parametrize("name", list(masks(1, 0)))
def test_a_batch_runs_as_one_plain_search(knn: ParallelKnn, name: str) -> None:
    """From split_below_queries queries FAISS's own threads take over: the same answer, unsplit."""
    vectors, _ = random_case(5_000, 16, seed=3)
    queries = np.random.default_rng(4).standard_normal((knn.split_below_queries + 4, 16)).astype(np.float32)
    mask = masks(len(vectors), seed=5)[name]
    index, rows = flat(vectors)
    squared, found = knn.search(rows, queries, 10, mask)
    expected_squared, expected_rows = faiss_search(index, queries, 10, mask)
    np.testing.assert_array_equal(found, expected_rows)
    np.testing.assert_allclose(squared, expected_squared, rtol=1e-5)  # copied subset: maybe BLAS


@pytest.mark.parametrize("name", list(masks(1, 0)))
def test_every_shard_is_merged(knn: ParallelKnn, name: str) -> None:
    """A query equal to a row of the first, a middle and the last shard finds that row first: the merge
    leaves no shard out (an answer that ignored one would miss its row)."""
    vectors, _ = random_case(12 * BLOCK, 16, seed=6)
    count = len(vectors)
    mask = masks(count, seed=7)[name]
    candidates = np.arange(count) if mask is None else np.flatnonzero(mask)
    targets = [int(candidates[0]), int(candidates[len(candidates) // 2]), int(candidates[-1])]
    _, rows = flat(vectors)
    _, found = knn.search(rows, vectors[targets], 1, mask)
    assert found[:, 0].tolist() == targets


@pytest.mark.parametrize("dim", [16, 8], ids=["dense", "bitmap"])
@pytest.mark.parametrize("name", list(masks(1, 0)))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_exact_ties_across_shard_borders_go_to_the_lower_row(
    knn: ParallelKnn, name: str, k: int, dim: int
) -> None:
    """Integer vectors give exact float32 distances, and many of them equal: copies of one vector in the
    first, a middle and the last shard (two in the last), and thousands of ties besides."""
    rng = np.random.default_rng(k)
    count = 8 * BLOCK
    vectors = rng.integers(-2, 3, (count, dim)).astype(np.float32)
    copies = [5, count // 2 + 1, count - 3, count - 1]
    vectors[copies] = 3  # no other row is this vector: exactly these four at distance 0 from it
    mask = masks(count, seed=8)[name]
    if mask is not None:
        mask[copies] = True
    queries = np.vstack([vectors[copies[:1]], rng.integers(-2, 3, (3, dim)).astype(np.float32)])
    index, rows = flat(vectors)
    squared, found = knn.search(rows, queries, k, mask)
    expected_squared, expected_rows = brute_force(vectors, queries, k, mask)
    np.testing.assert_array_equal(found, expected_rows)
    np.testing.assert_array_equal(squared, expected_squared.astype(np.float32))
    faiss_squared, faiss_rows = faiss_search(index, queries, k, mask)
    np.testing.assert_array_equal(found, faiss_rows)
    np.testing.assert_array_equal(squared, faiss_squared)
    assert found[0, : min(k, 4)].tolist() == copies[:k]


@pytest.mark.parametrize("dim", [16, 8], ids=["dense", "bitmap"])
@pytest.mark.parametrize("name", list(masks(1, 0)))
def test_k_beyond_a_shard_and_beyond_the_selection_is_padded(knn: ParallelKnn, name: str, dim: int) -> None:
    vectors, queries = random_case(3 * BLOCK, dim, seed=9)
    mask = masks(len(vectors), seed=10)[name]
    selected = len(vectors) if mask is None else int(mask.sum())
    index, rows = flat(vectors)
    for k in (BLOCK + 10, selected, selected + 50, len(vectors) + 7):
        squared, found = knn.search(rows, queries, k, mask)
        expected_squared, expected_rows = faiss_search(index, queries, k, mask)
        np.testing.assert_array_equal(found, expected_rows)
        np.testing.assert_array_equal(squared, expected_squared)
        real = min(k, selected)
        assert (found[:, :real] >= 0).all()
        assert (found[:, real:] == PAD_ROW).all() and (squared[:, real:] == np.float32(PAD_DISTANCE)).all()


def test_nothing_selected_or_stored_gives_padding(knn: ParallelKnn) -> None:
    vectors, queries = random_case(2 * BLOCK, 8, seed=11)
    _, rows = flat(vectors)
    for base, mask in ((rows, np.zeros(len(rows), bool)), (np.zeros((0, 8), np.float32), None)):
        squared, found = knn.search(base, queries[:2], 4, mask)
        assert (found == PAD_ROW).all() and (squared == np.float32(PAD_DISTANCE)).all()
        assert squared.shape == found.shape == (2, 4)
    assert knn.search(rows, queries[:0], 4)[1].shape == (0, 4)


@pytest.mark.parametrize(
    ("subset_fraction", "dim"), [(0.0, 8), (0.0, 16), (1.0, 8)], ids=["bitmap", "dense", "subset"]
)
def test_shards_with_nothing_selected(subset_fraction: float, dim: int) -> None:
    """Selected rows all in one block: the bitmap's shards cut at equal selected counts leave the
    others without a selected row, so do the dense one's even shards; the subset's split its few rows."""
    vectors, queries = random_case(6 * BLOCK, dim, seed=12)
    index, rows = flat(vectors)
    with ParallelKnn(
        WORKERS,
        min_rows=1,
        min_subset_rows=1,
        subset_fraction=subset_fraction,
        dense_subset_fraction=subset_fraction,
        dense_from_bytes=0,
    ) as searcher:
        for selected in ([0], [3 * BLOCK + 1], [len(vectors) - 1], [7, 9], range(2 * BLOCK, 3 * BLOCK)):
            mask = np.zeros(len(vectors), bool)
            mask[list(selected)] = True
            for k in (1, 4):
                squared, found = searcher.search(rows, queries, k, mask)
                expected_squared, expected_rows = faiss_search(index, queries, k, mask)
                np.testing.assert_array_equal(found, expected_rows)
                np.testing.assert_array_equal(squared, expected_squared)
                assert set(found[:, 0].tolist()) <= set(selected)


def test_unsplit_searches_give_the_same_answers() -> None:
    """Default thresholds on a small index: one call in the calling thread, no pool thread started."""
    vectors, queries = random_case(4_000, 16, seed=13)
    index, rows = flat(vectors)
    with ParallelKnn(WORKERS) as searcher:
        for mask in masks(len(vectors), seed=14).values():
            squared, found = searcher.search(rows, queries[:1], 10, mask)
            expected_squared, expected_rows = faiss_search(index, queries[:1], 10, mask)
            np.testing.assert_array_equal(found, expected_rows)
            np.testing.assert_array_equal(squared, expected_squared)
        assert not [t for t in threading.enumerate() if t.name.startswith("parallel-knn")]


def test_concurrent_searches_share_the_pool(knn: ParallelKnn) -> None:
    vectors, queries = random_case(10_000, 16, seed=15)
    index, rows = flat(vectors)
    mask = masks(len(vectors), seed=16)["many-50%"]
    expected = [faiss_search(index, queries[i : i + 1], 5, mask)[1] for i in range(len(queries))]
    answers: dict[int, np.ndarray] = {}

    def search(i: int) -> None:
        for _ in range(20):
            answers[i] = knn.search(rows, queries[i : i + 1], 5, mask)[1]

    threads = [threading.Thread(target=search, args=(i,)) for i in range(len(queries))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, rows_found in enumerate(expected):
        np.testing.assert_array_equal(answers[i], rows_found)


def test_searches_in_flight_share_the_cores(knn: ParallelKnn) -> None:
    """A search alone takes every worker; with others in flight, its share of them (one at least)."""
    assert knn._shards(10**6, 1) == WORKERS
    assert knn._shards(2, 1) == 2  # and no shard under min_rows
    knn._in_flight = 2
    assert knn._shards(10**6, 1) == WORKERS // 2
    knn._in_flight = WORKERS + 1
    assert knn._shards(10**6, 1) == 1
    knn._in_flight = 0


def test_pieces_are_shared_by_the_threads_taking_part(knn: ParallelKnn) -> None:
    """A split search cuts pieces_per_thread pieces per thread, none under min_rows / that many rows."""
    assert knn._pieces(1, 10**6, 1) == 1
    assert knn._pieces(WORKERS, 10**6, 1) == WORKERS * knn.pieces_per_thread
    searcher = ParallelKnn(2, min_rows=4096)
    try:
        assert searcher._pieces(2, 5_000, 4096) == 4  # 5,000 rows // 1,024 a piece, within 2 to 8
        assert searcher._pieces(2, 3_000, 4096) == 2  # at least one piece a thread
        assert searcher._pieces(2, 10**6, 4096) == 8
    finally:
        searcher.close()


def test_a_search_does_not_wait_for_busy_helpers() -> None:
    """With every helper busy elsewhere, the calling thread takes every piece and answers exactly; the
    pieces handed to the busy helpers are withdrawn, never run later on rows that may have changed."""
    vectors, queries = random_case(8 * BLOCK, 8, seed=21)
    index, rows = flat(vectors)
    release = threading.Event()
    with ParallelKnn(WORKERS, min_rows=1, min_subset_rows=1) as searcher:
        blockers = [helper.pool.submit(release.wait, 30) for helper in searcher._helpers]
        try:
            for mask in masks(len(vectors), seed=22).values():
                squared, found = searcher.search(rows, queries[:1], 10, mask)
                expected_squared, expected_rows = faiss_search(index, queries[:1], 10, mask)
                np.testing.assert_array_equal(found, expected_rows)
                np.testing.assert_array_equal(squared, expected_squared)
            assert not any(blocker.done() for blocker in blockers)  # answered while they were busy
        finally:
            release.set()
        for helper in searcher._helpers:
            assert helper.pool.submit(lambda: None).result(timeout=30) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_helpers_are_pinned_one_core_each_and_skip_the_callers() -> None:
    cores = sorted(os.sched_getaffinity(0))
    with ParallelKnn(len(cores)) as searcher:
        pinned = [h.pool.submit(os.sched_getaffinity, 0).result(timeout=30) for h in searcher._helpers]
        assert pinned == [{core} for core in cores]
        here = current_cpu()
        if here >= 0:  # glibc's sched_getcpu: the first helpers chosen run elsewhere
            assert all(helper.cpu != here for helper in searcher._helpers_for(len(cores) - 1))
    with ParallelKnn(len(cores), pin=False) as searcher:
        unpinned = searcher._helpers[0].pool.submit(os.sched_getaffinity, 0).result(timeout=30)
        assert unpinned == set(cores)


def test_close_stops_every_thread() -> None:
    def pool_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("parallel-knn")]

    assert not pool_threads()
    vectors, queries = random_case(4 * BLOCK, 8, seed=17)
    _, rows = flat(vectors)
    searcher = ParallelKnn(WORKERS, min_rows=1)
    searcher.search(rows, queries[:1], 3)
    assert pool_threads()  # it did split: the pool's threads ran the other shards
    searcher.close()
    assert not pool_threads()
    with pytest.raises(RuntimeError):
        searcher.search(rows, queries[:1], 3)
    searcher.close()  # twice is fine


def test_the_calling_threads_openmp_setting_is_kept(knn: ParallelKnn) -> None:
    vectors, queries = random_case(4 * BLOCK, 8, seed=18)
    _, rows = flat(vectors)
    faiss.omp_set_num_threads(2)
    knn.search(rows, queries[:1], 3)
    assert faiss.omp_get_max_threads() == 2


def test_bad_arguments_are_refused(knn: ParallelKnn) -> None:
    vectors, queries = random_case(100, 8, seed=19)
    _, rows = flat(vectors)
    with pytest.raises(ValueError, match="rows"):
        knn.search(vectors.astype(np.float64), queries, 3)
    with pytest.raises(ValueError, match="rows"):
        knn.search(np.asfortranarray(vectors), queries, 3)
    with pytest.raises(ValueError, match="queries"):
        knn.search(rows, queries[:, :4], 3)
    with pytest.raises(ValueError, match="k must"):
        knn.search(rows, queries, 0)
    with pytest.raises(ValueError, match="mask"):
        knn.search(rows, queries, 3, np.ones(99, bool))
    with pytest.raises(ValueError, match="mask"):
        knn.search(rows, queries, 3, np.ones(100, np.int8))
