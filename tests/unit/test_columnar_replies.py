"""The columnar search reply without gRPC: the store's columns (every path, in chunks, with `check` between
them) against its Match lists and a brute force; the servicer's encoding and the client's decoding of them,
for ids of any UTF-8; malformed replies refused; Match made fast and still a plain frozen dataclass."""

from __future__ import annotations

import dataclasses
import itertools
import pickle

import faiss
import numpy as np
import pytest

import index_service.faiss_store as faiss_store
from imgsearch import convert
from imgsearch.client import IndexClient, ServiceError
from imgsearch.convert import Match, SearchArrays, search_arrays_of, split_utf8
from imgsearch.v1 import index_pb2
from index_service.faiss_store import SearchColumns, VectorStore
from index_service.filters import Condition
from index_service.servicer import _columnar, _columns_of
from index_service.store import Match as StoreMatch
from tests.support import brute_force

WEIRD_IDS = [
    "a",
    "é",
    "ß-straße",
    "日本",
    "🙂",
    "x" * 256,
    "é" * 128,
    "a\u0301",
    "\x00nul",
    "tab\tand\nnewline",
]


def filled(count: int, dim: int, seed: int = 0) -> tuple[VectorStore, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    ids = [WEIRD_IDS[n] if n < len(WEIRD_IDS) else f"item-{n}" for n in range(count)]
    store = VectorStore()
    store.upsert(ids, vectors, [{"n": str(n), "odd": "yes"} if n % 2 else {} for n in range(count)], "v1")
    return store, vectors, ids


def as_matches(columns: SearchColumns) -> list[list[tuple[str, float, bytes | None]]]:
    flat = list(zip(columns.ids, columns.distances.tolist(), columns.metadata, strict=True))
    bounds = np.concatenate([[0], np.cumsum(columns.counts)]).tolist()
    return [flat[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    "conditions",
    [(), (Condition("n", "prefix", ("1",)),), (Condition("odd", "exists"),)],
    ids=["all", "subset", "bitmap"],
)
@pytest.mark.parametrize("max_distance", [None, 5.0])
def test_store_columns_are_its_matches_in_every_chunking(
    conditions: tuple[Condition, ...], max_distance: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _, ids = filled(600, 16)
    queries = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    expected = store.search(queries, 7, conditions=conditions, max_distance=max_distance)
    expected_by_id = store.search_by_id(ids[:40], 7, conditions=conditions, max_distance=max_distance)
    monkeypatch.setattr(faiss_store, "CHUNK_DISTANCES", 1)  # chunks of 8 queries (300 x 16 is on the scan)
    checks: list[int] = []
    columns = store.search_columns(
        queries, 7, check=lambda: checks.append(1), conditions=conditions, max_distance=max_distance
    )
    assert len(checks) >= 8  # between chunks
    assert columns.counts.dtype == np.int64 and columns.distances.dtype == np.float32
    assert [[m[0] for m in row] for row in as_matches(columns)] == [[m.id for m in row] for row in expected]
    got = [m for row in as_matches(columns) for m in row]
    want = [m for row in expected for m in row]
    assert np.allclose([m[1] for m in got], [m.distance for m in want], rtol=1e-5, atol=1e-4)
    assert [faiss_store.decode_metadata(m[2]) for m in got] == [m.metadata for m in want]
    assert store._matches(columns) == [  # what `search` makes of them
        [StoreMatch(i, d, faiss_store.decode_metadata(e)) for i, d, e in row] for row in as_matches(columns)
    ]
    by_id = store.search_by_id_columns(ids[:40], 7, conditions=conditions, max_distance=max_distance)
    assert [[m[0] for m in row] for row in as_matches(by_id)] == [
        [m.id for m in row] for row in expected_by_id
    ]
    assert all(ids[q] not in [m[0] for m in row] for q, row in enumerate(as_matches(by_id)))


@pytest.mark.parametrize("subset", [False, True])
def test_store_columns_are_the_brute_force_in_blas_chunks(
    subset: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, vectors, ids = filled(2000, 32, seed=4)
    queries = np.random.default_rng(5).standard_normal((700, 32)).astype(np.float32)  # 700 x 32: BLAS
    monkeypatch.setattr(faiss_store, "BLAS_CHUNK_DISTANCES", 1)  # chunks of BLAS_CHUNK_QUERIES, norms given
    conditions = (Condition("n", "prefix", ("19",)),) if subset else ()  # 56 of 2000: the rows copied
    rows = [n for n in range(2000) if n % 2 and str(n).startswith("19")] if subset else list(range(2000))
    checks: list[int] = []
    columns = store.search_columns(queries, 10, check=lambda: checks.append(1), conditions=conditions)
    assert len(checks) == 2  # 256 + 256 + 188
    order, distances = brute_force(vectors[rows], queries, 10)
    assert columns.counts.tolist() == [10] * 700
    assert columns.ids == [ids[rows[i]] for i in order.ravel()]
    assert np.allclose(columns.distances, distances.ravel(), rtol=1e-4, atol=1e-3)


def test_importing_the_store_lowers_faiss_blas_threshold() -> None:
    assert faiss.cvar.distance_compute_blas_threshold <= faiss_store.BLAS_THRESHOLD


def test_search_by_id_keeps_k_when_the_item_is_not_among_its_own_nearest() -> None:
    store = VectorStore()
    twins = np.zeros((5, 4), np.float32)  # five identical vectors: any of them may come first
    store.upsert(["a", "b", "c", "d", "e"], twins)
    columns = store.search_by_id_columns(["c", "a"], 3)
    assert columns.counts.tolist() == [3, 3]
    assert "c" not in columns.ids[:3] and "a" not in columns.ids[3:]


def test_empty_stores_and_selections_give_one_count_per_query() -> None:
    store = VectorStore()
    assert store.search_columns(np.zeros((3, 4), np.float32), 5).counts.tolist() == [0, 0, 0]
    store.upsert(["a"], np.zeros((1, 4), np.float32))
    nothing = store.search_columns(np.zeros((2, 4), np.float32), 5, conditions=(Condition("x", "exists"),))
    assert nothing.counts.tolist() == [0, 0] and nothing.ids == [] and nothing.metadata == []


def reply_of(counts: list[int], ids: list[str], metadata: list[bytes | None]) -> index_pb2.SearchResponse:
    distances = np.arange(len(ids), dtype=np.float32) / 3
    return _columnar(SearchColumns(np.array(counts, np.int64), ids, distances, metadata), 1 << 20)


def test_the_servicers_columns_decode_back_exactly() -> None:
    ids = [*WEIRD_IDS, "plain", "日本"]
    metadata: list[bytes | None] = [None] * len(ids)
    metadata[1] = b'{"k":"v \\" \xc3\xa9"}'
    metadata[-1] = '{"日":"本"}'.encode()
    reply = reply_of([3, 0, len(ids) - 3], ids, metadata)
    arrays = search_arrays_of(reply)
    assert arrays.counts.tolist() == [3, 0, len(ids) - 3]
    assert arrays.ids == ids
    assert arrays.distances.tolist() == (np.arange(len(ids), dtype=np.float32) / 3).tolist()
    assert arrays.match_metadata(1) == {"k": 'v " é'} and arrays.match_metadata(len(ids) - 1) == {"日": "本"}
    assert arrays.match_metadata(0) == {}
    assert arrays.query_ids(1) == [] and arrays.query_ids(-1) == ids[3:]
    assert arrays.offsets.tolist() == [0, 3, 3, len(ids)]
    matches = convert.matches_of(reply)
    assert [len(row) for row in matches] == [3, 0, len(ids) - 3]
    assert matches[0][1] == Match("é", float(np.float32(1 / 3)), {"k": 'v " é'})
    with pytest.raises(IndexError):
        arrays.query_ids(3)
    with pytest.raises(IndexError):
        arrays.match_metadata(len(ids))


def test_ascii_ids_and_no_metadata_send_the_least() -> None:
    reply = reply_of([2, 1], ["ab", "c", "def"], [None, None, None])
    assert reply.ids == b"abcdef"
    assert np.frombuffer(reply.id_ends, "<u4").tolist() == [2, 3, 6]
    assert np.frombuffer(reply.counts, "<u4").tolist() == [2, 1]
    assert not reply.metadata and not reply.metadata_ends and not reply.results
    assert search_arrays_of(reply).matches()[1] == [Match("def", float(np.float32(2 / 3)), {})]


def test_a_backends_matches_become_the_same_columns() -> None:
    results = [
        [StoreMatch("é", 0.5, {"a": "b"}), StoreMatch("x", 1.5, {})],
        [],
        [StoreMatch("日本", 2.0, {})],
    ]
    columns = _columns_of(results)
    assert columns.counts.tolist() == [2, 0, 1]
    assert columns.ids == ["é", "x", "日本"]
    assert columns.metadata == [b'{"a":"b"}', None, None]
    assert convert.matches_of(_columnar(columns, 1 << 20)) == [
        [Match("é", 0.5, {"a": "b"}), Match("x", 1.5, {})],
        [],
        [Match("日本", 2.0, {})],
    ]


def test_a_legacy_reply_reads_as_arrays_too() -> None:
    reply = index_pb2.SearchResponse(
        results=[
            index_pb2.Neighbors(matches=[index_pb2.Match(id="é", distance=0.25, metadata={"k": "ü"})]),
            index_pb2.Neighbors(),
            index_pb2.Neighbors(matches=[index_pb2.Match(id="a", distance=1.0), index_pb2.Match(id="b")]),
        ]
    )
    arrays = search_arrays_of(reply)
    assert arrays.counts.tolist() == [1, 0, 2] and arrays.ids == ["é", "a", "b"]
    assert arrays.distances.tolist() == [0.25, 1.0, 0.0]
    assert [arrays.match_metadata(i) for i in range(3)] == [{"k": "ü"}, {}, {}]
    assert arrays.matches() == convert.matches_of(reply)


def test_split_utf8_cuts_at_byte_offsets() -> None:
    ids = ["é", "", "ab", "🙂x", "日本語"]
    data = "".join(ids).encode()
    ends = np.cumsum([len(i.encode()) for i in ids])
    assert split_utf8(data, ends) == ids
    assert split_utf8(b"", np.zeros(0, np.int64)) == []
    with pytest.raises(ValueError, match="inside a UTF-8 character"):
        split_utf8("éa".encode(), np.array([1, 3]))
    with pytest.raises(ValueError, match="do not rise"):
        split_utf8(b"abc", np.array([2, 1, 3]))
    with pytest.raises(ValueError, match="do not rise"):
        split_utf8(b"abc", np.array([1, 2]))
    with pytest.raises(ValueError):
        split_utf8(b"\xff\xfe", np.array([2]))


def malformed() -> list[index_pb2.SearchResponse]:
    good = reply_of([1, 2], ["a", "bé", "c"], [b'{"k":"v"}', None, None])

    def changed(**fields: bytes) -> index_pb2.SearchResponse:
        reply = index_pb2.SearchResponse()
        reply.CopyFrom(good)
        for name, value in fields.items():
            setattr(reply, name, value)
        return reply

    return [
        changed(counts=b"\x01\x00\x00"),  # not whole uint32s
        changed(counts=np.array([1, 3], "<u4").tobytes()),  # more matches than ids
        changed(distances=good.distances[:8]),
        changed(id_ends=np.array([1, 3, 5], "<u4").tobytes()),  # inside "é"
        changed(id_ends=np.array([1, 3, 4], "<u4").tobytes()),  # past the end
        changed(metadata_ends=np.array([9, 9], "<u4").tobytes()),
        changed(metadata_ends=b""),  # metadata and no ends
        changed(metadata=b"[1, 2]", metadata_ends=np.array([6, 6, 6], "<u4").tobytes()),
        changed(metadata=b"{nope", metadata_ends=np.array([5, 5, 5], "<u4").tobytes()),
    ]


@pytest.mark.parametrize("reply", malformed(), ids=lambda r: "")
def test_a_malformed_columnar_reply_is_refused(reply: index_pb2.SearchResponse) -> None:
    with pytest.raises(ValueError):
        convert.matches_of(reply)
    with pytest.raises(ValueError):
        arrays = search_arrays_of(reply)
        [arrays.match_metadata(i) for i in range(len(arrays.ids))]


class _Stub:
    def __init__(self, reply: index_pb2.SearchResponse) -> None:
        self.reply = reply
        self.requests: list[object] = []

    def Search(self, request: object, **_: object) -> index_pb2.SearchResponse:
        self.requests.append(request)
        return self.reply

    SearchById = Search


def test_the_client_asks_for_columns_and_names_a_malformed_reply() -> None:
    client = IndexClient("127.0.0.1:9", timeout_s=1)
    try:
        stub = _Stub(reply_of([1], ["a"], [None]))
        client.stub = stub  # type: ignore[assignment]
        assert client.search(np.zeros((1, 4), np.float32), 1) == [[Match("a", 0.0, {})]]
        assert client.search_by_id(["z"], 1) == [[Match("a", 0.0, {})]]
        assert all(r.columnar for r in stub.requests)  # type: ignore[attr-defined]
        stub.reply = malformed()[1]
        with pytest.raises(ServiceError, match="malformed search reply"):
            client.search(np.zeros((1, 4), np.float32), 1)
        with pytest.raises(ServiceError, match="malformed search reply"):
            client.search_by_id_arrays(["z"], 1)
    finally:
        client.close()


def test_fast_matches_are_plain_frozen_dataclasses() -> None:
    made = search_arrays_of(reply_of([1], ["é"], [b'{"a":"b"}'])).matches()[0][0]
    built = Match("é", 0.0, {"a": "b"})
    assert made == built and repr(made) == repr(built) and type(made) is Match
    assert dataclasses.asdict(made) == {"id": "é", "distance": 0.0, "metadata": {"a": "b"}}
    assert made.as_dict() == built.as_dict()
    assert pickle.loads(pickle.dumps(made)) == built
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.id = "other"  # type: ignore[misc]
    assert isinstance(SearchArrays(np.zeros(0, np.int64), [], np.zeros(0, np.float32)).matches(), list)


@pytest.mark.parametrize("cores", [2, 3, 5])
def test_a_blas_search_split_between_threads_is_the_one_search(
    cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((3000, 64)).astype(np.float32)
    queries = rng.standard_normal((1100, 64)).astype(np.float32)
    norms = faiss_store._squared_norms(rows)
    whole = faiss_store._knn(queries, rows, 9, norms)
    monkeypatch.setattr(faiss_store, "_CORES", cores)
    faiss.omp_set_num_threads(2)
    split = faiss_store._blas_knn(queries, rows, 9, norms, 128)  # up to `cores` parts, each on BLAS
    assert np.array_equal(split[1], whole[1])
    assert np.allclose(split[0], whole[0], rtol=1e-5, atol=1e-4)
    assert faiss.omp_get_max_threads() == 2  # this thread's setting back
    order, _ = brute_force(rows, queries[:50], 9)
    assert np.array_equal(split[1][:50], order)
