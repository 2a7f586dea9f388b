"""The index service over real gRPC: k-NN against numpy, status codes, restarts, shutdown.

The tests of the API's behaviour run on every backend (FAISS, Milvus Lite and a Milvus server,
`@every_backend`); those of the data dir, signals and ports on FAISS only
(tests/service/test_milvus_backend.py has Milvus's own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from imgsearch.client import IndexClient, ServiceError
from imgsearch.v1 import index_pb2, index_pb2_grpc, vectors_pb2
from index_service.service import IndexService
from tests.support import brute_force, every_backend, packed, random_items, start_index, upsert_one
from tools.local import ServiceProcess, free_port


@every_backend
@pytest.mark.parametrize("k", [1, 10, 64])
def test_search_returns_exactly_the_brute_force_neighbours(index_client: IndexClient, k: int) -> None:
    ids, vectors, metadata = random_items(2000, 128)
    for start in range(0, 2000, 500):
        index_client.upsert(
            ids[start : start + 500], vectors[start : start + 500], metadata[start : start + 500], "m1"
        )
    queries = np.random.default_rng(9).standard_normal((40, 128)).astype(np.float32)
    results = index_client.search(queries, k)
    rows, distances = brute_force(vectors, queries, k)
    assert [[m.id for m in row] for row in results] == [[ids[i] for i in r] for r in rows]
    np.testing.assert_allclose(
        [[m.distance for m in row] for row in results], distances, rtol=1e-5, atol=1e-4
    )
    assert results[0][0].metadata == metadata[rows[0][0]]


@every_backend
def test_upsert_replace_delete_get_stats(index_client: IndexClient) -> None:
    ids, vectors, metadata = random_items(100, 16)
    assert index_client.upsert(ids, vectors, metadata, "m1") == 100
    assert index_client.upsert(ids[:1], np.zeros((1, 16), np.float32), [{"label": "new"}], "m1") == 100
    items, missing = index_client.get([ids[0], "nope"], with_vectors=True)
    assert [(i.id, i.metadata) for i in items] == [(ids[0], {"label": "new"})] and missing == ["nope"]
    assert items[0].vector is not None and not items[0].vector.any()
    assert index_client.delete([ids[1], "nope"]) == (1, 1)
    stats = index_client.stats()
    assert (stats.count, stats.dim, stats.model_version) == (99, 16, "m1")
    assert stats.bytes_used >= 99 * 16 * 4
    by_id = index_client.search_by_id([ids[2]], 3)[0]
    assert len(by_id) == 3 and ids[2] not in [m.id for m in by_id]


def raw_call(port: int, method: str, request: object) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request, timeout=10)
    return caught.value


@every_backend
@pytest.mark.parametrize(
    "method,request_message,code,words",
    [
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=["a"], vectors=packed(np.zeros((1, 8)))),
            "INVALID_ARGUMENT",
            "dim 8",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=["a"], vectors=vectors_pb2.Vectors(dim=4, data=b"123")),
            "INVALID_ARGUMENT",
            "not a multiple",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=["a", "b"], vectors=packed(np.zeros((1, 4)))),
            "INVALID_ARGUMENT",
            "expected 2 vectors",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(
                ids=["a"], vectors=packed(np.array([[0, np.nan, 0, 0]])), model_version="m1"
            ),
            "INVALID_ARGUMENT",
            "NaN",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=[""], vectors=packed(np.zeros((1, 4))), model_version="m1"),
            "INVALID_ARGUMENT",
            "1 to 256 bytes",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=["a"], vectors=packed(np.zeros((1, 4))), model_version="other"),
            "FAILED_PRECONDITION",
            "model version",
        ),
        (
            "Search",
            index_pb2.SearchRequest(queries=packed(np.zeros((1, 4))), k=0),
            "INVALID_ARGUMENT",
            "k must be",
        ),
        (
            "Search",
            index_pb2.SearchRequest(queries=packed(np.zeros((1, 3))), k=2),
            "INVALID_ARGUMENT",
            "dim 3",
        ),
        ("SearchById", index_pb2.SearchByIdRequest(ids=["missing"], k=2), "NOT_FOUND", "'missing'"),
        ("Upsert", upsert_one(np.array([[0, 0, np.inf, 0]])), "INVALID_ARGUMENT", "infinite"),
        ("Upsert", upsert_one(np.zeros((1, 4)), ids=["é" * 129]), "INVALID_ARGUMENT", "258 bytes"),
        ("Upsert", upsert_one(np.zeros((2, 4)), ids=["a", "a"]), "INVALID_ARGUMENT", "appears twice"),
        (
            "Upsert",
            upsert_one(np.zeros((1, 4)), metadata={"k": "v" * 5000}),
            "INVALID_ARGUMENT",
            "over 4096 bytes",
        ),
        (
            "Upsert",
            upsert_one(np.zeros((1, 4)), metadata={f"k{n}": "" for n in range(65)}),
            "INVALID_ARGUMENT",
            "at most 64",
        ),
        ("Upsert", index_pb2.UpsertRequest(model_version="m1"), "INVALID_ARGUMENT", "the batch is empty"),
        ("Delete", index_pb2.DeleteRequest(), "INVALID_ARGUMENT", "the batch is empty"),
        ("Get", index_pb2.GetRequest(), "INVALID_ARGUMENT", "the batch is empty"),
        (
            "Search",
            index_pb2.SearchRequest(queries=vectors_pb2.Vectors(dim=4), k=3),
            "INVALID_ARGUMENT",
            "the batch is empty",
        ),
        ("SearchById", index_pb2.SearchByIdRequest(k=3), "INVALID_ARGUMENT", "the batch is empty"),
        (
            "Search",
            index_pb2.SearchRequest(queries=packed(np.zeros((1, 4))), k=1001),
            "INVALID_ARGUMENT",
            "k must be",
        ),
        (
            "Upsert",
            index_pb2.UpsertRequest(ids=[f"x{n}" for n in range(11)], vectors=packed(np.zeros((11, 4)))),
            "INVALID_ARGUMENT",
            "limit is 10",
        ),
    ],
)
def test_bad_requests_get_a_status_and_change_nothing(
    tmp_path: Path, backend_args: list[str], method: str, request_message: object, code: str, words: str
) -> None:
    service = start_index(tmp_path, "--max-batch", "10", *backend_args)
    try:
        client = IndexClient(f"127.0.0.1:{service.server.port}")
        client.upsert(["keep"], np.ones((1, 4), np.float32), [{"a": "b"}], "m1")
        error = raw_call(service.server.port, method, request_message)
        assert error.code().name == code and words in (error.details() or "")
        assert client.stats().count == 1
        assert client.get(["keep"])[0][0].metadata == {"a": "b"}
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING
        client.close()
    finally:
        service.stop(0)


@every_backend
def test_an_id_that_is_not_utf8_is_invalid_argument(index_service: IndexService) -> None:
    good = index_pb2.DeleteRequest(ids=["abc"]).SerializeToString()
    bad = good.replace(b"abc", b"a\xffc")
    with grpc.insecure_channel(f"127.0.0.1:{index_service.server.port}") as channel:
        delete = channel.unary_unary(
            "/imgsearch.v1.Index/Delete", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            delete(bad, timeout=10)
        assert delete(good, timeout=10) is not None  # the service is fine afterwards
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be parsed" in (caught.value.details() or "") and "UTF-8" in (caught.value.details() or "")


@every_backend
def test_search_on_an_empty_index_finds_nothing(index_client: IndexClient) -> None:
    assert index_client.search(np.zeros((2, 4), np.float32), 5) == [[], []]
    assert index_client.stats().count == 0


@every_backend
def test_restart_keeps_everything(tmp_path: Path, backend_args: list[str]) -> None:
    ids, vectors, metadata = random_items(300, 32)
    first = start_index(tmp_path, *backend_args)
    client = IndexClient(f"127.0.0.1:{first.server.port}")
    client.upsert(ids, vectors, metadata, "m1")
    client.delete(ids[:10])
    before = client.search(vectors[:5], 10)
    client.close()
    first.stop(0)
    second: IndexService = start_index(tmp_path, *backend_args)
    try:
        client = IndexClient(f"127.0.0.1:{second.server.port}")
        assert client.stats().count == 290 and client.stats().model_version == "m1"
        assert client.search(vectors[:5], 10) == before
        items, _ = client.get(ids[10:12], with_vectors=True)
        assert items[0].vector is not None
        np.testing.assert_array_equal(items[0].vector, vectors[10])
        client.close()
    finally:
        second.stop(0)


def test_reflection_lists_the_services(index_service: IndexService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{index_service.server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"imgsearch.v1.Index", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_snapshots_and_exits_zero(tmp_path: Path) -> None:
    service = ServiceProcess(
        "index_service", free_port(), ["--data-dir", str(tmp_path)], tmp_path / "log.txt"
    ).start()
    try:
        service.wait_healthy()
        client = IndexClient(service.address)
        ids, vectors, metadata = random_items(50, 8)
        client.upsert(ids, vectors, metadata, "m1")
        client.close()
        assert service.stop() == 0
        assert list(tmp_path.glob("snapshot-*.bin"))
        log = (tmp_path / "log.txt").read_text()
        assert "received SIGTERM" in log and "snapshot of 50 vectors" in log
    finally:
        service.kill()


def test_a_service_that_is_down_gives_one_clear_error() -> None:
    client = IndexClient(f"127.0.0.1:{free_port()}", timeout_s=3)
    with pytest.raises(ServiceError, match=r"the index service at 127\.0\.0\.1:\d+ is not reachable"):
        client.stats()
    client.close()


def test_a_port_in_use_fails_fast_with_one_clear_line(index_service: IndexService, tmp_path: Path) -> None:
    port = str(index_service.server.port)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_service",
            "--port",
            port,
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
