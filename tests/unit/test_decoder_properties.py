"""Property tests of encoder_service.preprocess: whatever bytes or arrays come in, the decoder either
returns the model's input (finite float32 [28, 28] in [0, 1]) or raises ImageError, nothing else.

Every example runs with warnings turned into errors, so a warning that would escape to the caller fails
the test. (One gap: a warning raised inside Pillow's decoding becomes an exception there, which
decode_image's catch-all turns into ImageError; the last test looks at such a warning under the default
filters, and at the filter the service installs against it.) Hypothesis is derandomized and keeps no
example database: the same examples run every time, in about 8 s on 2 cores.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageDraw

from encoder_service.preprocess import (
    MODEL_SIZE,
    ImageError,
    decode_image,
    fit_to_mnist,
    from_raw_pixels,
    quiet_pillow_warnings,
)

T = TypeVar("T")


def bounded(examples: int) -> settings:
    """Repeatable, bounded settings: no deadline (a cold Pillow codec can be slow once), no database."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def strictly(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Calls the function with every warning turned into an exception, so none can escape unnoticed."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(*args, **kwargs)


def assert_model_input(x: object) -> np.ndarray:
    assert isinstance(x, np.ndarray), type(x)
    assert x.dtype == np.float32 and x.shape == (MODEL_SIZE, MODEL_SIZE), (x.dtype, x.shape)
    assert np.isfinite(x).all(), "non-finite values in the model input"
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, (float(x.min()), float(x.max()))
    return x


def decode_or_refuse(data: bytes) -> np.ndarray | None:
    """decode_image's contract: the model input, or exactly ImageError with a message; None if refused."""
    try:
        result = strictly(decode_image, data)
    except ImageError as error:
        assert type(error) is ImageError, f"a subclass of ImageError escaped: {type(error)!r}"
        assert str(error), "ImageError without a message"
        if currently_in_test_context():
            event("refused")  # --hypothesis-show-statistics shows the mix of refused and decoded
        return None
    if currently_in_test_context():
        event("decoded")
    return assert_model_input(result)


# ---------------------------------------------------------------- valid seed images for mutation


def _glyph(mode: str, size: tuple[int, int] = (18, 22)) -> Image.Image:
    """A small '7'-like stroke in the given mode (a few hundred bytes once encoded)."""
    image = Image.new("L", size, 0)
    w, h = size
    ImageDraw.Draw(image).line(
        [(w * 0.2, h * 0.2), (w * 0.8, h * 0.2), (w * 0.4, h * 0.85)], fill=255, width=3
    )
    if mode == "I;16":
        return Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.new("L", size, 200))
        return rgba
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _animated_gif() -> bytes:
    frames = [_glyph("P"), _glyph("P").transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


SEEDS: dict[str, bytes] = {
    "png-L": _encode(_glyph("L"), "PNG"),
    "png-RGBA": _encode(_glyph("RGBA"), "PNG"),
    "png-P": _encode(_glyph("P"), "PNG"),
    "png-I16": _encode(_glyph("I;16"), "PNG"),
    "jpeg-L": _encode(_glyph("L"), "JPEG", quality=80),
    "jpeg-RGB-progressive": _encode(_glyph("RGB"), "JPEG", quality=80, progressive=True),
    "jpeg-CMYK": _encode(_glyph("CMYK"), "JPEG"),
    "gif": _encode(_glyph("P"), "GIF"),
    "gif-animated": _animated_gif(),
    "bmp-RGB": _encode(_glyph("RGB"), "BMP"),
    "bmp-1": _encode(_glyph("1"), "BMP"),
    "bmp-P": _encode(_glyph("P"), "BMP"),
    "webp-lossy": _encode(_glyph("RGB"), "WEBP", quality=70),
    "webp-lossless-RGBA": _encode(_glyph("RGBA"), "WEBP", lossless=True),
    "tiff-raw-L": _encode(_glyph("L"), "TIFF"),
    "tiff-lzw-RGB": _encode(_glyph("RGB"), "TIFF", compression="tiff_lzw"),
    "tiff-deflate-I16": _encode(_glyph("I;16"), "TIFF", compression="tiff_adobe_deflate"),
    "tiff-packbits-1": _encode(_glyph("1"), "TIFF", compression="packbits"),
}

# Values that tend to matter in headers: sizes, offsets, counts and lengths at their edges.
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def _position(draw: st.DrawFn, length: int) -> int:
    """A byte position, half the time in the first 64 bytes, where the headers are."""
    if length <= 1:
        return 0
    head = min(length, 64) - 1
    return draw(st.one_of(st.integers(0, head), st.integers(0, length - 1)))


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed image with 1 to 4 byte-level mutations: flips, overwrites, truncation, insertion,
    deletion and duplication of a span."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "set", "word", "truncate", "insert", "delete", "duplicate"]))
        at = draw(_position(len(data)))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.integers(0, 255))
        elif kind == "word":
            size = draw(st.sampled_from([2, 4]))
            value = draw(st.sampled_from(_INTERESTING)) & ((1 << (8 * size)) - 1)
            big_endian = draw(st.booleans())
            data[at : at + size] = value.to_bytes(size, "big" if big_endian else "little")
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        else:
            span = bytes(data[at : at + draw(st.integers(1, 64))])
            data[at:at] = span
    return bytes(data)


# ---------------------------------------------------------------- decode_image


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_image_decodes(name: str) -> None:
    """The mutation seeds are valid: otherwise the mutation test would only ever see refusals."""
    x = decode_or_refuse(SEEDS[name])
    assert x is not None, f"the seed {name} was refused"
    assert float(x.max()) > 0.5, f"the seed {name} decoded without ink"


@bounded(400)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_image_error(data: bytes) -> None:
    decode_or_refuse(data)


@bounded(200)
@given(
    st.sampled_from(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF", b"II*\x00", b"MM\x00*"]
    ),
    st.binary(max_size=512),
)
def test_a_format_signature_then_arbitrary_bytes(magic: bytes, rest: bytes) -> None:
    """Random bytes rarely get past format detection; these start with each accepted format's magic."""
    decode_or_refuse(magic + rest)


@bounded(900)
@given(mutated_images())
def test_mutated_valid_images_decode_or_raise_image_error(data: bytes) -> None:
    decode_or_refuse(data)


# ---------------------------------------------------------------- from_raw_pixels


_sizes = st.one_of(st.just(MODEL_SIZE), st.integers(0, 64), st.integers(-(2**31), 2**32))


@bounded(300)
@given(
    _sizes,
    _sizes,
    st.one_of(st.binary(min_size=784, max_size=784), st.binary(max_size=1024)),
)
def test_raw_pixels_of_any_size_give_the_model_input_or_raise_image_error(
    height: int, width: int, pixels: bytes
) -> None:
    try:
        x = strictly(from_raw_pixels, height, width, pixels)
    except ImageError as error:
        assert type(error) is ImageError and str(error)
        assert (height, width) != (MODEL_SIZE, MODEL_SIZE) or len(pixels) != MODEL_SIZE * MODEL_SIZE
        return
    assert (height, width) == (MODEL_SIZE, MODEL_SIZE) and len(pixels) == MODEL_SIZE * MODEL_SIZE
    assert_model_input(x)
    expected = np.frombuffer(pixels, np.uint8).reshape(MODEL_SIZE, MODEL_SIZE).astype(np.float32) / 255
    np.testing.assert_array_equal(x, expected)


# ---------------------------------------------------------------- fit_to_mnist


# Any finite value, however large, of either sign: float32 arrays up to float32's limit, float64 arrays
# far past it (fit_to_mnist clips to [0, 1] before its float32 cast).
_finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
_finite64 = st.floats(allow_nan=False, allow_infinity=False)
_shapes = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=96)


@bounded(300)
@given(
    st.one_of(
        hnp.arrays(np.float32, _shapes, elements=_finite32),
        hnp.arrays(np.float64, _shapes, elements=_finite64),
        hnp.arrays(np.uint8, _shapes),
    )
)
def test_fit_to_mnist_on_any_finite_2d_array_gives_the_model_input(image: np.ndarray) -> None:
    assert_model_input(strictly(fit_to_mnist, image))


@bounded(200)
@given(hnp.arrays(np.float32, _shapes, elements=st.floats(0.0, 1.0, width=32)))
def test_fit_to_mnist_keeps_ink_and_its_absence(image: np.ndarray) -> None:
    """In the documented domain ([0, 1]): a blank image stays blank, a 28x28 one is kept as it is."""
    x = assert_model_input(strictly(fit_to_mnist, image))
    if not image.any():
        assert not x.any()
    elif image.shape == (MODEL_SIZE, MODEL_SIZE):
        np.testing.assert_array_equal(x, image)


# ---------------------------------------------------------------- known defects, pinned
# Found by the properties above, and fixed: fit_to_mnist clips before its float32 cast.
@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.array([[0, 1], [0, 1], [1, 1]], np.float32) * np.float32(3e38), id="float32-3e38"),
        pytest.param(np.full((2, 30), 1e300), id="float64-over-float32-range"),
    ],
)
def test_fit_to_mnist_on_values_near_float32s_limit(image: np.ndarray) -> None:
    assert_model_input(strictly(fit_to_mnist, image))


def test_pillows_warnings_about_odd_files_are_quieted_in_the_service() -> None:
    """A TIFF with corrupt EXIF decodes; Pillow warns about it (a UserWarning from PIL), which the
    service's quiet_pillow_warnings() filter, installed at start, keeps out of its log."""
    data = bytearray(SEEDS["tiff-raw-L"])
    data[8] = 0xFF  # the first IFD claims 255 entries (it has 9): "Corrupt EXIF data"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_model_input(decode_image(bytes(data)))
    assert caught and all(w.category is UserWarning and "PIL" in w.filename for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_pillow_warnings()
        assert_model_input(decode_image(bytes(data)))
    assert not caught
