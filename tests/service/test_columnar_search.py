"""The columnar SearchResponse through real gRPC servers: it gives exactly what the Match messages give (ids,
float32 distances, metadata) for plain, filtered, max_distance and by-id searches, empty collections and
queries with fewer than k matches, ids of any UTF-8; an old client's request still gets Match messages, a new
client reads an old server's Match messages, and a columnar reply too large for a message is refused."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch import convert, wire
from imgsearch.client import IndexClient, Match, ServiceError
from imgsearch.filters import Condition, filter_message
from imgsearch.v1 import index_pb2, index_pb2_grpc
from index_service.service import IndexService
from tests.support import address, every_backend, start_index

DIM = 8
COUNT = 400
# Ids of one to four bytes a character, and the longest allowed (256 bytes).
IDS = [
    *(f"plain-{n}" for n in range(COUNT - 6)),
    "é",
    "naïve/café-ß",
    "日本語の画像",
    "emoji-🙂🚀",
    "x" * 256,
    "é" * 128,
]


def metadata_of(n: int) -> dict[str, str]:
    """Every third item has none; the others a label, some of them non-ASCII text and JSON-ish values."""
    if n % 3 == 0:
        return {}
    entries = {"label": str(n % 5), "group": "a" if n % 2 else "b"}
    if n % 7 == 0:
        entries["note"] = 'quotes " and \\ and \n newline, ünïcödé 🙂'
    return entries


@pytest.fixture
def filled(index_client: IndexClient) -> Iterator[tuple[IndexClient, np.ndarray]]:
    vectors = np.random.default_rng(11).standard_normal((COUNT, DIM)).astype(np.float32)
    index_client.upsert(IDS, vectors, [metadata_of(n) for n in range(COUNT)], "m")
    yield index_client, vectors


def legacy_matches(reply: index_pb2.SearchResponse) -> list[list[Match]]:
    """What a client before the columnar form made of a reply."""
    return [[Match(m.id, float(m.distance), dict(m.metadata)) for m in row.matches] for row in reply.results]


def both_forms(
    stub: index_pb2_grpc.IndexStub, request: index_pb2.SearchRequest | index_pb2.SearchByIdRequest
) -> tuple[index_pb2.SearchResponse, index_pb2.SearchResponse]:
    """The reply to the request as an old client sends it, and with `columnar` set."""
    old, new = (
        type(request).FromString(request.SerializeToString()),
        type(request).FromString(request.SerializeToString()),
    )
    old.columnar, new.columnar = False, True
    call = stub.Search if isinstance(request, index_pb2.SearchRequest) else stub.SearchById
    return call(old, timeout=30), call(new, timeout=30)


def assert_same(legacy: list[list[Match]], columnar: list[list[Match]]) -> None:
    assert [[m.id for m in row] for row in columnar] == [[m.id for m in row] for row in legacy]
    assert [[m.metadata for m in row] for row in columnar] == [[m.metadata for m in row] for row in legacy]
    for new_row, old_row in zip(columnar, legacy, strict=True):
        # both are float32 on the wire: equal, not merely close
        assert np.array_equal(
            np.array([m.distance for m in new_row], np.float32),
            np.array([m.distance for m in old_row], np.float32),
        )
        assert all(type(m.distance) is float for m in new_row)


def requests(vectors: np.ndarray) -> list[index_pb2.SearchRequest | index_pb2.SearchByIdRequest]:
    queries = np.random.default_rng(12).standard_normal((7, DIM)).astype(np.float32)
    near = vectors[[0, 5, COUNT - 1, COUNT - 3]] + 0.01  # near the multi-byte ids too
    both = np.concatenate([queries, near])
    few = [Condition("label", "equals", ("1",))]  # 1 in 7.5: the store copies the rows it selects
    many = [Condition("group", "not_equals", ("a",))]  # most rows: the store searches through a bitmap
    nobody = [Condition("label", "equals", ("none",))]
    return [
        index_pb2.SearchRequest(queries=wire.pack(both), k=5),
        index_pb2.SearchRequest(queries=wire.pack(both), k=COUNT + 50),  # fewer than k in the collection
        index_pb2.SearchRequest(queries=wire.pack(both), k=10, filter=filter_message(few)),
        index_pb2.SearchRequest(queries=wire.pack(both), k=10, filter=filter_message(many)),
        index_pb2.SearchRequest(queries=wire.pack(both), k=10, filter=filter_message(nobody)),
        index_pb2.SearchRequest(queries=wire.pack(both), k=50, max_distance=2.5),  # some get none
        index_pb2.SearchByIdRequest(ids=[IDS[0], IDS[-1], IDS[-3], IDS[7]], k=6),
        index_pb2.SearchByIdRequest(ids=IDS[-6:], k=6, filter=filter_message(few), max_distance=3.0),
        index_pb2.SearchByIdRequest(ids=[IDS[1], IDS[1]], k=COUNT + 10),  # every other item, twice
    ]


@every_backend
def test_columnar_and_match_replies_give_the_same_matches(
    filled: tuple[IndexClient, np.ndarray], index_service: IndexService
) -> None:
    client, vectors = filled
    with grpc.insecure_channel(address(index_service)) as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        for number, request in enumerate(requests(vectors)):
            old, new = both_forms(stub, request)
            assert old.results and not old.counts, number
            assert new.counts and not new.results, number
            legacy = legacy_matches(old)
            assert_same(legacy, convert.matches_of(new))
            arrays = convert.search_arrays_of(new)
            assert len(arrays) == len(legacy)
            assert arrays.counts.tolist() == [len(row) for row in legacy]
            assert arrays.ids == [m.id for row in legacy for m in row]
            assert arrays.distances.dtype == np.float32
            assert arrays.distances.tolist() == [m.distance for row in legacy for m in row]
            assert [arrays.match_metadata(i) for i in range(len(arrays.ids))] == [
                m.metadata for row in legacy for m in row
            ]
            for query, row in enumerate(legacy):
                assert arrays.query_ids(query) == [m.id for m in row]
                assert arrays.query_distances(query).tolist() == [m.distance for m in row]
                assert arrays.query_matches(query) == row
            assert arrays.matches() == legacy
            # and the client's own calls, which ask for the columnar form
            if isinstance(request, index_pb2.SearchRequest):
                queries = wire.unpack(request.queries)
                max_distance = request.max_distance if request.HasField("max_distance") else None
                conditions = [Condition(c.key, _op(c.op), tuple(c.values)) for c in request.filter.conditions]
                assert (
                    client.search(queries, request.k, filter=conditions, max_distance=max_distance) == legacy
                )
                got = client.search_arrays(queries, request.k, filter=conditions, max_distance=max_distance)
            else:
                max_distance = request.max_distance if request.HasField("max_distance") else None
                conditions = [Condition(c.key, _op(c.op), tuple(c.values)) for c in request.filter.conditions]
                ids = list(request.ids)
                assert (
                    client.search_by_id(ids, request.k, filter=conditions, max_distance=max_distance)
                    == legacy
                )
                got = client.search_by_id_arrays(ids, request.k, filter=conditions, max_distance=max_distance)
            assert got.matches() == legacy


def _op(op: int) -> str:
    return index_pb2.Condition.Operator.Name(op).lower()  # type: ignore[arg-type]


def test_the_matches_are_the_nearest_with_their_metadata(filled: tuple[IndexClient, np.ndarray]) -> None:
    client, vectors = filled
    queries = vectors[[COUNT - 2, COUNT - 4]]  # "x" * 256 and "日本語の画像" themselves
    arrays = client.search_arrays(queries, 3)
    assert [arrays.query_ids(q)[0] for q in range(2)] == [IDS[COUNT - 2], IDS[COUNT - 4]]
    assert arrays.query_distances(0)[0] == pytest.approx(0.0, abs=1e-3)
    order = np.argsort(((vectors[None, COUNT - 2] - vectors) ** 2).sum(-1), kind="stable")[:3]
    assert arrays.query_ids(0) == [IDS[i] for i in order]
    assert [m.metadata for m in arrays.query_matches(0)] == [metadata_of(int(i)) for i in order]
    by_id = client.search_by_id_arrays([IDS[COUNT - 2]], 2)
    assert by_id.query_ids(0) == [IDS[i] for i in order[1:3]]  # the item itself left out


@every_backend
def test_an_empty_collection_answers_each_query_with_nothing(
    index_client: IndexClient, index_service: IndexService
) -> None:
    queries = np.zeros((3, DIM), np.float32)
    assert index_client.search(queries, 5) == [[], [], []]
    arrays = index_client.search_arrays(queries, 5)
    assert arrays.counts.tolist() == [0, 0, 0] and arrays.ids == [] and len(arrays.distances) == 0
    assert arrays.matches() == [[], [], []]
    with grpc.insecure_channel(address(index_service)) as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        old, new = both_forms(stub, index_pb2.SearchRequest(queries=wire.pack(queries), k=5))
    assert len(old.results) == 3 and not any(row.matches for row in old.results) and not old.counts
    assert new.counts == bytes(12) and not new.ids and not new.id_ends and not new.metadata_ends


def test_a_reply_with_no_metadata_sends_none(index_client: IndexClient, index_service: IndexService) -> None:
    vectors = np.random.default_rng(3).standard_normal((50, DIM)).astype(np.float32)
    index_client.upsert([f"n{n}" for n in range(50)], vectors)
    with grpc.insecure_channel(address(index_service)) as channel:
        reply = index_pb2_grpc.IndexStub(channel).Search(
            index_pb2.SearchRequest(queries=wire.pack(vectors[:4]), k=5, columnar=True), timeout=30
        )
    assert not reply.metadata and not reply.metadata_ends
    assert np.frombuffer(reply.counts, "<u4").tolist() == [5, 5, 5, 5]
    assert np.frombuffer(reply.id_ends, "<u4")[-1] == len(reply.ids)
    assert all(m.metadata == {} for row in index_client.search(vectors[:4], 5) for m in row)


class _OldServer(index_pb2_grpc.IndexServicer):
    """An index server from before the columnar form: it knows no `columnar` field, so it sends Match
    messages whatever the request asks (here: the real service, asked without it)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = index_pb2_grpc.IndexStub(self.channel)

    def Search(
        self, request: index_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchResponse:
        request.ClearField("columnar")
        return self.stub.Search(request, timeout=30)

    def SearchById(
        self, request: index_pb2.SearchByIdRequest, context: grpc.ServicerContext
    ) -> index_pb2.SearchResponse:
        request.ClearField("columnar")
        return self.stub.SearchById(request, timeout=30)


@pytest.fixture
def old_server(index_service: IndexService) -> Iterator[str]:
    servicer = _OldServer(address(index_service))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    index_pb2_grpc.add_IndexServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)
        servicer.channel.close()


def test_a_new_client_reads_an_old_servers_match_messages(
    filled: tuple[IndexClient, np.ndarray], old_server: str
) -> None:
    client, vectors = filled
    queries = np.concatenate([vectors[[0, COUNT - 1, COUNT - 3]] + 0.01, np.ones((2, DIM), np.float32)])
    with closing(IndexClient(old_server, timeout_s=30)) as old:
        assert old.search(queries, 7) == client.search(queries, 7)
        assert old.search(queries, 7, max_distance=1.0) == client.search(queries, 7, max_distance=1.0)
        assert old.search_by_id(IDS[-4:], 4) == client.search_by_id(IDS[-4:], 4)
        arrays = old.search_arrays(queries, 7)
        assert arrays.matches() == client.search(queries, 7)
        assert arrays.ids == client.search_arrays(queries, 7).ids
        assert [arrays.match_metadata(i) for i in range(len(arrays.ids))] == [
            m.metadata for row in client.search(queries, 7) for m in row
        ]
        assert old.search_by_id_arrays(IDS[-4:], 4).matches() == client.search_by_id(IDS[-4:], 4)


def test_a_columnar_reply_over_the_message_limit_is_refused(tmp_path: Path) -> None:
    service = start_index(tmp_path / "index", "--max-message-bytes", str(1024 * 1024))
    client = IndexClient(address(service), timeout_s=30)
    try:
        rng = np.random.default_rng(3)
        client.upsert(
            [f"small-{n}" for n in range(4000)], rng.standard_normal((4000, DIM)).astype(np.float32) + 100
        )
        near = rng.standard_normal((20, DIM)).astype(np.float32)
        for start in (0, 10):  # 40 KB of metadata each: the average item is small, the nearest are not
            heavy = [{f"k{key}": "y" * 4000 for key in range(10)} for _ in range(10)]
            client.upsert([f"heavy-{n}" for n in range(start, start + 10)], near[start : start + 10], heavy)
        with pytest.raises(ServiceError) as refused:
            client.search(near, 20)  # 400 matches of 40 KB: 16 MB
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-bytes" in refused.value.details
        with pytest.raises(ServiceError) as estimated:  # refused before the work, by the average item
            client.search(np.zeros((100, DIM), np.float32), 1000)
        assert estimated.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-message-bytes" in estimated.value.details
        assert client.search(near[:1], 2)[0][0].id.startswith("heavy-")  # and it still serves
    finally:
        client.close()
        service.stop(0)
