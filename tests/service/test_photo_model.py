"""A `photo` model served: colour images of any size in, through both runtimes, raw RGB pixels checked
against the model's input shape, and Reconstruct in colour. The model is built here (untrained: the
shapes and the path are what is tested, not its quality)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_service.service import EncoderService
from imgsearch.client import BadImage, EncoderClient
from tests.support import address, serve, start_encoder, write_photo_model

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photo_model(tmp_path_factory.mktemp("photo-model"), SHAPE)


@pytest.fixture(scope="module", params=["litert", "tensorflow"])
def encoder(request: pytest.FixtureRequest, photo_model: Path) -> Iterator[EncoderService]:
    yield from serve(start_encoder("--models", f"photo={photo_model},default", "--runtime", request.param))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def scene(seed: int, size: tuple[int, int] = (90, 60)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    top, left = rng.integers(5, 25, 2)
    pixels[top : top + 20, left : left + 30] = rng.integers(0, 255, 3)
    return pixels


def test_colour_images_of_any_size_embed_and_both_runtimes_agree(
    encoder: EncoderService, photo_model: Path
) -> None:
    images = [png(scene(n, size)) for n, size in enumerate([(90, 60), (32, 32), (300, 500), (17, 41)])]
    with closing(EncoderClient(address(encoder))) as client:
        embedding = client.embed(images, "photo")
        assert embedding.vectors.shape == (4, 128) and embedding.model == "photo"
        info = {m["name"]: m for m in client.info()["models"]}
        assert info["photo"]["input_shape"] == list(SHAPE)
    from encoder_service.photo import decode_photo
    from encoder_service.runtime import load_runtime

    other = load_runtime(
        photo_model, "tensorflow" if encoder.runtimes["photo"].name == "litert" else "litert"
    )
    direct = other.embed(np.stack([decode_photo(image, SHAPE) for image in images]))
    np.testing.assert_allclose(embedding.vectors, direct, atol=1e-4)


def test_raw_rgb_pixels_must_be_the_models_shape(encoder: EncoderService) -> None:
    raw = scene(3, (32, 32))
    with closing(EncoderClient(address(encoder))) as client:
        from_raw = client.embed([raw], "photo").vectors
        from_png = client.embed([png(raw)], "photo").vectors
        np.testing.assert_allclose(from_raw, from_png, atol=1e-5)  # a 32x32 PNG is taken as it is
        with pytest.raises(BadImage, match=r"raw pixels must be 32 x 32 x 3 .* got 32 x 32 x 1"):
            client.embed([raw[..., 0]], "photo")
        with pytest.raises(BadImage, match=r"raw pixels must be 28 x 28 x 1 .* got 32 x 32 x 3"):
            client.embed([raw], "default")  # the digits model beside it keeps its own shape


def test_reconstruct_in_colour(encoder: EncoderService) -> None:
    with closing(EncoderClient(address(encoder))) as client:
        (item,) = client.reconstruct([png(scene(5))], "photo")
        assert item.input.shape == SHAPE and item.output.shape == SHAPE and item.input.dtype == np.uint8
        (digit,) = client.reconstruct([png(scene(5))], "default")
        assert digit.input.shape == (28, 28)


def test_a_digits_model_of_another_shape_is_still_refused(tmp_path: Path, photo_model: Path) -> None:
    card = json.loads((photo_model / "card.json").read_text())
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for path in photo_model.iterdir():
        (wrong / path.name).write_bytes(path.read_bytes())
    (wrong / "card.json").write_text(json.dumps({**card, "preprocess": "digits"}))
    with pytest.raises((ValueError, SystemExit), match="digits preprocessing makes every image 28 x 28 x 1"):
        start_encoder("--model-dir", str(wrong))
