"""Turn user images into the model's input: float32 [28, 28] in [0, 1], white ink on black, like MNIST.

Only numpy, Pillow and the standard library: no gRPC or TensorFlow here. See docs/PREPROCESSING.md.

Memory: a decode holds Pillow's decoded first frame and one 8-bit gray copy of it, and never a full-size
float copy (conversions and the first resampling pass run a tile at a time), so its peak is about
`ImageHeader.decode_bytes`: 2 bytes a pixel for an 8-bit PNG, more for colour, 16-bit and WebP.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

MODEL_SIZE = 28
GLYPH_SIZE = 20  # the longer side of the ink's bounding box after fitting, as in MNIST
INK_FRACTION = 0.1  # a pixel is ink when it is above this fraction of the image's maximum
LIGHT_BORDER = 128  # a border median at or above this means a light background: invert

# The formats decode_image accepts; everything else Pillow could open (EPS, PSD, ...) is refused.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# Image.open runs Pillow's own bomb check against the process-wide Image.MAX_IMAGE_PIXELS; _open turns it
# off for the header read so that our limit speaks first, and the lock keeps concurrent opens from
# seeing each other's setting (every Image.open here holds it; it reads the header only).
_PILLOW_LOCK = threading.Lock()

# Conversions to gray and the first resampling pass work on tiles of at most this many pixels, so their
# temporaries (a tile in Pillow's mode, RGBA copies, float32) stay a few MiB whatever the image's size.
TILE_PIXELS = 1 << 18

# What a decode holds at its peak, per pixel (measured with VmHWM on 4000 x 4000 images of every format
# and mode: docs/PREPROCESSING.md, "Memory"). While decoding: Pillow's frame (a byte a pixel for "1",
# "L" and "P", two for 16-bit, four for the rest) and our 8-bit gray copy, plus what some decoders hold
# besides (_decoder_bytes); while turning an EXIF-oriented image upright: three gray copies; while
# fitting: the gray copy and a few float32 rows or columns.
_FRAME_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_WEBP_BYTES = 16  # libwebp's decoder and its two animation canvases, and Pillow's copy of the frame
_RLE_BMP_BYTES = 2  # Pillow's BMP RLE decoder builds the frame in a bytearray, then copies it
_ORIENTED_BYTES = 3
_TILE_BYTES = 16  # per pixel of a tile: its crop, RGBA or float64 copies, its gray values
_FIXED_BYTES = 4 * 1024 * 1024  # Pillow's and the decoders' own small buffers


class ImageError(ValueError):
    """An input that cannot be turned into a model input; str() says what was wrong.

    `oversize` is (width, height) when the refusal is the per-image pixel limit (nothing was decoded),
    so a service can word that refusal with its own flag's name; None for every other refusal."""

    def __init__(self, message: str, *, oversize: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.oversize = oversize


@dataclass(frozen=True)
class ImageHeader:
    """What Pillow's header read tells before decoding, and the peak memory the decode will take."""

    width: int
    height: int
    format: str
    mode: str
    decode_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


Admit = Callable[[ImageHeader], AbstractContextManager[object]]


def quiet_pillow_warnings() -> None:
    """Ignores Pillow's UserWarnings (corrupt EXIF and the like) process-wide: the image still decodes,
    and a service should not print a line for every odd file a user sends. Called by the service."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def raise_pillow_limit(max_pixels: int) -> None:
    """Lets Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) admit images up to `max_pixels`, so that a
    service's own limit, when it is the larger, decides; never lowers it. The guard still refuses, in any
    Pillow path, what is over both."""
    with _PILLOW_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, *, max_pixels: int = 40_000_000, admit: Admit | None = None) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, GIF, WebP, TIFF) into the model's [28, 28] input.

    `admit`, when given, is called with the image's header after the size checks and before any pixel
    is decoded; the context manager it returns is held until the image is fitted. What it raises passes
    through unchanged (a service's memory budget refusing the image)."""
    if not data:
        raise ImageError("empty image")
    image = _open(bytes(data), max_pixels)
    try:
        with admit(_header(image)) if admit is not None else nullcontext():
            return _fit_gray(_make_ink_high(_decode_gray(image)))
    finally:
        image.close()


def from_raw_pixels(height: int, width: int, pixels: bytes) -> np.ndarray:
    """Take 28x28 uint8 pixels as they are (0 background, 255 ink) and scale them to [0, 1]."""
    if (height, width) != (MODEL_SIZE, MODEL_SIZE):
        raise ImageError(f"raw pixels must be {MODEL_SIZE} x {MODEL_SIZE}, got {height} x {width}")
    if len(pixels) != height * width:
        expected = height * width
        raise ImageError(f"raw pixels: expected {expected} bytes for {height} x {width}, got {len(pixels)}")
    return _to_unit(np.frombuffer(pixels, dtype=np.uint8).reshape(height, width))


def fit_to_mnist(gray: np.ndarray) -> np.ndarray:
    """Fit a 2-D ink-is-high image in [0, 1] into [28, 28] the MNIST way (a 28x28 input is kept as it is)."""
    values = np.asarray(gray)
    if values.ndim != 2 or values.size == 0:
        raise ImageError(f"expected a non-empty 2-D image, got shape {values.shape}")
    # clip before the float32 cast: out-of-range values would overflow it and Lanczos' arithmetic
    return _fit(np.clip(np.nan_to_num(values.astype(np.float64), nan=0.0), 0.0, 1.0).astype(np.float32))


def _fit(image: np.ndarray) -> np.ndarray:
    """fit_to_mnist of a new 2-D float32 array already in [0, 1] (so a 28x28 one is returned as it is)."""
    if image.shape == (MODEL_SIZE, MODEL_SIZE):
        return image
    box = _ink_box(image)
    if box is None:
        return np.clip(_resize(image, MODEL_SIZE, MODEL_SIZE, Image.Resampling.BOX), 0.0, 1.0)
    glyph = _resize_longer_side(image[box], GLYPH_SIZE)
    return _paste_centred(np.clip(glyph, 0.0, 1.0))


def _fit_gray(gray: np.ndarray) -> np.ndarray:
    """_fit(_to_unit(gray)), bit for bit, for an 8-bit gray image, without its full-size float copy."""
    if gray.shape == (MODEL_SIZE, MODEL_SIZE):
        return _to_unit(gray)
    box = _ink_box_gray(gray)
    if box is None:  # all zero: the box filter of zeros is zeros
        return np.zeros((MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    crop = gray[box]
    height, width = _longer_side_size(crop.shape, GLYPH_SIZE)
    return _paste_centred(np.clip(_lanczos_of_gray(crop, height, width), 0.0, 1.0))


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header; refuse the image, before any pixel is decoded, when its size is over max_pixels
    (an ImageError with `oversize`) or over Pillow's own bomb guard, Image.MAX_IMAGE_PIXELS."""
    try:
        with _PILLOW_LOCK:
            pillow_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # Pillow's check would pre-empt ours: it runs below instead
            try:
                image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot decode image: not a {_FORMAT_NAMES} file") from exc
    except Exception as exc:  # Pillow's plugins raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"cannot decode image: {exc}") from exc
    width, height = image.size
    pixels = max(1, width) * max(1, height)
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels} pixels",
            oversize=(width, height),
        )
    if pillow_limit is not None and pixels > pillow_limit:  # where Pillow would warn: refused, as an error
        image.close()
        raise ImageError(
            f"image refused as a possible decompression bomb: Image size ({pixels} pixels) exceeds limit "
            f"of {pillow_limit} pixels (Image.MAX_IMAGE_PIXELS)"
        )
    return image


def _header(image: Image.Image) -> ImageHeader:
    """The image's size, format and mode, and the peak bytes its decode takes (see _FRAME_BYTES)."""
    width, height = image.size
    pixels = width * height
    frame = _FRAME_BYTES.get(image.mode, 4)
    decoding = pixels * (frame + 1) + _decoder_bytes(image, frame)
    turning = pixels * _ORIENTED_BYTES if _may_be_oriented(image) else 0
    fitting = pixels + 8 * (GLYPH_SIZE + 1) * max(width, height)  # float32 strips, ours and Pillow's
    peak = max(decoding, turning, fitting) + _TILE_BYTES * min(pixels, TILE_PIXELS) + _FIXED_BYTES
    return ImageHeader(width, height, image.format or "", image.mode, peak)


def _decoder_bytes(image: Image.Image, frame: int) -> int:
    """What the image's decoder holds besides the frame, from what its header says."""
    width, height = image.size
    if image.format == "WEBP":
        return _WEBP_BYTES * width * height
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        return 2 * len(image.getbands()) * width * height  # libjpeg keeps every 16-bit coefficient
    if image.format == "BMP" and image.info.get("compression") in (1, 2):  # RLE8, RLE4
        return _RLE_BMP_BYTES * width * height
    if image.format == "TIFF" and image.info.get("compression", "raw") != "raw":
        tags = getattr(image, "tag_v2", {})  # libtiff reads a whole strip or tile at a time
        if 322 in tags and 323 in tags:  # TileWidth, TileLength
            return int(tags[322]) * int(tags[323]) * frame
        return min(int(tags.get(278, height)), height) * width * frame  # RowsPerStrip
    return 0


def _decode_gray(image: Image.Image) -> np.ndarray:
    """Decode the first frame into 8-bit grayscale, upright, turning every decoding failure into
    ImageError. Closes the image, so its decoded frame is freed before the gray copy is fitted."""
    try:
        image.load()  # the first frame only: nothing here seeks to another
        transpose = _orientation(image) if _may_have_orientation(image) else None
        gray = _to_gray(image)
        image.close()
        # a permutation of pixels, so it commutes with the per-pixel conversion above; on the gray copy,
        # it costs a byte a pixel instead of another frame in the image's mode (as exif_transpose would)
        return gray if transpose is None else _pixels_of(Image.fromarray(gray).transpose(transpose))
    except ImageError:
        raise
    except Exception as exc:  # Pillow's decoders raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"cannot decode image: {exc}") from exc


# Where Pillow's Image.getexif() looks for an Orientation tag: EXIF blocks in `info`, XMP packets in
# `info`, and a TIFF's own tags. An image with none of them has no orientation to apply, and skipping
# the lookup for it (most images) saves its cost; the result is the same.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")

# ImageOps.exif_transpose's table: the EXIF Orientation value to the transposition that undoes it.
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _may_have_orientation(image: Image.Image) -> bool:
    return hasattr(image, "tag_v2") or any(key in image.info for key in _ORIENTATION_SOURCES)


def _may_be_oriented(image: Image.Image) -> bool:
    """Like _may_have_orientation, but a TIFF only when its own tags hold an Orientation (274)."""
    return any(key in image.info for key in _ORIENTATION_SOURCES) or 274 in getattr(image, "tag_v2", {})


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transposition that turns the image upright, as ImageOps.exif_transpose finds it."""
    return _TRANSPOSE_FOR_ORIENTATION.get(image.getexif().get(ExifTags.Base.Orientation, 1))


def _tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) of at most TILE_PIXELS pixels covering the image, row by row."""
    tile_width = min(width, TILE_PIXELS)
    rows = max(1, TILE_PIXELS // max(1, width))
    for top in range(0, height, rows):
        for left in range(0, width, tile_width):
            yield left, top, min(width, left + tile_width), min(height, top + rows)


def _to_gray(image: Image.Image) -> np.ndarray:
    """Convert any supported mode into a uint8 grayscale array (alpha composited onto white), a tile at
    a time: every step is per pixel, so tiles give the very pixels a whole-image conversion would."""
    width, height = image.size
    if width * height <= TILE_PIXELS:
        return _tile_to_gray(image)
    gray = np.empty((height, width), dtype=np.uint8)
    for left, top, right, bottom in _tiles(width, height):
        gray[top:bottom, left:right] = _tile_to_gray(image.crop((left, top, right, bottom)))
    return gray


def _tile_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:  # in place: one float64 copy of the tile, not four
        values = np.array(image, dtype=np.float64)
        np.clip(values, 0.0, 65535.0, out=values)
        values *= 255.0 / 65535.0
        return _round_u8(values)
    if image.mode == "F":
        values = np.array(image, dtype=np.float64)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        return _round_u8(np.clip(values, 0.0, 255.0, out=values))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode == "L":  # already grayscale: convert("L") would only copy it
        return np.asarray(image, dtype=np.uint8)
    if image.mode not in ("RGB", "RGBA", "P", "1"):
        image = image.convert("RGB")  # CMYK, YCbCr, ...
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _pixels_of(image: Image.Image) -> np.ndarray:
    """A new writable uint8 array of an 'L' image (np.asarray would give a read-only view of a copy)."""
    return np.array(image, dtype=np.uint8)


def _round_u8(values: np.ndarray) -> np.ndarray:
    """Round float values already in 0..255 to uint8 (rounding the array in place)."""
    return np.rint(values, out=values).astype(np.uint8)


def _make_ink_high(gray: np.ndarray) -> np.ndarray:
    """Invert, in place, a uint8 image whose outermost 1-pixel frame has a median >= 128 (a light
    background); returns it. A read-only array is copied first."""
    # np.median, exactly, at a tenth of its cost: the middle value, or the mean of the two middle ones.
    frame = np.sort(_border(gray))
    middle = len(frame) // 2
    if len(frame) % 2:
        light = int(frame[middle]) >= LIGHT_BORDER
    else:
        light = len(frame) > 0 and int(frame[middle - 1]) + int(frame[middle]) >= 2 * LIGHT_BORDER
    if not light:
        return gray
    if not gray.flags.writeable:
        return 255 - gray
    return np.subtract(255, gray, out=gray)


def _border(image: np.ndarray) -> np.ndarray:
    """The outermost 1-pixel frame of a 2-D array, each pixel once (the whole image when it is that thin)."""
    if min(image.shape) <= 2:
        return image.ravel()
    return np.concatenate([image[0, :], image[-1, :], image[1:-1, 0], image[1:-1, -1]])


def _to_unit(gray: np.ndarray) -> np.ndarray:
    """Scale uint8 to float32 in [0, 1]; the one place both input paths go through, so they agree exactly."""
    return gray.astype(np.float32) / np.float32(255.0)


def _ink_box(image: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of the pixels above INK_FRACTION of the maximum, or None when there is no ink."""
    peak = float(image.max())
    if not peak > 0.0:
        return None
    ink = image > INK_FRACTION * peak
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


# The float32 value _to_unit gives each of the 256 gray levels.
_UNIT_LEVELS = _to_unit(np.arange(256, dtype=np.uint8))


def _ink_box_gray(gray: np.ndarray) -> tuple[slice, slice] | None:
    """_ink_box(_to_unit(gray)) of a uint8 image, a strip of rows at a time (no full-size mask)."""
    peak = int(gray.max())
    if peak == 0:
        return None
    # the very comparison _ink_box makes, made once per gray level; it holds from some level upwards
    cut = INK_FRACTION * float(_UNIT_LEVELS[peak])
    threshold = int(np.argmax(np.greater(_UNIT_LEVELS, cut)))
    height, width = gray.shape
    rows = np.zeros(height, dtype=bool)
    cols = np.zeros(width, dtype=bool)
    step = max(1, TILE_PIXELS // width)
    for top in range(0, height, step):
        ink = gray[top : top + step] >= threshold
        rows[top : top + step] = ink.any(axis=1)
        cols |= ink.any(axis=0)
    ink_rows, ink_cols = np.flatnonzero(rows), np.flatnonzero(cols)
    return slice(int(ink_rows[0]), int(ink_rows[-1]) + 1), slice(int(ink_cols[0]), int(ink_cols[-1]) + 1)


def _longer_side_size(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(height, width) with the longer side `side` pixels, keeping the aspect ratio (the shorter >= 1)."""
    height, width = shape
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_longer_side(image: np.ndarray, side: int) -> np.ndarray:
    """Resize so the longer side is `side` pixels, keeping the aspect ratio (the shorter side >= 1)."""
    height, width = _longer_side_size(image.shape, side)
    return _resize(image, height, width, Image.Resampling.LANCZOS)


def _resize(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a float32 2-D array with Pillow (mode 'F', antialiased)."""
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((width, height), resample)
    return np.asarray(resized, dtype=np.float32)


def _lanczos_of_gray(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """_resize(_to_unit(gray), height, width, LANCZOS), bit for bit, without a full-size float copy.

    Pillow resamples in two passes, each into a float32 image. Pillow 13 runs the vertical pass first
    when the height shrinks by more than twice what the width does, else the horizontal one (its
    Resample.c); each output row of a horizontal pass depends on its input row alone, and each column
    of a vertical pass on its input column, so the first pass runs here a strip at a time, and the
    second on its small result. (tests/system/test_hostile_encoder.py checks this against Pillow's resize.)"""
    rows, columns = gray.shape
    if rows * columns <= TILE_PIXELS:
        return _resize(_to_unit(gray), height, width, Image.Resampling.LANCZOS)
    lanczos = Image.Resampling.LANCZOS
    shrink = rows - height
    if shrink > 0 and shrink > 2 * (columns - width):  # vertical first
        first = Image.new("F", (columns, height))
        step = max(1, TILE_PIXELS // rows)
        for left in range(0, columns, step):
            strip = Image.fromarray(_to_unit(gray[:, left : left + step]))
            first.paste(strip.resize((strip.width, height), lanczos), (left, 0))
        second = first.resize((width, height), lanczos) if width != columns else first
    else:
        first = Image.new("F", (width, rows))
        step = max(1, TILE_PIXELS // columns)
        for top in range(0, rows, step):
            strip = Image.fromarray(_to_unit(gray[top : top + step]))
            first.paste(strip.resize((width, strip.height), lanczos) if width != columns else strip, (0, top))
        second = first.resize((width, height), lanczos) if height != rows else first
    return np.asarray(second, dtype=np.float32)


def _paste_centred(glyph: np.ndarray) -> np.ndarray:
    """Paste the glyph into a black 28x28 canvas with its centre of mass at (14, 14), kept inside."""
    height, width = glyph.shape
    centre_y, centre_x = _centre_of_mass(glyph)
    top = int(np.clip(np.floor(MODEL_SIZE / 2 - centre_y + 0.5), 0, MODEL_SIZE - height))
    left = int(np.clip(np.floor(MODEL_SIZE / 2 - centre_x + 0.5), 0, MODEL_SIZE - width))
    canvas = np.zeros((MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = glyph
    return canvas


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre in pixel-index coordinates (the geometric centre when all is zero)."""
    total = float(image.sum(dtype=np.float64))
    if not total > 0.0:
        return (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    rows = image.sum(axis=1, dtype=np.float64)
    cols = image.sum(axis=0, dtype=np.float64)
    centre_y = float(rows @ np.arange(image.shape[0])) / total
    centre_x = float(cols @ np.arange(image.shape[1])) / total
    return centre_y, centre_x
