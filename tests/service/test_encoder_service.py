"""The encoder service over real gRPC: formats and modes, raw pixels, bad input, info, both runtimes."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from encoder_service.service import EncoderService, parse_config
from imgsearch.client import BadImage, EncoderClient
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from tests.support import connect, encode, glyph, mnist_sample, serve, start_encoder


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(
        start_encoder(
            "--max-batch",
            "64",
            "--max-image-bytes",
            "2000000",
            "--max-image-pixels",
            "4000000",
            "--max-message-bytes",
            "8000000",
        )
    )


@pytest.fixture
def client(encoder: EncoderService) -> Iterator[EncoderClient]:
    yield from connect(EncoderClient, encoder)


def every_format_and_mode() -> dict[str, bytes]:
    base = glyph()
    rgb = base.convert("RGB")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.eval(base, lambda v: 255 if v else 0))
    sixteen = Image.fromarray((np.asarray(base, np.uint16) * 257).astype(np.uint16))
    return {
        "png-L": encode(base, "PNG"),
        "png-RGB": encode(rgb, "PNG"),
        "png-RGBA": encode(rgba, "PNG"),
        "png-P": encode(rgb.convert("P"), "PNG"),
        "png-I;16": encode(sixteen, "PNG"),
        "jpeg-L": encode(base, "JPEG"),
        "jpeg-RGB": encode(rgb, "JPEG", quality=90),
        "jpeg-CMYK": encode(rgb.convert("CMYK"), "JPEG"),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(base, "GIF"),
        "webp": encode(rgb, "WEBP"),
        "tiff": encode(base, "TIFF"),
        "tiff-RGBA": encode(rgba, "TIFF"),
        "png-light-background": encode(glyph(light_background=True), "PNG"),
        "png-1x1": encode(Image.new("L", (1, 1), 255), "PNG"),
        "png-very-wide": encode(glyph((3000, 12)), "PNG"),
    }


def test_every_format_and_mode_gives_a_finite_128_d_vector(client: EncoderClient) -> None:
    images = every_format_and_mode()
    embedding = client.embed(list(images.values()))
    assert embedding.vectors.shape == (len(images), 128) and embedding.vectors.dtype == np.float32
    assert np.isfinite(embedding.vectors).all()
    assert embedding.model_version == client.info()["model_version"]
    by_name = dict(zip(images, embedding.vectors, strict=True))
    # the same glyph, dark on light, is read as light on dark
    assert np.abs(by_name["png-light-background"] - by_name["png-L"]).max() < 1e-4


def test_png_and_raw_pixels_give_the_same_vector(client: EncoderClient) -> None:
    x, _ = mnist_sample(8)
    pngs = [encode(Image.fromarray(digit), "PNG") for digit in x]
    from_png = client.embed(pngs).vectors
    from_raw = client.embed(list(x)).vectors
    np.testing.assert_array_equal(from_png, from_raw)


def bad_call(encoder: EncoderService, images: list[encoder_pb2.Image]) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{encoder.server.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            encoder_pb2_grpc.EncoderStub(channel).Embed(encoder_pb2.EmbedRequest(images=images), timeout=30)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    return caught.value


def raw_image(height: int, width: int, pixels: bytes) -> encoder_pb2.Image:
    return encoder_pb2.Image(raw=encoder_pb2.RawPixels(height=height, width=width, pixels=pixels))


GOOD = encoder_pb2.Image(encoded=encode(glyph(), "PNG"))


@pytest.mark.parametrize(
    "bad,words",
    [
        (encoder_pb2.Image(encoded=b""), "image 1: empty image"),
        (encoder_pb2.Image(), "image 1: empty image"),
        (encoder_pb2.Image(encoded=os.urandom(3000)), "image 1: cannot decode"),
        (encoder_pb2.Image(encoded=encode(glyph(), "PNG")[:200]), "image 1:"),
        (encoder_pb2.Image(encoded=encode(glyph().convert("RGB"), "JPEG")[:300]), "image 1:"),
        (
            encoder_pb2.Image(raw=encoder_pb2.RawPixels(height=28, width=27, pixels=bytes(28 * 27))),
            "image 1: ",
        ),
        (encoder_pb2.Image(raw=encoder_pb2.RawPixels(height=28, width=28, pixels=bytes(10))), "image 1: "),
        (
            encoder_pb2.Image(encoded=encode(Image.new("1", (3000, 3000)), "PNG")),
            "over the limit of 4000000 pixels",
        ),
        (encoder_pb2.Image(encoded=b"\x89PNG" + bytes(2_100_000)), "over the limit of 2000000 bytes"),
    ],
)
def test_a_bad_image_names_its_position(encoder: EncoderService, bad: encoder_pb2.Image, words: str) -> None:
    error = bad_call(encoder, [GOOD, bad, GOOD])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")
    assert ("imgsearch-bad-image", "1") in tuple(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def test_the_client_reports_the_bad_position(client: EncoderClient) -> None:
    with pytest.raises(BadImage) as caught:
        client.embed([encode(glyph(), "PNG"), encode(glyph(), "PNG"), b"junk"])
    assert caught.value.position == 2


def test_limits_on_batch_and_message_size(encoder: EncoderService) -> None:
    error = bad_call(encoder, [GOOD] * 65)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 64" in (error.details() or "")
    big = encoder_pb2.Image(encoded=bytes(1_900_000))
    error = bad_call(encoder, [big] * 5)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_animated_gif_uses_its_first_frame(client: EncoderClient) -> None:
    first, second = glyph(), Image.new("L", (120, 160), 0)
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100)
    vectors = client.embed([buffer.getvalue(), encode(first, "GIF")]).vectors
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def test_info(client: EncoderClient) -> None:
    info = client.info()
    assert info["dim"] == 128 and info["input_shape"] == [28, 28, 1] and info["runtime"] == "litert"
    assert info["card"]["model_version"] == info["model_version"]
    assert info["card"]["dataset"] == "mnist-sample"


def test_both_runtimes_give_the_same_vectors_through_the_service(client: EncoderClient) -> None:
    tensorflow = start_encoder("--runtime", "tensorflow")
    try:
        other = EncoderClient(f"127.0.0.1:{tensorflow.server.port}", timeout_s=60)
        x, _ = mnist_sample(40, start=8000)
        images = list(x) + list(every_format_and_mode().values())
        litert, tf = client.embed(images), other.embed(images)
        assert other.info()["runtime"] == "tensorflow" and tf.model_version == litert.model_version
        np.testing.assert_allclose(tf.vectors, litert.vectors, atol=1e-5, rtol=0)
        other.close()
    finally:
        tensorflow.stop(0)


def test_a_batching_window_gives_each_concurrent_call_its_own_vectors(client: EncoderClient) -> None:
    """Dynamic batching (--batch-window-ms, off by default): calls that meet in the window share one
    model run, and each gets exactly its own rows; a bad image fails only its own call."""
    batching = start_encoder("--batch-window-ms", "20")
    try:
        x, _ = mnist_sample(60, start=8000)
        calls = [[encode(Image.fromarray(d), "PNG") for d in x[n : n + 1 + n % 4]] for n in range(0, 60, 5)]
        expected = [client.embed(images).vectors for images in calls]
        start = threading.Barrier(len(calls) + 1)
        outcomes: dict[int, np.ndarray | BadImage] = {}

        def call(n: int) -> None:
            other = EncoderClient(f"127.0.0.1:{batching.server.port}", timeout_s=30)
            start.wait()
            try:
                outcomes[n] = other.embed(calls[n] + ([b"junk"] if n == 3 else [])).vectors
            except BadImage as bad:
                outcomes[n] = bad
            other.close()

        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(calls))]
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join(60)
        for n, vectors in enumerate(expected):
            outcome = outcomes[n]
            if n == 3:
                assert isinstance(outcome, BadImage) and outcome.position == len(calls[3])
            else:
                assert isinstance(outcome, np.ndarray)
                np.testing.assert_allclose(outcome, vectors, atol=1e-6, rtol=0)
        lone = EncoderClient(f"127.0.0.1:{batching.server.port}", timeout_s=30)
        np.testing.assert_allclose(lone.embed(calls[0]).vectors, expected[0], atol=1e-6, rtol=0)
        lone.close()
    finally:
        batching.stop(0)


def test_shipped_models_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from encoder_service.model_dir import DEFAULT_MODEL_DIR, SHIPPED_MODELS

    assert parse_config([]).model_dir == DEFAULT_MODEL_DIR
    assert parse_config(["--model", "tutorial"]).model_dir == SHIPPED_MODELS / "tutorial"
    monkeypatch.setenv("IMGSEARCH_MODEL", "tutorial")
    assert parse_config([]).model_dir == SHIPPED_MODELS / "tutorial"
    assert parse_config(["--model-dir", str(tmp_path)]).model_dir == tmp_path, "a directory wins over a name"
    with pytest.raises(SystemExit):
        parse_config(["--model", "no-such-model"])


def test_the_tutorial_model_serves_beside_the_default() -> None:
    """Both shipped MNIST models answer; their vectors differ, and only the default's are unit length."""
    digits = [encode(Image.fromarray(x), "PNG") for x in mnist_sample(4)[0]]
    vectors = {}
    for name in ("default", "tutorial"):
        service = start_encoder("--model", name)
        try:
            client = EncoderClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
            embedding = client.embed(digits)
            client.close()
        finally:
            service.stop(0)
        assert embedding.model_version.startswith("wide-" if name == "default" else "tutorial-")
        vectors[name] = embedding.vectors
    assert np.allclose(np.linalg.norm(vectors["default"], axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors["tutorial"], axis=1), 1.0, atol=1e-2)


def test_connections_are_recycled_without_failing_calls() -> None:
    """With a maximum connection age the server closes each connection (so clients re-resolve DNS and
    meet replicas added since); the client reconnects and no call fails."""
    service = start_encoder("--max-connection-age-s", "0.3", "--max-connection-age-grace-s", "5")
    client = EncoderClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
    states: list[grpc.ChannelConnectivity] = []
    client.channel.subscribe(states.append)
    digits = [encode(Image.fromarray(x), "PNG") for x in mnist_sample(8)[0]]
    try:
        started, calls = time.monotonic(), 0
        while time.monotonic() - started < 2.0:
            assert len(client.embed(digits).vectors) == 8
            calls += 1
        ready = [n for n, state in enumerate(states) if state == grpc.ChannelConnectivity.READY]
        assert len(ready) >= 2, f"the connection was never recycled in {calls} calls: {states}"
    finally:
        client.close()
        service.stop(0)


def test_connections_live_on_without_an_age() -> None:
    settings = parse_config(["--max-connection-age-s", "0"]).server
    assert settings.max_connection_age_s == 0
    assert parse_config([]).server.max_connection_age_s == 60.0
    with pytest.raises(SystemExit):
        parse_config(["--max-connection-age-s", "-1"])
