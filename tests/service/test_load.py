"""Load: a bound on calls in flight (RESOURCE_EXHAUSTED at once past it) and deadlines honoured on the
server (an abandoned batch stops decoding). Slow calls are batches of large images to decode."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from encoder_service.preprocess import decode_image
from encoder_service.service import EncoderService
from imgsearch.client import EncoderClient, ServiceError
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from index_service.service import parse_config as index_config
from tests.support import BIG, serve, start_encoder


@pytest.fixture(scope="module")
def seconds_per_image() -> float:
    """How long one BIG image takes to decode here, so batches last long enough on any machine."""
    decode_image(BIG, max_pixels=10_000_000)
    started = time.perf_counter()
    for _ in range(3):
        decode_image(BIG, max_pixels=10_000_000)
    return (time.perf_counter() - started) / 3


def batch_lasting(seconds: float, per_image: float) -> list[bytes]:
    return [BIG] * max(10, min(1000, math.ceil(seconds / per_image)))


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--max-concurrent-rpcs", "2", "--workers", "8"))


def abandoned(encoder: EncoderService) -> int:
    client = EncoderClient(f"127.0.0.1:{encoder.server.port}", timeout_s=5)
    try:
        return int(client.info()["calls_abandoned"])
    finally:
        client.close()


def test_past_the_limit_calls_are_refused_at_once(encoder: EncoderService, seconds_per_image: float) -> None:
    images = batch_lasting(1.0, seconds_per_image)
    client = EncoderClient(f"127.0.0.1:{encoder.server.port}", timeout_s=60)
    start = threading.Barrier(6)
    outcomes: list[tuple[str, float]] = []

    def embed() -> None:
        start.wait()
        began = time.monotonic()
        try:
            client.embed(images)
            outcomes.append(("ok", time.monotonic() - began))
        except ServiceError as error:
            name = error.code.name if error.code else "?"
            assert name != "RESOURCE_EXHAUSTED" or "busy" in str(error), str(error)
            outcomes.append((name, time.monotonic() - began))

    threads = [threading.Thread(target=embed) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    client.close()
    succeeded = [t for kind, t in outcomes if kind == "ok"]
    refused = [t for kind, t in outcomes if kind == "RESOURCE_EXHAUSTED"]
    assert len(succeeded) + len(refused) == 6, outcomes
    assert 1 <= len(succeeded) <= 4 and len(refused) >= 2, outcomes
    assert max(refused) < min(succeeded) / 2, outcomes  # refused at once, not after queueing
    assert abandoned(encoder) == 0  # and it still answers


def test_the_limit_is_a_flag_of_both_services(monkeypatch: pytest.MonkeyPatch) -> None:
    assert index_config(["--max-concurrent-rpcs", "3"]).server.max_concurrent_rpcs == 3
    monkeypatch.setenv("IMGSEARCH_MAX_CONCURRENT_RPCS", "5")
    assert index_config([]).server.max_concurrent_rpcs == 5
    with pytest.raises(SystemExit, match="at least 1"):
        index_config(["--max-concurrent-rpcs", "0"])


def test_a_call_past_its_deadline_is_abandoned(
    encoder: EncoderService, seconds_per_image: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="encoder_service.servicer")
    images = batch_lasting(6.0, seconds_per_image)
    full = len(images) * seconds_per_image
    before = abandoned(encoder)
    client = EncoderClient(f"127.0.0.1:{encoder.server.port}", timeout_s=0.5)
    began = time.monotonic()
    with pytest.raises(ServiceError) as caught:
        client.embed(images)
    client.close()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    while abandoned(encoder) == before and time.monotonic() - began < full:
        time.sleep(0.02)
    stopped = time.monotonic() - began
    assert abandoned(encoder) == before + 1
    assert stopped < min(2.0, full / 3), (stopped, full)  # the server stopped, not finished the batch
    assert "DEADLINE_EXCEEDED" in caplog.text


def test_a_cancelled_call_is_abandoned(
    encoder: EncoderService, seconds_per_image: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="encoder_service.servicer")
    images = batch_lasting(6.0, seconds_per_image)
    before = abandoned(encoder)
    request = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=image) for image in images])
    with grpc.insecure_channel(f"127.0.0.1:{encoder.server.port}") as channel:
        future = encoder_pb2_grpc.EncoderStub(channel).Embed.future(request, timeout=60)
        time.sleep(0.3)
        began = time.monotonic()
        assert future.cancel()
    while abandoned(encoder) == before and time.monotonic() - began < 5:
        time.sleep(0.02)
    assert abandoned(encoder) == before + 1 and time.monotonic() - began < 2
    assert "CANCELLED" in caplog.text
