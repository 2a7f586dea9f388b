"""Metrics and request logs: after a known set of calls, the text scraped from /metrics holds the right
counts; calls refused for load are counted; the request id is echoed and logged; --log-format json gives
one JSON object per request line."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from encoder_service import metrics as encoder_metrics
from encoder_service.preprocess import decode_image
from encoder_service.service import EncoderService
from encoder_service.service import parse_config as encoder_config
from imgsearch import wire
from imgsearch.client import BadImage, EncoderClient, IndexClient, ServiceError
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch_server import metrics, serving
from index_service import metrics as index_metrics
from index_service.service import IndexService
from index_service.service import parse_config as index_config
from tests.support import (
    BIG,
    connect,
    encode,
    glyph,
    labels_of,
    requests,
    scrape,
    serve,
    start_encoder,
    start_index,
    value,
)

ENCODER = "imgsearch.v1.Encoder"
INDEX = "imgsearch.v1.Index"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
IMAGE = encode(glyph(), "PNG")
# Every name the services export: those every server keeps, and each service's own.
EXPORTED = (*metrics.EXPORTED, *encoder_metrics.EXPORTED, *index_metrics.EXPORTED)


@pytest.fixture
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--metrics-port", "0"))


@pytest.fixture
def encoder_client(encoder: EncoderService) -> Iterator[EncoderClient]:
    yield from connect(EncoderClient, encoder)


def test_encoder_metrics_count_the_calls(encoder: EncoderService, encoder_client: EncoderClient) -> None:
    for _ in range(3):
        encoder_client.embed([IMAGE] * 5)
    with pytest.raises(BadImage):
        encoder_client.embed([IMAGE, b"not an image"])
    info = encoder_client.info()
    with grpc.insecure_channel(f"127.0.0.1:{encoder.server.port}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        # a streamed request and reply (what grpcurl asks first)
        asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        listed = list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asked, timeout=10)
        )
        assert ENCODER in str(listed[0])
        with pytest.raises(grpc.RpcError) as unknown:  # a method nobody serves: one label for all of them
            channel.unary_unary("/imgsearch.v1.Encoder/Nope", None, None)(b"", timeout=10)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED

    samples = scrape(encoder.server.metrics_port)
    assert requests(samples, ENCODER, "Embed", "OK") == 3
    assert requests(samples, ENCODER, "Embed", "INVALID_ARGUMENT") == 1
    assert requests(samples, ENCODER, "Info", "OK") == 1
    assert requests(samples, HEALTH, "Check", "OK") == 1
    assert requests(samples, REFLECTION, "ServerReflectionInfo", "OK") == 1
    assert requests(samples, "unknown", "unknown", "UNIMPLEMENTED") == 1
    assert len(labels_of(samples, metrics.GRPC_REQUESTS)) == 6

    seconds = metrics.GRPC_REQUEST_SECONDS
    assert value(samples, f"{seconds}_count", service=ENCODER, method="Embed") == 4
    assert value(samples, f"{seconds}_bucket", service=ENCODER, method="Embed", le="+Inf") == 4
    assert 0 < (value(samples, f"{seconds}_sum", service=ENCODER, method="Embed") or 0) < 60
    buckets = sorted(
        (float(labels["le"]), value(samples, f"{seconds}_bucket", **labels) or 0)
        for labels in labels_of(samples, f"{seconds}_bucket")
        if labels["method"] == "Embed"
    )
    assert buckets[0][0] == 0.0005 and buckets[-2][0] == 10 and math.isinf(buckets[-1][0])
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)

    batch = encoder_metrics.ENCODER_IMAGES_PER_BATCH
    assert value(samples, f"{batch}_count") == 3  # the refused call embedded nothing
    assert value(samples, f"{batch}_sum") == 15
    assert value(samples, f"{batch}_bucket", le="4.0") == 0
    assert value(samples, f"{batch}_bucket", le="8.0") == 3
    assert value(samples, encoder_metrics.ENCODER_IMAGES) == 15
    assert labels_of(samples, encoder_metrics.MODEL_INFO) == [
        {
            "model": "default",
            "model_version": info["model_version"],
            "runtime": "litert",
            "replica": info["replica"],
        }
    ]
    assert (
        value(samples, encoder_metrics.MODEL_INFO, **labels_of(samples, encoder_metrics.MODEL_INFO)[0]) == 1
    )
    assert value(samples, metrics.GRPC_REJECTED, service=ENCODER, reason="max_concurrent_rpcs") == 0
    assert value(samples, "process_resident_memory_bytes")


def test_index_metrics_count_the_calls(tmp_path: Path) -> None:
    service = start_index(tmp_path / "index", "--metrics-port", "0")
    client = IndexClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    try:
        empty = scrape(service.server.metrics_port)
        assert value(empty, index_metrics.INDEX_VECTORS) == 0
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((30, 16)).astype(np.float32)
        client.upsert([f"a{n}" for n in range(10)], vectors[:10], model_version="m1")
        client.upsert([f"b{n}" for n in range(20)], vectors[10:], model_version="m1")
        for n in range(4):
            client.search(vectors[n : n + 1], k=3, model_version="m1")
        with pytest.raises(ServiceError) as caught:
            client.search_by_id(["nobody"], k=3)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        stats = client.stats()
        assert sum(len(page.ids) for page in client.scan(page_size=7)) == 30  # a streamed reply

        samples = scrape(service.server.metrics_port)
        assert requests(samples, INDEX, "Upsert", "OK") == 2
        assert requests(samples, INDEX, "Search", "OK") == 4
        assert requests(samples, INDEX, "SearchById", "NOT_FOUND") == 1
        assert requests(samples, INDEX, "Stats", "OK") == 1
        assert requests(samples, INDEX, "Scan", "OK") == 1
        assert value(samples, f"{metrics.GRPC_REQUEST_SECONDS}_count", service=INDEX, method="Scan") == 1
        assert value(samples, f"{metrics.GRPC_REQUEST_SECONDS}_count", service=INDEX, method="Search") == 4
        batch = index_metrics.INDEX_VECTORS_PER_BATCH
        assert value(samples, f"{batch}_count") == 2
        assert value(samples, f"{batch}_sum") == 30
        assert value(samples, f"{batch}_bucket", le="8.0") == 0
        assert value(samples, f"{batch}_bucket", le="16.0") == 1
        assert value(samples, f"{batch}_bucket", le="32.0") == 2
        assert value(samples, index_metrics.INDEX_VECTORS) == 30
        assert value(samples, index_metrics.INDEX_BYTES) == stats.bytes_used >= 30 * 16 * 4
        assert labels_of(samples, index_metrics.INDEX_INFO) == [
            {"model_version": "m1", "backend": "faiss", "dim": "16"}
        ]
    finally:
        client.close()
        port = service.server.metrics_port
        service.stop(0)
    with pytest.raises(urllib.error.URLError):  # stopped with the service
        scrape(port)


def test_calls_refused_for_load_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="imgsearch.requests")
    started = time.perf_counter()
    decode_image(BIG, max_pixels=10_000_000)
    slow = [BIG] * max(5, math.ceil(1.5 / (time.perf_counter() - started)))  # about 1.5 s to decode
    service = start_encoder("--metrics-port", "0", "--max-concurrent-rpcs", "1", "--workers", "4")
    client = EncoderClient(f"127.0.0.1:{service.server.port}", timeout_s=60)
    try:
        outcome: list[object] = []
        first = threading.Thread(target=lambda: outcome.append(client.embed(slow)))
        first.start()
        time.sleep(0.3)
        refused = 0
        for _ in range(3):
            try:
                client.embed([IMAGE])
            except ServiceError as error:
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                refused += 1
        first.join(60)
        assert len(outcome) == 1 and refused >= 1, (outcome, refused)

        samples = scrape(service.server.metrics_port)
        assert value(samples, metrics.GRPC_REJECTED, service=ENCODER, reason="max_concurrent_rpcs") == refused
        assert requests(samples, ENCODER, "Embed", "RESOURCE_EXHAUSTED") == refused
        assert requests(samples, ENCODER, "Embed", "OK") == 4 - refused
        # the refused calls never ran: they have no latency
        assert value(samples, f"{metrics.GRPC_REQUEST_SECONDS}_count", service=ENCODER, method="Embed") == (
            4 - refused
        )
    finally:
        client.close()
        service.stop(0)
    lines = [
        r for r in caplog.records if r.name == "imgsearch.requests" and "RESOURCE_EXHAUSTED" in r.message
    ]
    assert len(lines) == refused and all(r.levelno == logging.WARNING for r in lines)
    assert all("max-concurrent-rpcs" in r.message and "request_id=" in r.message for r in lines)


def test_the_request_id_is_echoed_and_logged(
    encoder: EncoderService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imgsearch.requests")
    with grpc.insecure_channel(f"127.0.0.1:{encoder.server.port}") as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        good = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=IMAGE)])
        _, call = stub.Embed.with_call(good, timeout=30)
        generated = dict(call.trailing_metadata() or ())[wire.REQUEST_ID_KEY]
        assert len(generated) == 16 and int(str(generated), 16) >= 0

        bad = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=b"junk")])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(bad, timeout=30, metadata=[(wire.REQUEST_ID_KEY, "req-42.a")])
        error: grpc.Call = caught.value  # type: ignore[assignment]
        trailing = dict(error.trailing_metadata() or ())
        # the servicer's own trailing metadata (the bad image's position) is kept
        assert trailing[wire.REQUEST_ID_KEY] == "req-42.a" and trailing["imgsearch-bad-image"] == "0"

        with pytest.raises(grpc.RpcError):  # an id that is no plain token is replaced
            stub.Embed(bad, timeout=30, metadata=[(wire.REQUEST_ID_KEY, "x" * 200)])

    records = [r for r in caplog.records if r.name == "imgsearch.requests"]
    ok = [r for r in records if generated in r.getMessage()]
    assert len(ok) == 1 and ok[0].levelno == logging.DEBUG and "Embed OK" in ok[0].getMessage()
    (failed,) = [r for r in records if "req-42.a" in r.getMessage()]
    assert failed.levelno == logging.WARNING
    assert "INVALID_ARGUMENT" in failed.getMessage() and "cannot decode" in failed.getMessage()
    assert "ipv" in failed.getMessage()  # the peer
    assert not any("x" * 200 in r.getMessage() for r in records)


def test_json_logs_have_one_object_per_request(
    encoder: EncoderService, encoder_client: EncoderClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    serving.configure_logging("json", "DEBUG")
    try:
        encoder_client.embed([IMAGE])
        with pytest.raises(BadImage):
            encoder_client.embed([b"junk"])
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logged = [line for line in lines if line["logger"] == "imgsearch.requests"]
    assert [(line["method"], line["code"], line["severity"]) for line in logged] == [
        ("Embed", "OK", "DEBUG"),
        ("Embed", "INVALID_ARGUMENT", "WARNING"),
    ]
    for line in logged:
        assert line["service"] == ENCODER and len(line["request_id"]) == 16
        assert line["duration_ms"] > 0 and line["peer"].startswith("ipv")
        assert line["request_id"] in line["message"]
    assert "cannot decode" in logged[1]["details"] and "details" not in logged[0]


def test_refused_by_the_token_is_counted_too() -> None:
    service = start_encoder("--metrics-port", "0", "--auth-token", "sesame")
    client = EncoderClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    try:
        with pytest.raises(ServiceError):
            client.info()
        samples = scrape(service.server.metrics_port)
    finally:
        client.close()
        service.stop(0)
    assert requests(samples, ENCODER, "Info", "UNAUTHENTICATED") == 1


def test_metrics_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert index_config([]).server.metrics_port is None  # off by default
    assert encoder_config(["--metrics-port", "0"]).server.metrics_port == 0
    monkeypatch.setenv("IMGSEARCH_INDEX_METRICS_PORT", "9102")
    monkeypatch.setenv("IMGSEARCH_ENCODER_METRICS_PORT", "9101")
    monkeypatch.setenv("IMGSEARCH_METRICS_HOST", "127.0.0.1")
    assert index_config([]).server.metrics_port == 9102
    assert encoder_config([]).server.metrics_port == 9101
    assert index_config([]).server.metrics_host == "127.0.0.1"
    assert index_config(["--metrics-port", "9200"]).server.metrics_port == 9200  # flags win
    with pytest.raises(SystemExit, match="0 to 65535"):
        index_config(["--metrics-port", "70000"])
    with pytest.raises(SystemExit, match="both 50052"):
        index_config(["--metrics-port", "50052"])


def test_a_metrics_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = IndexService(
            index_config(
                [
                    "--port",
                    "0",
                    "--host",
                    "127.0.0.1",
                    "--data-dir",
                    str(tmp_path),
                    "--metrics-port",
                    str(port),
                ]
            )
        )
        with pytest.raises(SystemExit, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            service.start()
    start_index(tmp_path).stop(0)  # the data dir was released


def test_without_a_metrics_port_nothing_listens() -> None:
    service = start_encoder()
    try:
        assert service.server.metrics_port is None and service.server.metrics_server is None
    finally:
        service.stop(0)


def test_every_exported_name_is_scraped(encoder: EncoderService, tmp_path: Path) -> None:
    """EXPORTED (the shared names and each service's own), which the Grafana dashboard's test checks
    its queries against, names what the two services really serve."""
    index = start_index(tmp_path / "index", "--metrics-port", "0")
    client = IndexClient(f"127.0.0.1:{index.server.port}", timeout_s=30)
    encoder_client = EncoderClient(f"127.0.0.1:{encoder.server.port}", timeout_s=30)
    try:
        embedding = encoder_client.embed([IMAGE])
        client.upsert(["one"], embedding.vectors, model_version=embedding.model_version)
        scraped = {name for name, _ in scrape(encoder.server.metrics_port)}
        scraped |= {name for name, _ in scrape(index.server.metrics_port)}
    finally:
        encoder_client.close()
        client.close()
        index.stop(0)
    missing = [name for name in EXPORTED if name not in scraped and f"{name}_count" not in scraped]
    assert not missing
