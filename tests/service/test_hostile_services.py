"""Hostile callers against real gRPC servers: open streams, oversized searches, calls that fail late,
health under load, the read-only token. Each case checks what the caller got, that the service stayed
healthy, and that nothing it holds changed."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.service import EncoderService
from imgsearch import security, wire
from imgsearch.client import IndexClient, ServiceError
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc, index_pb2, index_pb2_grpc
from index_service.service import IndexService
from tests.support import (
    BIG,
    ROOT,
    encode,
    every_backend,
    glyph,
    requests,
    scrape,
    serve,
    start_encoder,
    start_index,
)
from tools.local import free_port, wait_healthy

TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-9876543210"
INDEX = "imgsearch.v1.Index"
ENCODER = "imgsearch.v1.Encoder"
DIM = 32


def write_metadata(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return security.call_metadata(token)


def healthy(port: int, timeout_s: float = 1.0) -> bool:
    """A plain health Check (no token) answers SERVING within the timeout."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def fill(client: IndexClient, count: int, *, dim: int = DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    for start in range(0, count, 5000):
        stop = min(start + 5000, count)
        client.upsert([f"item-{n}" for n in range(start, stop)], vectors[start:stop], model_version="m")
    return vectors


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index", "--auth-token", TOKEN, "--metrics-port", "0"))


@pytest.fixture
def index_client(index: IndexService) -> Iterator[IndexClient]:
    client = IndexClient(f"127.0.0.1:{index.server.port}", timeout_s=30, token=TOKEN)
    yield client
    client.close()


# ---- open streams ---------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [8, 16, 64])
def test_watch_streams_without_a_token_do_not_stall_token_calls(
    index: IndexService, index_client: IndexClient, streams: int
) -> None:
    fill(index_client, 100)
    port = index.server.port
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watches: list[Any] = []
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(streams):
            watches.append(stub.Watch(health_pb2.HealthCheckRequest(), timeout=60))
        # Each stream is open (its first status read) or was refused for load: nothing in between.
        opened = refused = 0
        for watch in watches:
            try:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                opened += 1
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "--max-streams" in (error.details() or "")
                refused += 1
        assert opened >= 1 and opened + refused == streams
        # Calls with the token go through at once while the streams stay open.
        query = np.zeros((1, DIM), np.float32)
        for _ in range(20):
            started = time.perf_counter()
            assert len(IndexClient(f"127.0.0.1:{port}", timeout_s=2, token=TOKEN).search(query, 3)[0]) == 3
            assert time.perf_counter() - started < 2
        assert healthy(port)
        assert index_client.stats().count == 100
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()


def test_a_scan_nobody_reads_takes_no_worker(index: IndexService, index_client: IndexClient) -> None:
    fill(index_client, 3000)
    channel = grpc.insecure_channel(f"127.0.0.1:{index.server.port}")
    try:
        stub = index_pb2_grpc.IndexStub(channel)
        scans = [
            stub.Scan(
                index_pb2.ScanRequest(page_size=1, with_vectors=True), metadata=write_metadata(), timeout=60
            )
            for _ in range(12)
        ]
        for scan in scans:
            next(scan)  # open, then never read again
        started = time.perf_counter()
        assert index_client.stats().count == 3000
        assert time.perf_counter() - started < 2
        for scan in scans:
            scan.cancel()
    finally:
        channel.close()


def test_a_flood_of_calls_without_a_token_leaves_probes_and_token_calls_alone(
    index: IndexService, index_client: IndexClient
) -> None:
    vectors = fill(index_client, 100)
    with grpc.insecure_channel(f"127.0.0.1:{index.server.port}") as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        request = index_pb2.SearchRequest(queries=wire.pack(vectors[:1]), k=3)
        flood = [stub.Search.future(request, timeout=60) for _ in range(2000)]
        slowest = 0.0
        for _ in range(5):
            started = time.perf_counter()
            assert healthy(index.server.port)
            assert len(index_client.search(vectors[:1], k=3)[0]) == 3
            slowest = max(slowest, time.perf_counter() - started)
        codes = [call.exception().code() for call in flood]  # type: ignore[union-attr]
    # Refused before its request is read: now and then the client sees its stream cut (CANCELLED) first.
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED}
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) > len(codes) // 2
    assert slowest < 1.0
    assert index_client.stats().count == 100


# ---- bounded work per call -------------------------------------------------------------------


def call_details(call: Any) -> tuple[grpc.StatusCode, str, float]:
    started = time.perf_counter()
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or "", time.perf_counter() - started
    return grpc.StatusCode.OK, "", time.perf_counter() - started


def test_an_oversized_search_is_refused_before_any_work(
    index: IndexService, index_client: IndexClient
) -> None:
    fill(index_client, 5000)
    rss_before = rss_kib(os.getpid())
    with grpc.insecure_channel(f"127.0.0.1:{index.server.port}") as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        queries = np.random.default_rng(1).standard_normal((10_000, DIM)).astype(np.float32)
        by_vectors = index_pb2.SearchRequest(queries=wire.pack(queries), k=1000)
        by_id = index_pb2.SearchByIdRequest(ids=[f"item-{n % 5000}" for n in range(10_000)], k=1000)
        for call in (
            lambda: stub.Search(by_vectors, metadata=write_metadata(), timeout=20),
            lambda: stub.SearchById(by_id, metadata=write_metadata(), timeout=20),
        ):
            code, details, seconds = call_details(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert "10000000 results" in details and "--max-results" in details
            assert seconds < 1
    assert rss_kib(os.getpid()) - rss_before < 200 * 1024  # the server runs in this process
    assert healthy(index.server.port)
    assert index_client.stats().count == 5000
    samples = scrape(index.server.metrics_port)
    assert requests(samples, INDEX, "Search", "INVALID_ARGUMENT") == 1
    assert requests(samples, INDEX, "SearchById", "INVALID_ARGUMENT") == 1


def test_a_reply_that_cannot_fit_a_message_is_refused_before_the_work(tmp_path: Path) -> None:
    service = start_index(tmp_path / "index", "--max-message-bytes", str(1024 * 1024), "--metrics-port", "0")
    client = IndexClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    try:
        vectors = np.random.default_rng(2).standard_normal((200, DIM)).astype(np.float32)
        metadata = [{"note": "x" * 4000} for _ in range(200)]
        client.upsert([f"big-{n}" for n in range(200)], vectors, metadata, model_version="m")
        with pytest.raises(ServiceError) as caught:
            client.search(vectors[:10], k=100)  # 1,000 matches of 4 KB: about 4 MB
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-message-bytes" in str(caught.value) and "--max-results" not in str(caught.value)
        assert len(client.search(vectors[:1], k=100)[0]) == 100  # 400 KB: fits
        assert healthy(service.server.port)
        assert client.stats().count == 200
    finally:
        client.close()
        service.stop(0)


def test_a_reply_too_large_after_the_work_is_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The estimate goes by the average item; when the nearest items are the large ones the reply is
    still refused with a clear message, and counted and logged with that code, not as OK."""
    caplog.set_level(logging.WARNING, logger="imgsearch.requests")
    service = start_index(tmp_path / "index", "--max-message-bytes", str(1024 * 1024), "--metrics-port", "0")
    client = IndexClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    try:
        rng = np.random.default_rng(3)
        far = rng.standard_normal((4000, DIM)).astype(np.float32) + 100.0
        client.upsert([f"small-{n}" for n in range(4000)], far, model_version="m")
        near = rng.standard_normal((20, DIM)).astype(np.float32)
        heavy = [{f"k{key}": "y" * 4000 for key in range(10)} for _ in range(20)]  # 40 KB each
        for start in (0, 10):
            ids = [f"heavy-{n}" for n in range(start, start + 10)]
            client.upsert(ids, near[start : start + 10], heavy[start : start + 10], model_version="m")
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            request = index_pb2.SearchRequest(queries=wire.pack(near), k=20)  # 400 matches of 40 KB: 16 MB
            code, details, _ = call_details(
                lambda: index_pb2_grpc.IndexStub(channel).Search(
                    request, metadata=((wire.REQUEST_ID_KEY, "too-big-1"),), timeout=30
                )
            )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-bytes" in details
        samples = scrape(service.server.metrics_port)
        assert requests(samples, INDEX, "Search", "RESOURCE_EXHAUSTED") == 1
        assert not requests(samples, INDEX, "Search", "OK")
        lines = [r for r in caplog.records if "too-big-1" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert "RESOURCE_EXHAUSTED" in lines[0].getMessage()
        assert healthy(service.server.port)
        assert client.stats().count == 4020
    finally:
        client.close()
        service.stop(0)


def test_a_search_past_its_deadline_stops_and_is_counted_as_such(
    index: IndexService, index_client: IndexClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imgsearch.requests")
    fill(index_client, 50_000)
    queries = np.random.default_rng(4).standard_normal((10_000, DIM)).astype(np.float32)
    started = time.perf_counter()
    index_client.search(queries[:1000], k=10)
    per_thousand = time.perf_counter() - started
    with grpc.insecure_channel(f"127.0.0.1:{index.server.port}") as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        request = index_pb2.SearchRequest(queries=wire.pack(queries), k=10)
        deadline = max(0.05, per_thousand)  # about a tenth of the whole search
        metadata = (*write_metadata(), (wire.REQUEST_ID_KEY, "late-search-1"))
        code, _, _ = call_details(lambda: stub.Search(request, metadata=metadata, timeout=deadline))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server gives up within a chunk of queries; its worker is free for the next call at once.
    time.sleep(min(2.0, 3 * per_thousand))
    samples = scrape(index.server.metrics_port)
    assert requests(samples, INDEX, "Search", "DEADLINE_EXCEEDED") == 1
    assert requests(samples, INDEX, "Search", "OK") == 1  # the timing call only
    assert any("late-search-1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert healthy(index.server.port)
    assert index_client.stats().count == 50_000


def test_sigterm_during_a_long_search_stops_within_the_grace(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "index_service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "index"),
            "--grace-s",
            "1",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = IndexClient(f"127.0.0.1:{port}", timeout_s=60)
    try:
        wait_healthy(f"127.0.0.1:{port}", 30, process)  # type: ignore[arg-type]
        fill(client, 100_000, dim=128)
        queries = np.random.default_rng(5).standard_normal((10_000, 128)).astype(np.float32)
        started = time.perf_counter()
        client.search(queries[:500], k=10)
        assert (time.perf_counter() - started) * 20 > 2, "the whole search must outlast the grace"
        with futures.ThreadPoolExecutor(1) as pool:
            long_search = pool.submit(client.search, queries, 10)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            stopping = time.perf_counter()
            process.wait(timeout=15)
            stopped_after = time.perf_counter() - stopping
            with pytest.raises(ServiceError):
                long_search.result(timeout=15)
        assert stopped_after < 1 + 1.5, f"stopped {stopped_after:.1f} s after SIGTERM, grace 1 s"
        assert process.returncode == 0
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_every_failed_call_has_its_metric_and_a_warning_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One call failing each way, each with its own request id: each is counted with its real code
    and logged once at WARNING with that id."""
    caplog.set_level(logging.DEBUG, logger="imgsearch.requests")
    service = start_index(
        tmp_path / "index",
        *("--auth-token", TOKEN, "--read-token", READ_TOKEN, "--metrics-port", "0"),
        *("--max-results", "1000", "--max-message-bytes", str(128 * 1024)),
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            stub = index_pb2_grpc.IndexStub(channel)
            writer = IndexClient(f"127.0.0.1:{service.server.port}", timeout_s=30, token=TOKEN)
            vectors = np.random.default_rng(6).standard_normal((60, DIM)).astype(np.float32)
            for start in range(0, 60, 10):
                blobs = [{"blob": "z" * 4000}] * 10
                writer.upsert(
                    [f"fat-{n}" for n in range(start, start + 10)], vectors[start : start + 10], blobs
                )
            writer.close()
            one = wire.pack(vectors[:1])
            cases: list[tuple[str, str, Any, grpc.StatusCode]] = [
                (
                    "Search",
                    "f-no-token",
                    lambda m: stub.Search(index_pb2.SearchRequest(queries=one, k=3), metadata=m),
                    grpc.StatusCode.UNAUTHENTICATED,
                ),
                (
                    "Delete",
                    "f-read-token",
                    lambda m: stub.Delete(index_pb2.DeleteRequest(ids=["fat-1"]), metadata=m),
                    grpc.StatusCode.PERMISSION_DENIED,
                ),
                (
                    "Search",
                    "f-budget",
                    lambda m: stub.Search(index_pb2.SearchRequest(queries=one, k=1001), metadata=m),
                    grpc.StatusCode.INVALID_ARGUMENT,
                ),
                (
                    "SearchById",
                    "f-missing",
                    lambda m: stub.SearchById(index_pb2.SearchByIdRequest(ids=["nobody"], k=3), metadata=m),
                    grpc.StatusCode.NOT_FOUND,
                ),
                (
                    "Get",
                    "f-too-big",
                    lambda m: stub.Get(index_pb2.GetRequest(ids=[f"fat-{n}" for n in range(60)]), metadata=m),
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                ),
            ]
            for _, request_id, call, expected in cases:
                token = {"f-no-token": None, "f-read-token": READ_TOKEN}.get(request_id, TOKEN)
                metadata = (*security.call_metadata(token), (wire.REQUEST_ID_KEY, request_id))
                code, details, _ = call_details(functools.partial(call, metadata))
                assert code == expected, (request_id, details)
        samples = scrape(service.server.metrics_port)
        for method, request_id, _, expected in cases:
            assert (requests(samples, INDEX, method, expected.name) or 0) >= 1, request_id
            lines = [r for r in caplog.records if f"request_id={request_id}" in r.getMessage()]
            assert len(lines) == 1 and lines[0].levelno == logging.WARNING, request_id
            assert f"{method} {expected.name}" in lines[0].getMessage()
    finally:
        service.stop(0)


# ---- health under load -----------------------------------------------------------------------


def test_health_answers_within_a_second_with_150_calls_in_flight() -> None:
    service = start_encoder("--workers", "4", "--max-concurrent-rpcs", "64")
    try:
        port = service.server.port
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = encoder_pb2_grpc.EncoderStub(channel)
        request = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=BIG)] * 3)
        calls = [stub.Embed.future(request, timeout=120) for _ in range(150)]
        time.sleep(0.3)
        slowest = 0.0
        for _ in range(10):
            started = time.perf_counter()
            assert healthy(port, timeout_s=1.0)
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.1)
        codes = [call.code() if call.exception() else grpc.StatusCode.OK for call in calls]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 64  # every call under the limit ran
        assert slowest < 1.0
        assert healthy(port)
        channel.close()
    finally:
        service.stop(0)


# ---- the read-only token ---------------------------------------------------------------------


@pytest.fixture
def read_only_index(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index", "--auth-token", TOKEN, "--read-token", READ_TOKEN))


def test_the_read_token_reads_and_never_writes(read_only_index: IndexService) -> None:
    address = f"127.0.0.1:{read_only_index.server.port}"
    writer = IndexClient(address, timeout_s=10, token=TOKEN)
    reader = IndexClient(address, timeout_s=10, token=READ_TOKEN)
    try:
        vectors = fill(writer, 50)
        assert len(reader.search(vectors[:2], k=5)) == 2
        assert len(reader.search_by_id(["item-1"], k=5)[0]) == 5
        assert reader.get(["item-1"])[0]
        assert reader.stats().count == 50
        assert sum(len(page.ids) for page in reader.scan(page_size=20)) == 50
        for write in (
            lambda: reader.upsert(["evil"], vectors[:1], model_version="m"),
            lambda: reader.delete(["item-1"]),
        ):
            with pytest.raises(ServiceError) as caught:
                write()
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "read-only" in str(caught.value)
        assert writer.stats().count == 50 and writer.get(["evil"])[1] == ["evil"]
        writer.delete(["item-1"])
        assert writer.stats().count == 49
    finally:
        writer.close()
        reader.close()


def test_the_read_token_reaches_every_encoder_call() -> None:
    service: EncoderService = start_encoder("--auth-token", TOKEN, "--read-token", READ_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            image = encoder_pb2.Image(encoded=encode(glyph(), "PNG"))
            for token in (READ_TOKEN, TOKEN):
                reply = stub.Embed(
                    encoder_pb2.EmbedRequest(images=[image]), metadata=write_metadata(token), timeout=30
                )
                assert len(reply.vectors.data) > 0
                stub.Info(encoder_pb2.InfoRequest(), metadata=write_metadata(token), timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Info(encoder_pb2.InfoRequest(), metadata=write_metadata("nope"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        service.stop(0)


def test_a_read_token_needs_a_write_token_and_differs_from_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--auth-token"):
        start_index(tmp_path / "a", "--read-token", READ_TOKEN)
    with pytest.raises(SystemExit, match="differ"):
        start_index(tmp_path / "b", "--auth-token", TOKEN, "--read-token", TOKEN)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@every_backend
def test_the_results_budget_holds_on_every_backend(tmp_path: Path, backend_args: list[str]) -> None:
    service = start_index(tmp_path / "index", "--max-results", "500", *backend_args)
    client = IndexClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    try:
        vectors = fill(client, 60)
        assert len(client.search(vectors[:50], k=10)) == 50  # 500 results: at the limit
        for call in (
            lambda: client.search(vectors[:51], k=10),
            lambda: client.search_by_id(["item-1"], k=501),
        ):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "--max-results" in str(caught.value)
        assert client.stats().count == 60
    finally:
        client.close()
        service.stop(0)
