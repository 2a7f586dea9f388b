"""Index.Scan over real gRPC: every item exactly once, page by page, as the index was when it began.

The scan's behaviour is tested on every backend (`@every_backend`: FAISS, Milvus Lite and a Milvus
server); the client's timeouts and the token on FAISS only, as they do not depend on the store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch.client import IndexClient, ScanPage, ServiceError
from imgsearch.v1 import index_pb2, index_pb2_grpc
from index_service.service import IndexService
from tests.support import every_backend, random_items, start_index


def scanned(pages: list[ScanPage]) -> tuple[list[str], list[dict[str, str]]]:
    return [i for p in pages for i in p.ids], [m for p in pages for m in p.metadata]


@every_backend
def test_an_empty_index_sends_no_pages(index_client: IndexClient) -> None:
    assert list(index_client.scan()) == []
    assert list(index_client.scan(page_size=5, with_vectors=True)) == []


@every_backend
@pytest.mark.parametrize("with_vectors", [False, True])
def test_every_item_once_across_pages(index_client: IndexClient, with_vectors: bool) -> None:
    ids, vectors, metadata = random_items(2500, 16)
    index_client.upsert(ids, vectors, metadata, "m1")
    index_client.delete(ids[:7] + ids[1200:1203])  # deletes move rows around; the scan sees the live set
    live = {i: n for n, i in enumerate(ids) if n >= 7 and not 1200 <= n < 1203}

    pages = list(index_client.scan(page_size=1000, with_vectors=with_vectors))
    assert [len(p.ids) for p in pages] == [1000, 1000, 490]
    assert all(p.total == 2490 and p.model_version == "m1" for p in pages)
    got_ids, got_metadata = scanned(pages)
    assert len(got_ids) == len(set(got_ids)) and set(got_ids) == set(live)
    assert got_metadata == [metadata[live[i]] for i in got_ids]
    if with_vectors:
        for page in pages:
            assert page.vectors is not None and page.vectors.shape == (len(page.ids), 16)
            np.testing.assert_array_equal(page.vectors, vectors[[live[i] for i in page.ids]])
    else:
        assert all(p.vectors is None for p in pages)

    one_page = list(index_client.scan(page_size=5000))  # the default max batch is 10000
    assert len(one_page) == 1 and scanned(one_page)[0] == got_ids


@every_backend
def test_page_size_defaults_and_limits(tmp_path: Path, backend_args: list[str]) -> None:
    service = start_index(tmp_path, "--max-batch", "10", *backend_args)
    client = IndexClient(f"127.0.0.1:{service.server.port}")
    try:
        ids, vectors, metadata = random_items(25, 4)
        for start in range(0, 25, 10):
            client.upsert(ids[start : start + 10], vectors[start : start + 10], metadata[start : start + 10])
        assert [len(p.ids) for p in client.scan()] == [10, 10, 5]  # 0: min(1000, --max-batch)
        assert [len(p.ids) for p in client.scan(page_size=1)] == [1] * 25
        assert [len(p.ids) for p in client.scan(page_size=10)] == [10, 10, 5]

        with pytest.raises(ServiceError) as caught:
            list(client.scan(page_size=11))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_size 11 is over the limit of 10 items per page (--max-batch)" in str(caught.value)
        with pytest.raises(ValueError, match="page_size must be 0"):
            client.scan(page_size=-1)

        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            raw = channel.unary_stream(
                "/imgsearch.v1.Index/Scan", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as unparsable:
                list(raw(b"\xff\xff\xff", timeout=10))
            assert unparsable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot be parsed" in (unparsable.value.details() or "")
            stub = index_pb2_grpc.IndexStub(channel)
            with pytest.raises(grpc.RpcError) as too_big:
                list(stub.Scan(index_pb2.ScanRequest(page_size=2**32 - 1), timeout=10))
            assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert client.stats().count == 25  # and the service is fine
    finally:
        client.close()
        service.stop(0)


@every_backend
def test_writes_during_a_scan_do_not_change_it(
    index_client: IndexClient, index_service: IndexService
) -> None:
    ids, vectors, metadata = random_items(1000, 8)
    index_client.upsert(ids, vectors, metadata, "m1")
    writer = IndexClient(f"127.0.0.1:{index_service.server.port}")
    try:
        scan = index_client.scan(page_size=100, with_vectors=True)
        pages = [next(scan)]  # the server has copied the index by now
        writer.delete(ids[:500])
        writer.upsert(ids[500:510], np.zeros((10, 8), np.float32), [{"label": "new"}] * 10, "m1")
        writer.upsert([f"new/{n}" for n in range(300)], np.ones((300, 8), np.float32), (), "m1")
        pages += list(scan)
    finally:
        writer.close()
    got_ids, got_metadata = scanned(pages)
    assert len(pages) == 10 and sorted(got_ids) == sorted(ids) and len(set(got_ids)) == 1000
    row = {i: n for n, i in enumerate(ids)}
    assert got_metadata == [metadata[row[i]] for i in got_ids]
    np.testing.assert_array_equal(  # each item's vector as it was (the order is the backend's own)
        np.concatenate([p.vectors for p in pages if p.vectors is not None]),
        vectors[[row[i] for i in got_ids]],
    )
    assert all(p.total == 1000 for p in pages)

    after, _ = scanned(list(index_client.scan()))  # a new scan sees the writes
    assert len(after) == 800 and set(after) == set(ids[500:]) | {f"new/{n}" for n in range(300)}


@every_backend
def test_leaving_a_scan_early_cancels_it(index_client: IndexClient) -> None:
    ids, vectors, metadata = random_items(50, 4)
    index_client.upsert(ids, vectors, metadata)
    for page in index_client.scan(page_size=10):
        assert len(page.ids) == 10
        break
    assert index_client.stats().count == 50  # nothing left behind that blocks the next calls
    assert len(scanned(list(index_client.scan(page_size=10)))[0]) == 50


def test_the_call_timeout_applies_per_page_not_to_the_stream(index_service: IndexService) -> None:
    client = IndexClient(f"127.0.0.1:{index_service.server.port}", timeout_s=1.0)
    try:
        ids, vectors, metadata = random_items(40, 4)
        client.upsert(ids, vectors, metadata)
        started = time.monotonic()
        seen = []
        for page in client.scan(page_size=10):
            seen += page.ids
            time.sleep(0.5)  # the caller's own time: 2 s in all, twice the timeout
        assert time.monotonic() - started > 1.5 and sorted(seen) == sorted(ids)
    finally:
        client.close()


@every_backend
def test_pages_are_cut_to_fit_in_a_message(tmp_path: Path, backend_args: list[str]) -> None:
    service = start_index(tmp_path, "--max-message-bytes", str(64 * 1024), *backend_args)
    client = IndexClient(f"127.0.0.1:{service.server.port}")
    try:
        big = {f"k{n}": "x" * 3000 for n in range(5)}  # about 15 KB per item, 2 per 32 KB page
        for n in range(9):
            client.upsert([f"big/{n}"], np.full((1, 4), n, np.float32), [big])
        pages = list(client.scan(page_size=100, with_vectors=True))
        assert [len(p.ids) for p in pages] == [2, 2, 2, 2, 1]
        got_ids, got_metadata = scanned(pages)
        assert sorted(got_ids) == [f"big/{n}" for n in range(9)] and all(m == big for m in got_metadata)
        for page in pages:
            assert page.vectors is not None
            assert [int(v[0]) for v in page.vectors] == [int(i.split("/")[1]) for i in page.ids]
    finally:
        client.close()
        service.stop(0)


def test_a_stalled_stream_fails_after_the_timeout() -> None:
    """A real server whose Scan sends one page, then nothing: the client gives up timeout_s later."""
    release = threading.Event()

    def stalled(request: index_pb2.ScanRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield index_pb2.ScanResponse(items=[index_pb2.Item(id="a")], total=2).SerializeToString()
        release.wait(30)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_stream_rpc_method_handler(stalled)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("imgsearch.v1.Index", {"Scan": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = IndexClient(f"127.0.0.1:{port}", timeout_s=0.5)
    try:
        started = time.monotonic()
        pages = []
        with pytest.raises(ServiceError, match="did not answer in time") as caught:
            for page in client.scan():
                pages.append(page)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [p.ids for p in pages] == [["a"]] and time.monotonic() - started < 5
    finally:
        release.set()
        client.close()
        server.stop(0).wait()


def test_a_scan_needs_the_token_where_one_is_required(tmp_path: Path) -> None:
    service = start_index(tmp_path, "--auth-token", "s3cret")
    address = f"127.0.0.1:{service.server.port}"
    with_token, without = IndexClient(address, token="s3cret"), IndexClient(address)
    try:
        ids, vectors, metadata = random_items(30, 4)
        with_token.upsert(ids, vectors, metadata)
        assert sorted(scanned(list(with_token.scan(page_size=7)))[0]) == sorted(ids)
        with pytest.raises(ServiceError) as caught:
            list(without.scan())
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        with_token.close()
        without.close()
        service.stop(0)
