"""The FAISS store without gRPC: exact k-NN against numpy, writes, validation, snapshots."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest

from index_service.faiss_store import VectorStore
from index_service.snapshot import SnapshotError, newest_valid_snapshot, read_snapshot, write_snapshot
from index_service.store import CatalogState, FailedPrecondition, InvalidArgument, NotFound, StoreState
from tests.support import brute_force


def alone(state: StoreState) -> CatalogState:
    """A store's state as a snapshot holds it: the collection `default`."""
    return CatalogState({"default": state}, {}, state.lsn)


def filled(count: int, dim: int, seed: int = 0) -> tuple[VectorStore, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    ids = [f"item-{n}" for n in range(count)]
    store = VectorStore()
    store.upsert(ids, vectors, [{"n": str(n)} for n in range(count)], "v1")
    return store, vectors, ids


@pytest.mark.parametrize(
    "count,dim,k", [(1, 4, 1), (50, 8, 5), (1000, 128, 10), (3000, 32, 100), (20, 16, 50)]
)
def test_search_equals_brute_force(count: int, dim: int, k: int) -> None:
    store, vectors, ids = filled(count, dim, seed=count)
    queries = np.random.default_rng(1).standard_normal((25, dim)).astype(np.float32)
    expected_rows, expected_distances = brute_force(vectors, queries, k)
    results = store.search(queries, k, "v1")
    for row, matches in enumerate(results):
        assert len(matches) == min(k, count)
        np.testing.assert_allclose(
            [m.distance for m in matches], expected_distances[row], rtol=1e-4, atol=1e-4
        )
        # the same ids in the same order, except where float32 rounding may swap near-ties
        got = [m.id for m in matches]
        want = [ids[i] for i in expected_rows[row]]
        gaps = np.diff(expected_distances[row])
        for rank, (g, w) in enumerate(zip(got, want, strict=True)):
            near_tie = (rank > 0 and gaps[rank - 1] < 1e-4) or (rank < len(gaps) and gaps[rank] < 1e-4)
            assert g == w or near_tie, (row, rank, g, w)
        assert all(m.metadata == {"n": m.id.split("-")[1]} for m in matches)


def test_upsert_replaces_vector_and_metadata() -> None:
    store, _vectors, _ = filled(10, 4)
    new = np.full((1, 4), 100.0, np.float32)
    assert store.upsert(["item-3"], new, [{"tag": "new"}], "v1") == 10
    items, got, missing = store.get(["item-3", "nope"])
    assert items == [("item-3", {"tag": "new"})] and missing == ["nope"]
    np.testing.assert_array_equal(got[0], new[0])
    top = store.search(new, 1)[0][0]
    assert top.id == "item-3" and top.distance == 0.0


def test_delete_and_get() -> None:
    store, vectors, _ids = filled(100, 8)
    assert store.delete(["item-0", "item-1", "item-1", "absent"]) == (2, 1)
    assert store.stats().count == 98
    results = store.search(vectors[:2], 98)
    assert all(m.id not in {"item-0", "item-1"} for row in results for m in row)
    _items, got, _ = store.get(["item-50"])
    np.testing.assert_array_equal(got[0], vectors[50])


def test_search_by_id_excludes_itself() -> None:
    store, vectors, ids = filled(200, 16)
    matches = store.search_by_id(["item-7"], 5)[0]
    assert len(matches) == 5 and all(m.id != "item-7" for m in matches)
    order, _distances = brute_force(vectors, vectors[7:8], 6)
    assert [m.id for m in matches] == [ids[i] for i in order[0][1:]]
    with pytest.raises(NotFound, match="not in the index"):
        store.search_by_id(["missing"], 5)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda s: s.upsert(["a"], np.zeros((1, 5), np.float32), (), "v1"), InvalidArgument, "dim 5"),
        (
            lambda s: s.upsert(["a"], np.array([[np.nan, 0, 0, 0]], np.float32), (), "v1"),
            InvalidArgument,
            "NaN",
        ),
        (
            lambda s: s.upsert(["a"], np.array([[np.inf, 0, 0, 0]], np.float32), (), "v1"),
            InvalidArgument,
            "infinite",
        ),
        (lambda s: s.upsert([""], np.zeros((1, 4), np.float32), (), "v1"), InvalidArgument, "1 to 256 bytes"),
        (
            lambda s: s.upsert(["x" * 257], np.zeros((1, 4), np.float32), (), "v1"),
            InvalidArgument,
            "257 bytes",
        ),
        (lambda s: s.upsert(["a", "a"], np.zeros((2, 4), np.float32), (), "v1"), InvalidArgument, "twice"),
        (
            lambda s: s.upsert(["a", "b"], np.zeros((1, 4), np.float32), (), "v1"),
            InvalidArgument,
            "1 vectors for 2",
        ),
        (
            lambda s: s.upsert(["a"], np.zeros((1, 4), np.float32), [{}, {}], "v1"),
            InvalidArgument,
            "metadata",
        ),
        (
            lambda s: s.upsert(["a"], np.zeros((1, 4), np.float32), (), "v2"),
            FailedPrecondition,
            "model version",
        ),
        (lambda s: s.search(np.zeros((1, 5), np.float32), 3), InvalidArgument, "dim 5"),
        (lambda s: s.search(np.zeros((1, 4), np.float32), 0), InvalidArgument, "k must be"),
        (lambda s: s.search(np.zeros((1, 4), np.float32), 1001), InvalidArgument, "k must be"),
        (lambda s: s.search(np.zeros((1, 4), np.float32), 3, "v2"), FailedPrecondition, "model version"),
    ],
)
def test_bad_requests_change_nothing(call, error, message) -> None:  # type: ignore[no-untyped-def]
    store, _vectors, _ids = filled(10, 4)
    before = store.state()
    # a batch with one bad row must not store its good rows either
    with pytest.raises(error, match=message):
        call(store)
    after = store.state()
    assert after.ids == before.ids and after.metadata == before.metadata
    np.testing.assert_array_equal(after.vectors, before.vectors)


def test_empty_index_searches_to_nothing_and_takes_any_model() -> None:
    store = VectorStore()
    assert store.search(np.zeros((2, 3), np.float32), 5) == [[], []]
    store.upsert(["a"], np.ones((1, 3), np.float32), (), "v1")
    store.delete(["a"])
    store.upsert(["b"], np.ones((1, 6), np.float32), (), "v2")
    assert store.stats().dim == 6 and store.stats().model_version == "v2"


def test_snapshot_round_trip_and_damage(tmp_path: Path) -> None:
    store, vectors, _ = filled(500, 16)
    store.upsert(["ünïcode/ключ"], np.ones((1, 16), np.float32), [{"label": "ß"}], "v1")
    path = write_snapshot(alone(store.state()), tmp_path)
    restored = VectorStore(read_snapshot(path).collections["default"])
    assert restored.stats() == store.stats()
    queries = vectors[:10]
    assert restored.search(queries, 7) == store.search(queries, 7)
    assert restored.get(["ünïcode/ключ"])[0] == [("ünïcode/ключ", {"label": "ß"})]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match=re.escape(f"{path} is damaged")):
        read_snapshot(path)
    with pytest.raises(SnapshotError, match="no readable snapshot"):
        newest_valid_snapshot(tmp_path)
    assert newest_valid_snapshot(tmp_path / "none") is None


def test_a_damaged_snapshot_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    store, _, _ = filled(50, 4)
    older = store.state()
    older.lsn = 10
    write_snapshot(alone(older), tmp_path)
    newer = store.state()
    newer.lsn = 20
    path = write_snapshot(alone(newer), tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    state = newest_valid_snapshot(tmp_path)
    assert state is not None and state.lsn == 10 and len(state.collections["default"].ids) == 50


def test_a_copy_keeps_what_it_saw_while_the_store_changes() -> None:
    """copy() hands out the ids packed (decoded by the reader, after the lock): later upserts, deletes
    and the row moves a delete makes must not show through."""
    store = VectorStore()
    vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = [f"item-{n}" for n in range(10)]
    store.upsert(ids, vectors, [{"n": str(n)} for n in range(10)])
    copied = store.copy()
    store.delete(["item-0", "item-3"])  # the last rows move into the gaps
    store.upsert(["item-0", "new"], vectors[:2] + 100)
    assert list(copied.ids) == ids and len(copied.ids) == 10
    assert copied.ids[2:5] == ids[2:5] and copied.ids[-1] == "item-9"
    assert copied.metadata(3, 4) == [{"n": "3"}]
    np.testing.assert_array_equal(copied.vectors, vectors)
    assert copied.as_state().ids == ids


def test_searches_never_see_half_a_batch() -> None:
    """Writers replace all ids at once with vectors of one value; readers must never see two values."""
    dim, count = 8, 200
    store = VectorStore()
    ids = [f"i{n}" for n in range(count)]
    store.upsert(ids, np.zeros((count, dim), np.float32), (), "v")
    stop = threading.Event()
    seen_mixed: list[set[float]] = []

    def writer() -> None:
        for value in range(1, 60):
            store.upsert(ids, np.full((count, dim), float(value), np.float32), (), "v")
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            _, got, _ = store.get(ids)
            values = set(np.unique(got).tolist())
            if len(values) > 1:
                seen_mixed.append(values)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not seen_mixed
    assert store.stats().count == count
