"""The client's own behaviour: targets, round_robin over encoder replicas, graceful stops under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from imgsearch.client import EncoderClient, channel_target
from tests.support import encode, glyph, mnist_sample, start_encoder
from tools.local import ServiceProcess, free_port


def test_channel_targets() -> None:
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("dns:///encoder:50051") == "dns:///encoder:50051"
    assert channel_target("127.0.0.1:1, localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:5,[::1]:6") == "ipv6:[::1]:5,[::1]:6"
    with pytest.raises(ValueError, match="mix"):
        channel_target("127.0.0.1:1,[::1]:2")


def test_a_comma_list_spreads_calls_over_every_replica() -> None:
    replicas = [start_encoder() for _ in range(3)]
    try:
        client = EncoderClient(",".join(f"127.0.0.1:{r.server.port}" for r in replicas))
        x, _ = mnist_sample(4)
        for _ in range(30):
            client.embed(list(x))
        client.close()
        served = []
        for replica in replicas:
            single = EncoderClient(f"127.0.0.1:{replica.server.port}")
            served.append(single.info()["images_embedded"])
            single.close()
        assert sum(served) == 30 * 4
        assert all(count >= 4 * 5 for count in served), served  # each replica got a fair share
    finally:
        for replica in replicas:
            replica.stop(0)


def test_sigterm_lets_an_in_flight_call_finish(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A slow batch (large images to decode) is under way when SIGTERM arrives: it still succeeds."""
    encoder = ServiceProcess("encoder_service", free_port(), ["--grace-s", "60"], tmp_path / "log").start()
    try:
        encoder.wait_healthy()
        images = [encode(glyph((1500, 1500)).convert("RGB"), "PNG")] * 150
        client = EncoderClient(encoder.address, timeout_s=120)
        client.embed(images[:1])
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["vectors"] = client.embed(images).vectors
                outcome["finished"] = time.monotonic()
            except Exception as error:  # recorded and asserted below
                outcome["error"] = error

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.5)
        signalled = time.monotonic()
        assert encoder.stop(timeout_s=120) == 0
        thread.join(120)
        assert "error" not in outcome, outcome.get("error")
        vectors = outcome["vectors"]
        assert isinstance(vectors, np.ndarray) and vectors.shape == (150, 128)
        finished = outcome["finished"]
        assert isinstance(finished, float) and finished > signalled  # it was in flight at the signal
        assert "received SIGTERM" in (tmp_path / "log").read_text()
        client.close()
    finally:
        encoder.kill()
