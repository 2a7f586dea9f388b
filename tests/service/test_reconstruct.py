"""Encoder.Reconstruct over real gRPC: the model's input and the decoder's reconstruction of each image.

Also the shipped decoders (`decoder.tflite`, split from `autoencoder.keras` without retraining):
decoder(encoder(x)) equals autoencoder(x); and the export command that adds a decoder to a model directory
trained before."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from encoder_service import export
from encoder_service.model_dir import shipped_model
from encoder_service.preprocess import decode_image
from encoder_service.runtime import NoDecoderError, load_runtime
from encoder_service.service import EncoderService
from encoder_service.servicer import EncoderServicer
from imgsearch.client import BadImage, EncoderClient, ServiceError
from imgsearch.v1 import encoder_pb2, encoder_pb2_grpc
from imgsearch_server.errors import RequestError
from tests.support import connect, encode, glyph, mnist_sample, serve, start_encoder

MAX_BATCH = 128
SHIPPED = ("default", "tutorial", "fashion", "fashion-tutorial")


@pytest.fixture(scope="module")
def encoder() -> Iterator[EncoderService]:
    yield from serve(start_encoder("--max-batch", str(MAX_BATCH)))


@pytest.fixture
def client(encoder: EncoderService) -> Iterator[EncoderClient]:
    yield from connect(EncoderClient, encoder)


def query_digits(count: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Digits of the query split (the sample's last 2,000, never trained on)."""
    return mnist_sample(count, start=8000)


def resemblance(inputs: np.ndarray, outputs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """How much each reconstruction looks like its own input, by mean absolute pixel error (images in
    [0, 1] or uint8): (the fraction of reconstructions nearer their own input than every other input,
    mean error to the own input / mean error to the inputs of other labels). A right decoder gives
    about (1, 0.4), a wrong one (another shipped model's, same input and output shapes) about (0, 1)."""
    scale = 255.0 if inputs.dtype == np.uint8 else 1.0
    a = outputs.astype(np.float32)[:, None] / scale
    b = inputs.astype(np.float32)[None] / scale
    errors = np.abs(a - b).mean(axis=(2, 3))  # [reconstruction i, input j]
    own = np.diag(errors)
    nearest_own = float(np.mean(errors.argmin(axis=1) == np.arange(len(inputs))))
    other = np.where(labels[:, None] != labels[None, :], errors, np.nan)
    return nearest_own, float(own.mean() / np.nanmean(other))


def test_the_input_is_the_preprocessed_image(client: EncoderClient) -> None:
    x, _ = mnist_sample(3)
    pngs = [encode(Image.fromarray(d).resize((84, 70)), "PNG") for d in x]  # preprocessing has work to do
    files = [*pngs, encode(glyph(), "PNG"), encode(glyph(light_background=True), "JPEG", quality=95)]
    items = client.reconstruct([*files, *x])
    assert len(items) == len(files) + len(x)
    for item, data in zip(items, files, strict=False):
        np.testing.assert_array_equal(item.input, np.rint(decode_image(data) * 255).astype(np.uint8))
    for item, digit in zip(items[len(files) :], x, strict=True):
        np.testing.assert_array_equal(item.input, digit)  # raw 28x28 pixels are the model's input as they are
    for item in items:
        for picture in (item.input, item.output):
            assert picture.shape == (28, 28) and picture.dtype == np.uint8
        assert item.output.max() > 128 and item.output[0, 0] < 64, "light ink on a dark background"


def test_the_reconstruction_resembles_its_input(client: EncoderClient) -> None:
    x, y = query_digits()
    items = client.reconstruct(list(x))
    inputs = np.stack([item.input for item in items])
    outputs = np.stack([item.output for item in items])
    np.testing.assert_array_equal(inputs, x)
    nearest_own, ratio = resemblance(inputs, outputs, y)
    # measured on these 100 digits: 0.99 and 0.41 (default model); 1.0 and 0.34 (the tutorial model)
    assert nearest_own >= 0.9 and ratio < 0.6, (nearest_own, ratio)


@pytest.mark.parametrize("encoder_name,decoder_name", [("default", "fashion"), ("default", "tutorial")])
def test_the_resemblance_check_fails_for_a_wrong_decoder(
    tmp_path: Path, encoder_name: str, decoder_name: str
) -> None:
    """Another shipped model's decoder (the same shapes in and out) fails the check the right one meets."""
    x, y = query_digits()
    images = x.astype(np.float32) / 255
    right = load_runtime(shipped_model(encoder_name))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("card.json", "encoder.tflite"):
        shutil.copy(shipped_model(encoder_name) / name, mixed / name)
    shutil.copy(shipped_model(decoder_name) / "decoder.tflite", mixed / "decoder.tflite")
    wrong = load_runtime(mixed)
    nearest_own, ratio = resemblance(images, right.reconstruct(images), y)
    assert nearest_own >= 0.9 and ratio < 0.6, (nearest_own, ratio)
    nearest_own, ratio = resemblance(images, wrong.reconstruct(images), y)
    assert nearest_own < 0.2 and ratio > 0.8, (nearest_own, ratio)  # measured: 0.04 and 0.98, 0.0 and 1.0


def test_the_tutorial_model_reconstructs_its_input() -> None:
    x, y = query_digits()
    images = x.astype(np.float32) / 255
    pictures = load_runtime(shipped_model("tutorial")).reconstruct(images)
    assert pictures.shape == (100, 28, 28) and pictures.dtype == np.float32
    assert pictures.min() >= 0.0 and pictures.max() <= 1.0
    nearest_own, ratio = resemblance(images, pictures, y)
    assert nearest_own >= 0.9 and ratio < 0.6, (nearest_own, ratio)


def test_both_runtimes_give_the_same_reconstruction(client: EncoderClient) -> None:
    tensorflow = start_encoder("--runtime", "tensorflow")
    try:
        other = EncoderClient(f"127.0.0.1:{tensorflow.server.port}", timeout_s=60)
        x, _ = query_digits(40)
        images = [*x, encode(glyph(), "PNG")]
        litert, tf = client.reconstruct(images), other.reconstruct(images)
        other.close()
    finally:
        tensorflow.stop(0)
    for a, b in zip(litert, tf, strict=True):
        np.testing.assert_array_equal(a.input, b.input)
    ours = np.stack([item.output for item in litert]).astype(np.int16)
    theirs = np.stack([item.output for item in tf]).astype(np.int16)
    # the float outputs differ by under 1e-5; rounding to uint8 can then differ by one step, rarely
    assert np.abs(ours - theirs).max() <= 1
    assert np.mean(ours != theirs) < 0.01


def test_the_reply_names_model_and_replica(encoder: EncoderService) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{encoder.server.port}") as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        image = encoder_pb2.Image(encoded=encode(glyph(), "PNG"))
        reply = stub.Reconstruct(encoder_pb2.ReconstructRequest(images=[image]), timeout=30)
        info = stub.Info(encoder_pb2.InfoRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as empty:
            stub.Reconstruct(encoder_pb2.ReconstructRequest(), timeout=30)
    assert reply.model_version == info.model_version and reply.replica == info.replica != ""
    (item,) = reply.items
    for raw in (item.input, item.reconstruction):
        assert (raw.height, raw.width, len(raw.pixels)) == (28, 28, 784)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the batch is empty" in (empty.value.details() or "")


def test_a_bad_image_names_its_position(client: EncoderClient) -> None:
    with pytest.raises(BadImage) as caught:
        client.reconstruct([encode(glyph(), "PNG"), b"junk", encode(glyph(), "PNG")])
    assert caught.value.position == 1 and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1: cannot decode" in caught.value.details
    with pytest.raises(BadImage) as caught:
        client.reconstruct([np.zeros((28, 28), np.uint8), np.zeros((27, 28), np.uint8)])
    assert caught.value.position == 1 and "raw pixels must be 28 x 28" in caught.value.details


def test_the_batch_limit_applies(client: EncoderClient) -> None:
    digits = list(mnist_sample(MAX_BATCH + 1)[0])
    assert len(client.reconstruct(digits[:MAX_BATCH])) == MAX_BATCH
    with pytest.raises(ServiceError) as caught:
        client.reconstruct(digits)
    assert not isinstance(caught.value, BadImage)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"limit is {MAX_BATCH} (--max-batch)" in caught.value.details


class _GoneContext:
    """A servicer context whose deadline has passed: what grpc_errors makes of the refusal is recorded."""

    def time_remaining(self) -> float:
        return 0.0

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RequestError(code, details)


def test_a_call_past_its_deadline_is_abandoned() -> None:
    servicer = EncoderServicer(
        load_runtime(shipped_model("tutorial")), max_batch=8, max_image_bytes=10**6, max_image_pixels=10**6
    )
    request = encoder_pb2.ReconstructRequest(images=[encoder_pb2.Image(encoded=encode(glyph(), "PNG"))])
    with pytest.raises(RequestError) as caught:
        servicer.Reconstruct(request, _GoneContext())  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer._abandoned == 1 and servicer._embedded == 0


def without_decoder(tmp_path: Path, *files: str) -> Path:
    model_dir = tmp_path / "no-decoder"
    model_dir.mkdir()
    for name in ("card.json", *files):
        shutil.copy(shipped_model("tutorial") / name, model_dir / name)
    return model_dir


def test_a_model_without_a_decoder_embeds_but_does_not_reconstruct(tmp_path: Path) -> None:
    model_dir = without_decoder(tmp_path, "encoder.tflite")
    service = start_encoder("--model-dir", str(model_dir))
    try:
        client = EncoderClient(f"127.0.0.1:{service.server.port}", timeout_s=30)
        image = encode(glyph(), "PNG")
        assert client.embed([image]).vectors.shape == (1, 128)
        with pytest.raises(ServiceError) as caught:
            client.reconstruct([image, b"junk"])  # the missing decoder is named before any image is looked at
        client.close()
    finally:
        service.stop(0)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no decoder (decoder.tflite)" in caught.value.details
    assert f"python -m encoder_service.export {model_dir}" in caught.value.details


def test_the_tensorflow_runtime_without_an_autoencoder_does_not_reconstruct(tmp_path: Path) -> None:
    runtime = load_runtime(without_decoder(tmp_path, "encoder.keras", "decoder.tflite"), "tensorflow")
    assert not runtime.has_decoder and runtime.embed(np.zeros((1, 28, 28), np.float32)).shape == (1, 128)
    with pytest.raises(NoDecoderError, match=r"no autoencoder\.keras"):
        runtime.reconstruct(np.zeros((1, 28, 28), np.float32))


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_decoder_is_its_autoencoders(name: str) -> None:
    """decoder(encoder(x)) equals autoencoder(x) in Keras, the shipped decoder.tflite serves the same, and
    the encoder is still the one the card's model version names (adding the decoder changed neither)."""
    import keras

    from encoder_service.model import model_version

    model_dir = shipped_model(name)
    autoencoder = keras.saving.load_model(model_dir / "autoencoder.keras", compile=False)
    encoder = keras.saving.load_model(model_dir / "encoder.keras", compile=False)
    card = load_runtime(model_dir).card
    assert model_version(card["architecture"], encoder) == card["model_version"]
    x = (query_digits(32)[0].astype(np.float32) / 255)[..., None]
    expected = np.asarray(autoencoder(x, training=False))
    decoder = export.split_decoder(autoencoder, encoder)
    assert decoder.input_shape == (None, 128) and decoder.output_shape == (None, 28, 28, 1)
    split = np.asarray(decoder(np.asarray(encoder(x, training=False)), training=False))
    assert np.abs(split - expected).max() < 1e-5  # measured: 0 (the same operations in the same order)
    served = load_runtime(model_dir).reconstruct(x)
    assert np.abs(served - expected[..., 0]).max() < 1e-4  # measured: under 5e-6


def test_the_export_command_adds_a_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = without_decoder(tmp_path, "autoencoder.keras", "encoder.keras", "encoder.tflite")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert export.main([str(model_dir)]) == 0
    assert "wrote decoder.tflite" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name != "decoder.tflite"} == before
    x = query_digits(16)[0].astype(np.float32) / 255
    np.testing.assert_allclose(
        load_runtime(model_dir).reconstruct(x),
        load_runtime(shipped_model("tutorial")).reconstruct(x),
        atol=1e-6,
        rtol=0,
    )


def test_the_export_command_refuses_an_encoder_the_card_does_not_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = without_decoder(tmp_path, "autoencoder.keras", "encoder.tflite")
    shutil.copy(shipped_model("fashion-tutorial") / "encoder.keras", model_dir / "encoder.keras")
    assert export.main([str(model_dir)]) == 1
    assert "but the card names" in capsys.readouterr().err
    assert not (model_dir / "decoder.tflite").exists()
