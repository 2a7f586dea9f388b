"""The `photo` preprocessing (encoder_service/photo.py): colour kept, padding with the border colour, any
input size, alpha on white, EXIF orientation, raw pixels, and the digits path's guards."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoder_service.photo import decode_photo, fit_photo, from_raw_photo
from encoder_service.preprocess import ImageError


def encoded(image: Image.Image, format_name: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format_name, **options)
    return buffer.getvalue()


def circle(size: tuple[int, int], background: tuple[int, int, int], ink: tuple[int, int, int]) -> Image.Image:
    width, height = size
    y, x = np.mgrid[:height, :width]
    inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(size) / 3) ** 2
    pixels = np.where(inside[..., None], np.array(ink, np.uint8), np.array(background, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8))


def test_a_circle_on_a_coloured_background_keeps_its_colours_and_shape() -> None:
    x = decode_photo(encoded(circle((120, 80), (40, 120, 200), (250, 200, 0))), (32, 32, 3))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[0, 0], np.array([40, 120, 200]) / 255, atol=0.01)  # padded with the border
    np.testing.assert_allclose(x[16, 16], np.array([250, 200, 0]) / 255, atol=0.01)  # the circle's colour
    mid = x[16]  # the circle is round, not a full square: background left and right of it on its row
    assert np.allclose(mid[2], np.array([40, 120, 200]) / 255, atol=0.02)


@pytest.mark.parametrize("shape", [(32, 32, 3), (64, 64, 3), (28, 28, 1), (24, 48, 3)])
def test_any_input_shape(shape: tuple[int, int, int]) -> None:
    x = decode_photo(encoded(circle((50, 90), (10, 10, 10), (200, 30, 30)), "JPEG", quality=90), shape)
    assert x.shape == shape


def test_alpha_is_composited_onto_white_and_palettes_decode() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    x = decode_photo(encoded(rgba), (20, 20, 3))
    np.testing.assert_allclose(x[0, 0], [1, 1, 1], atol=0.01)
    np.testing.assert_allclose(x[10, 10], [0, 0, 1], atol=0.02)
    palette = circle((30, 30), (0, 255, 0), (255, 0, 255)).convert("P")
    assert decode_photo(encoded(palette, "GIF"), (16, 16, 3))[0, 0][1] > 0.9


def test_exif_orientation_turns_the_image_upright() -> None:
    image = Image.new("RGB", (60, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    x = decode_photo(encoded(image, "JPEG", quality=95, exif=exif.tobytes()), (30, 30, 3))
    column = x[:, 15]  # the middle column: red at the top once upright
    assert column[:8, 0].mean() > 0.8 and column[:8, 1].mean() < 0.3


def test_sixteen_bit_gray_and_raw_pixels() -> None:
    gray = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    x = decode_photo(encoded(Image.fromarray(gray)), (8, 8, 3))
    assert x.shape == (8, 8, 3) and np.allclose(x[..., 0], x[..., 2])
    raw = np.arange(4 * 4 * 3, dtype=np.uint8).tobytes()
    assert from_raw_photo(4, 4, 3, raw, (4, 4, 3)).shape == (4, 4, 3)
    with pytest.raises(ImageError, match="raw pixels must be 4 x 4 x 3"):
        from_raw_photo(4, 4, 1, raw[:16], (4, 4, 3))


def test_bad_images_are_refused_as_the_digits_path_does() -> None:
    with pytest.raises(ImageError, match="empty"):
        decode_photo(b"", (32, 32, 3))
    with pytest.raises(ImageError):
        decode_photo(b"not an image", (32, 32, 3))
    big = encoded(Image.new("RGB", (3000, 3000)))
    with pytest.raises(ImageError, match="pixels"):
        decode_photo(big, (32, 32, 3), max_pixels=1_000_000)


def test_fit_photo_of_a_square_keeps_it_whole() -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (255, 0, 0)
    x = fit_photo(rgb, 8, 8)
    assert x[:, :4, 0].min() > 0.9 and x[:, 4:, 0].max() < 0.1
