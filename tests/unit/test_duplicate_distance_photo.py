"""The near-duplicate measurement (encoder_service/duplicate_distance.py) for any input: gray 28x28 copies
are byte for byte what the fixed 28-based sides made (the shipped cards' figures stand), RGB images make RGB
copies scaled by their own size, and `measure` runs on the shipped colour icons through decode_photo. Real
files, real decoding, a fixed random projection for the embedding; a few seconds."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
from PIL import Image

from encoder_service.datasets import load_icons
from encoder_service.duplicate_distance import (
    COPIES,
    MNIST_SAMPLE,
    copy_bytes,
    decoder_for,
    measure,
    png_bytes,
    scaled_size,
)
from encoder_service.preprocess import decode_image

RESIZED = {  # kind: (factor, the side it had at 28x28 before the sides scaled)
    "2x nearest, PNG": (2, 56),
    "10x nearest, PNG": (10, 280),
    "2x Lanczos, PNG": (2, 56),
    "4x bicubic, JPEG q85": (4, 112),
    "0.75x Lanczos, PNG": (0.75, 21),
}
_NEAREST, _LANCZOS, _BICUBIC = Image.Resampling.NEAREST, Image.Resampling.LANCZOS, Image.Resampling.BICUBIC


OLD_WAYS: dict[str, tuple[Image.Resampling, str, dict[str, Any]]] = {
    "2x nearest, PNG": (_NEAREST, "PNG", {}),
    "10x nearest, PNG": (_NEAREST, "PNG", {}),
    "2x Lanczos, PNG": (_LANCZOS, "PNG", {}),
    "4x bicubic, JPEG q85": (_BICUBIC, "JPEG", {"quality": 85}),
    "0.75x Lanczos, PNG": (_LANCZOS, "PNG", {}),
}


def _old_fixed_side(image: Image.Image, kind: str) -> bytes:
    """A resized kind as it was made before, with a fixed side for a 28x28 original."""
    resample, format_name, options = OLD_WAYS[kind]
    side = RESIZED[kind][1]
    buffer = io.BytesIO()
    image.resize((side, side), resample).save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _opened(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode, image.size


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with np.load(MNIST_SAMPLE) as data:
        return np.asarray(data["x"][:3])


@pytest.fixture(scope="module")
def icons() -> np.ndarray:
    return load_icons().x_train[:40]


def test_gray_28x28_copies_are_what_the_fixed_sides_made(digits: np.ndarray) -> None:
    assert digits.shape[1:] == (28, 28) and digits.dtype == np.uint8
    for pixels in digits:
        original = Image.fromarray(pixels, "L")
        for kind, (_, side) in RESIZED.items():
            data = copy_bytes(pixels, kind)
            assert data == _old_fixed_side(original, kind), kind
            assert _opened(data)[1] == (side, side), kind
        for kind in COPIES.keys() - RESIZED.keys():
            assert _opened(copy_bytes(pixels, kind))[1] == (28, 28), kind
    assert _opened(png_bytes(digits[0])) == ("L", (28, 28))
    assert _opened(copy_bytes(digits[0], "JPEG q85"))[0] == "L"
    assert decode_image(copy_bytes(digits[0], "0.75x Lanczos, PNG")).shape == (28, 28)


def test_rgb_copies_are_rgb_and_scaled_by_their_own_size(icons: np.ndarray) -> None:
    assert icons.shape[1:] == (32, 32, 3)
    pixels = icons[0]
    mode, size = _opened(png_bytes(pixels))
    assert (mode, size) == ("RGB", (32, 32))
    with Image.open(io.BytesIO(png_bytes(pixels))) as image:
        assert np.array_equal(np.asarray(image), pixels), "the PNG holds the pixels, colour kept"
    expected = {kind: (side, side) for kind, side in zip(RESIZED, (64, 320, 64, 128, 24), strict=True)}
    for kind in COPIES:
        mode, size = _opened(copy_bytes(pixels, kind))
        assert mode == "RGB", kind
        assert size == expected.get(kind, (32, 32)), kind
    wide = np.ascontiguousarray(icons[1][:24, :])  # [24, 32, 3]: width and height scale each on its own
    assert _opened(copy_bytes(wide, "2x nearest, PNG"))[1] == (64, 48)
    assert _opened(copy_bytes(wide, "0.75x Lanczos, PNG"))[1] == (24, 18)
    assert scaled_size((30, 30), 0.75) == (23, 23), "22.5 rounds half up"
    assert scaled_size((1, 1), 0.75) == (1, 1), "at least a pixel"
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        png_bytes(np.zeros((8, 8, 2), np.uint8))


def test_measure_on_colour_icons_through_decode_photo(icons: np.ndarray, digits: np.ndarray) -> None:
    shape = (32, 32, 3)
    projection = np.random.default_rng(7).standard_normal((math.prod(shape), 32)).astype(np.float32)
    batches: list[tuple[int, ...]] = []

    def embed(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.shape)
        assert batch.dtype == np.float32 and batch.min() >= 0.0 and batch.max() <= 1.0
        return batch.reshape(len(batch), -1) @ projection / 32

    labels = load_icons().y_train[:40]
    m = measure(embed, icons, labels, outside=digits, decode=decoder_for("photo", shape))
    assert all(batch[1:] == shape for batch in batches), "the embed gets the decoded [N, 32, 32, 3] arrays"
    assert m.pool == 40 and m.copied == 40
    assert set(m.copy_distances) == set(COPIES)
    for kind, distances in m.copy_distances.items():
        assert distances.shape == (40,) and np.isfinite(distances).all(), kind
    assert np.isfinite(m.duplicate_distance) and m.duplicate_distance > 0
    assert np.isfinite(m.nothing_close_factor) and m.nothing_close_factor >= 1
    assert m.outside_nearest is not None and len(m.outside_nearest) == len(digits)
    assert np.allclose(m.copy_distances["PNG re-saved as RGB"], 0), "an RGB PNG re-saved as RGB is itself"
    assert m.copy_distances["JPEG q75"].mean() > 0
    entries = m.card_entries("icons")
    assert "decode_photo" in entries["duplicate_distance_measurement"]["path"]


def test_decoder_for_each_preprocessing() -> None:
    assert decoder_for("digits", (28, 28, 1)) is decode_image
    data = png_bytes(np.full((10, 20, 3), (200, 30, 40), np.uint8))
    decoded = decoder_for("photo", (16, 12, 3))(data)
    assert decoded.shape == (16, 12, 3) and decoded.dtype == np.float32
    assert np.allclose(decoded[8, 6], np.array([200, 30, 40]) / 255, atol=0.02), "colour kept"
    with pytest.raises(ValueError, match=r"unknown preprocessing 'fancy'.*'digits', 'photo'"):
        decoder_for("fancy", (28, 28, 1))
    with pytest.raises(ValueError, match="multiple of 4"):
        decoder_for("photo", (30, 30, 3))
