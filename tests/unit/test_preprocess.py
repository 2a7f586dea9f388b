"""Tests for encoder_service.preprocess: every format and mode, polarity, MNIST fitting, and refusals."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageOps

from encoder_service.preprocess import (
    MODEL_SIZE,
    ImageError,
    decode_image,
    fit_to_mnist,
    from_raw_pixels,
)

# ---------------------------------------------------------------- helpers


def glyph(
    width: int = 120, height: int = 150, stroke: int = 14, offset: tuple[int, int] = (0, 0)
) -> Image.Image:
    """A digit-like '7' with a bar: thick white strokes on black, mode 'L'."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    dx, dy = offset
    w, h = width // 2, height // 2
    top, bottom = dy + height // 4, dy + 3 * height // 4
    left, right = dx + width // 4, dx + 3 * width // 4
    draw.line([(left, top), (right, top), (left + w // 5, bottom)], fill=255, width=stroke, joint="curve")
    draw.line([(left + w // 4, dy + h), (right - w // 8, dy + h)], fill=255, width=max(1, stroke // 2))
    return image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    total = x.sum()
    rows, cols = np.arange(x.shape[0]), np.arange(x.shape[1])
    return float(x.sum(axis=1) @ rows / total), float(x.sum(axis=0) @ cols / total)


def ink_box_size(x: np.ndarray) -> tuple[int, int]:
    ink = x > 0.1 * x.max()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def assert_model_input(x: np.ndarray) -> None:
    assert x.shape == (MODEL_SIZE, MODEL_SIZE)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bilevel(width: int, height: int) -> bytes:
    """A real, valid all-black 1-bit PNG, built row by row so a huge one costs little time or memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


REFERENCE = glyph()
REFERENCE_INPUT = decode_image(encode(REFERENCE, "PNG"))


# ---------------------------------------------------------------- every format and mode


def _transparent_canvas(mode: str) -> Callable[[Image.Image], Image.Image]:
    """Dark strokes on a fully transparent canvas: the alpha is the glyph, the colour is black."""

    def make(image: Image.Image) -> Image.Image:
        black = Image.new("L", image.size, 0)
        return Image.merge("LA", (black, image)).convert(mode)

    return make


def _paletted(image: Image.Image) -> Image.Image:
    """A real palette image: the grey palette of an 'L' image with one unused entry made red."""
    paletted = image.convert("P")
    palette = paletted.getpalette() or []
    palette[3 * 128 : 3 * 128 + 3] = [255, 0, 0]
    paletted.putpalette(palette)
    return paletted


def _p_with_transparency(image: Image.Image) -> Image.Image:
    """Palette image: background index 0 black but transparent, strokes index 1 opaque near-black."""
    indices = (np.asarray(image) > 127).astype(np.uint8)
    paletted = Image.frombytes("P", image.size, indices.tobytes())
    paletted.putpalette([0, 0, 0, 1, 1, 1])
    paletted.info["transparency"] = 0
    return paletted


CASES: dict[str, tuple[str, Callable[[Image.Image], Image.Image], dict[str, object], str, float]] = {
    # id: (format, how to make the image, save params, mode Pillow reopens it as, max mean abs diff)
    "png-L": ("PNG", lambda im: im, {}, "L", 0.0),
    "png-RGB": ("PNG", lambda im: im.convert("RGB"), {}, "RGB", 0.0),
    "png-RGBA-opaque": ("PNG", lambda im: im.convert("RGBA"), {}, "RGBA", 0.0),
    "png-RGBA-transparent": ("PNG", _transparent_canvas("RGBA"), {}, "RGBA", 0.005),
    "png-LA-transparent": ("PNG", _transparent_canvas("LA"), {}, "LA", 0.005),
    "png-P": ("PNG", _paletted, {}, "P", 0.0),
    "png-P-transparency": ("PNG", _p_with_transparency, {}, "P", 0.005),
    "png-I16": ("PNG", lambda im: Image.fromarray(np.asarray(im).astype(np.uint16) * 257), {}, "I;16", 0.0),
    "png-1": ("PNG", lambda im: im.convert("1"), {}, "1", 0.0),
    "jpeg-L": ("JPEG", lambda im: im, {"quality": 90}, "L", 0.01),
    "jpeg-RGB": ("JPEG", lambda im: im.convert("RGB"), {"quality": 90}, "RGB", 0.01),
    "jpeg-CMYK": ("JPEG", lambda im: im.convert("RGB").convert("CMYK"), {"quality": 90}, "CMYK", 0.01),
    "bmp-L": ("BMP", lambda im: im, {}, "L", 0.0),
    "bmp-RGB": ("BMP", lambda im: im.convert("RGB"), {}, "RGB", 0.0),
    "bmp-P": ("BMP", _paletted, {}, "P", 0.0),
    "bmp-1": ("BMP", lambda im: im.convert("1"), {}, "1", 0.0),
    "gif-from-L": ("GIF", lambda im: im, {}, "P", 0.0),
    "gif-P": ("GIF", _paletted, {}, "P", 0.0),
    "gif-P-transparency": ("GIF", _p_with_transparency, {}, "P", 0.005),
    "webp-RGB": ("WEBP", lambda im: im.convert("RGB"), {"lossless": True}, "RGB", 0.0),
    "webp-RGB-lossy": ("WEBP", lambda im: im.convert("RGB"), {"quality": 90}, "RGB", 0.01),
    "webp-RGBA-transparent": ("WEBP", _transparent_canvas("RGBA"), {"lossless": True}, "RGBA", 0.005),
    "tiff-L": ("TIFF", lambda im: im, {}, "L", 0.0),
    "tiff-RGB": ("TIFF", lambda im: im.convert("RGB"), {}, "RGB", 0.0),
    "tiff-RGBA-transparent": ("TIFF", _transparent_canvas("RGBA"), {}, "RGBA", 0.005),
    "tiff-CMYK": ("TIFF", lambda im: im.convert("RGB").convert("CMYK"), {}, "CMYK", 0.0),
    "tiff-I16": ("TIFF", lambda im: Image.fromarray(np.asarray(im).astype(np.uint16) * 257), {}, "I;16", 0.0),
    "tiff-I": ("TIFF", lambda im: Image.fromarray(np.asarray(im).astype(np.int32) * 257), {}, "I", 0.0),
    "tiff-F": ("TIFF", lambda im: Image.fromarray(np.asarray(im).astype(np.float32)), {}, "F", 0.0),
    "tiff-1": ("TIFF", lambda im: im.convert("1"), {}, "1", 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_format_and_mode_gives_the_same_glyph(case: str) -> None:
    fmt, make, params, reopened_mode, tolerance = CASES[case]
    data = encode(make(REFERENCE), fmt, **params)
    with Image.open(io.BytesIO(data)) as check:
        assert (check.format, check.mode) == (fmt, reopened_mode)  # we test the mode we think we test
        if "transparen" in case:  # and its transparency: without compositing it would be all black
            assert "A" in check.mode or "transparency" in check.info
    x = decode_image(data)
    assert_model_input(x)
    assert x.max() > 0.5  # ink present
    assert float(np.abs(x - REFERENCE_INPUT).mean()) <= tolerance + 1e-6


def test_float_tiff_is_clipped_to_0_255() -> None:
    values = np.asarray(REFERENCE, dtype=np.float32) * 4.0 - 300.0  # -300..720
    values[0, 0] = np.nan
    x = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert_model_input(x)
    assert x.max() == 1.0


def test_sixteen_bit_uses_the_full_16_bit_range() -> None:
    dim = Image.fromarray(np.asarray(REFERENCE).astype(np.uint16))  # ink at 255 of 65535: nearly black
    x = decode_image(encode(dim, "PNG"))
    assert_model_input(x)
    assert 0.0 < x.max() <= 2.0 / 255.0  # 1/255, plus the resampling filter's overshoot


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after rotating 90 degrees clockwise
    stored = REFERENCE.transpose(Image.Transpose.ROTATE_90)
    x = decode_image(encode(stored, "PNG", exif=exif.tobytes()))
    np.testing.assert_array_equal(x, REFERENCE_INPUT)


# ---------------------------------------------------------------- 28x28 and raw pixels


def test_28x28_png_equals_raw_pixels_bit_for_bit() -> None:
    small = glyph(28, 28, stroke=3, offset=(1, 0))
    pixels = small.tobytes()
    from_png = decode_image(encode(small, "PNG"))
    from_raw = from_raw_pixels(28, 28, pixels)
    assert from_png.dtype == from_raw.dtype == np.float32
    assert np.array_equal(from_png, from_raw)
    assert np.array_equal(from_raw, np.frombuffer(pixels, np.uint8).reshape(28, 28).astype(np.float32) / 255)


def test_28x28_is_taken_as_it_is_without_refitting() -> None:
    corner = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(corner).rectangle((1, 1, 6, 6), fill=255)
    x = decode_image(encode(corner, "PNG"))
    assert np.array_equal(x, np.asarray(corner, dtype=np.float32) / 255)


def test_raw_pixels_are_not_inverted() -> None:
    white = from_raw_pixels(28, 28, b"\xff" * 784)
    assert_model_input(white)
    assert (white == 1.0).all()


@pytest.mark.parametrize(
    ("height", "width", "size", "expected"),
    [
        (28, 28, 783, "expected 784 bytes for 28 x 28, got 783"),
        (28, 28, 0, "expected 784 bytes for 28 x 28, got 0"),
        (27, 28, 756, "must be 28 x 28, got 27 x 28"),
        (64, 64, 4096, "must be 28 x 28, got 64 x 64"),
    ],
)
def test_raw_pixels_of_the_wrong_size_are_refused(height: int, width: int, size: int, expected: str) -> None:
    with pytest.raises(ImageError, match=expected):
        from_raw_pixels(height, width, b"\x00" * size)


# ---------------------------------------------------------------- polarity


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_black_on_white_gives_the_same_as_white_on_black(fmt: str) -> None:
    dark_on_light = decode_image(encode(ImageOps.invert(REFERENCE), fmt))
    light_on_dark = decode_image(encode(REFERENCE, fmt))
    assert float(np.abs(dark_on_light - light_on_dark).max()) <= 0.05


def test_black_on_white_28x28_is_inverted_too() -> None:
    small = glyph(28, 28, stroke=3)
    x = decode_image(encode(ImageOps.invert(small), "PNG"))
    assert np.array_equal(x, from_raw_pixels(28, 28, small.tobytes()))


# ---------------------------------------------------------------- fitting the MNIST way


@pytest.mark.parametrize(
    ("width", "height", "offset"),
    [(1200, 900, (-350, 200)), (300, 500, (60, -120)), (45, 60, (5, 3)), (14, 11, (2, 1)), (29, 29, (-6, 6))],
)
def test_fitted_glyph_is_centred_in_a_20_pixel_box(width: int, height: int, offset: tuple[int, int]) -> None:
    stroke = max(2, min(width, height) // 10)
    x = decode_image(encode(glyph(width, height, stroke=stroke, offset=offset), "PNG"))
    assert_model_input(x)
    centre_y, centre_x = centre_of_mass(x)
    assert abs(centre_y - 14) <= 1 and abs(centre_x - 14) <= 1
    assert max(ink_box_size(x)) in (19, 20, 21)


def test_fit_keeps_the_aspect_ratio_of_a_thin_stroke() -> None:
    bar = np.zeros((100, 400), np.float32)
    bar[40:60, 50:350] = 1.0  # 20 x 300
    x = fit_to_mnist(bar)
    height, width = ink_box_size(x)
    assert width == 20 and height in (1, 2, 3)


def test_fit_of_an_image_without_ink_is_black() -> None:
    assert np.array_equal(fit_to_mnist(np.zeros((50, 70), np.float32)), np.zeros((28, 28), np.float32))


def test_fit_refuses_a_non_2d_array() -> None:
    with pytest.raises(ImageError, match="2-D"):
        fit_to_mnist(np.zeros((28, 28, 3), np.float32))


@pytest.mark.parametrize(
    ("size", "value"), [((1, 1), 0), ((1, 1), 255), ((1, 1), 90), ((5000, 3), None), ((3, 5000), None)]
)
def test_tiny_and_very_thin_images_decode(size: tuple[int, int], value: int | None) -> None:
    if value is None:
        image = Image.new("L", size, 0)
        ImageDraw.Draw(image).line([(0, 0), (size[0] - 1, size[1] - 1)], fill=255)
    else:
        image = Image.new("L", size, value)
    x = decode_image(encode(image, "PNG"))
    assert_model_input(x)


# ---------------------------------------------------------------- multi-frame


def test_animated_gif_takes_the_first_frame() -> None:
    first = glyph()
    second = ImageOps.mirror(glyph(stroke=30))
    animation = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(io.BytesIO(animation)) as check:
        assert getattr(check, "n_frames", 1) == 2
    x = decode_image(animation)
    assert np.array_equal(x, decode_image(encode(first, "GIF")))
    assert not np.allclose(x, decode_image(encode(second, "GIF")), atol=0.1)


# ---------------------------------------------------------------- refusals


def test_empty_image() -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(b"")
    assert str(caught.value) == "empty image"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(5000), id="random"),
        pytest.param(PNG_SIGNATURE + np.random.default_rng(1).bytes(100), id="png-signature-then-noise"),
        pytest.param(encode(REFERENCE, "PNG")[:300], id="truncated-png"),
        pytest.param(encode(REFERENCE, "PNG")[:-20], id="png-without-end"),
        pytest.param(encode(REFERENCE, "JPEG")[:400], id="truncated-jpeg"),
        pytest.param(encode(REFERENCE.convert("RGB"), "GIF")[:200], id="truncated-gif"),
        pytest.param(encode(REFERENCE, "TIFF")[:500], id="truncated-tiff"),
    ],
)
def test_undecodable_bytes_are_refused(data: bytes) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert str(caught.value).startswith("cannot decode image: ")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_formats_outside_the_list_are_refused(fmt: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(encode(REFERENCE.convert("RGB").resize((64, 64)), fmt))
    assert str(caught.value) == "cannot decode image: not a PNG, JPEG, BMP, GIF, WebP or TIFF file"


def test_bomb_is_refused_from_the_header_before_decoding() -> None:
    bomb = png_bilevel(8000, 8000)  # 64 M pixels: over our 40 M default, under Pillow's own limit
    assert len(bomb) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        decode_image(bomb)
    assert str(caught.value) == "image is 8000 x 8000 = 64000000 pixels, over the limit of 40000000 pixels"
    assert time.perf_counter() - started < 0.5


def test_huge_bomb_is_refused_quickly() -> None:
    bomb = png_bilevel(20000, 20000)  # 400 M pixels in well under 1 MB
    assert len(bomb) < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageError, match="pixels"):
        decode_image(bomb)
    assert time.perf_counter() - started < 0.5


def test_max_pixels_is_honoured() -> None:
    data = encode(REFERENCE, "PNG")
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=17_999)
    assert str(caught.value) == "image is 120 x 150 = 18000 pixels, over the limit of 17999 pixels"
    assert_model_input(decode_image(data, max_pixels=18_000))


def test_pillow_bomb_warning_becomes_an_error_not_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # warns over 10 k, errors over 20 k
    data = encode(REFERENCE, "PNG")  # 18 k pixels: Pillow would only warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(data, max_pixels=10**9)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_concurrent_decodes_agree_and_leave_warning_filters_alone() -> None:
    before = list(warnings.filters)
    images = [encode(glyph(offset=(k, -k)), "PNG") for k in range(8)] + [png_bilevel(8000, 8000)]

    def run(data: bytes) -> bytes | str:
        try:
            return decode_image(data).tobytes()
        except ImageError as exc:
            return str(exc)

    expected = [run(data) for data in images]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, images * 4))
    assert results == expected * 4
    assert warnings.filters == before
