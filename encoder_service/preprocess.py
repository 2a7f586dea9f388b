"""Turn user images into the model's input: float32 [28, 28] in [0, 1], white ink on black, like MNIST.

Only numpy, Pillow and the standard library: no gRPC or TensorFlow here. See docs/PREPROCESSING.md.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

MODEL_SIZE = 28
GLYPH_SIZE = 20  # the longer side of the ink's bounding box after fitting, as in MNIST
INK_FRACTION = 0.1  # a pixel is ink when it is above this fraction of the image's maximum
LIGHT_BORDER = 128  # a border median at or above this means a light background: invert

# The formats decode_image accepts; everything else Pillow could open (EPS, PSD, ...) is refused.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# warnings.catch_warnings swaps process-wide state; the lock keeps concurrent decodes from mixing it up.
_PILLOW_LOCK = threading.Lock()


class ImageError(ValueError):
    """An input that cannot be turned into a model input; str() says what was wrong."""


def quiet_pillow_warnings() -> None:
    """Ignores Pillow's UserWarnings (corrupt EXIF and the like) process-wide: the image still decodes,
    and a service should not print a line for every odd file a user sends. Called by the service."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, GIF, WebP, TIFF) into the model's [28, 28] input."""
    if not data:
        raise ImageError("empty image")
    gray = _ink_is_high(_decode_gray(bytes(data), max_pixels))
    return _fit(_to_unit(gray))  # already float32 in [0, 1]: fit_to_mnist's clipping would change nothing


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


def _decode_gray(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode the first frame into 8-bit grayscale, turning every decoding failure into ImageError."""
    try:
        with _load_first_frame(data, max_pixels) as image:
            if _may_have_orientation(image):
                ImageOps.exif_transpose(image, in_place=True)
            return _to_gray(image)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot decode image: not a {_FORMAT_NAMES} file") from exc
    except Exception as exc:  # Pillow's decoders raise many kinds (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"cannot decode image: {exc}") from exc


def _load_first_frame(data: bytes, max_pixels: int) -> Image.Image:
    """Open the image, refuse it if its header size is over max_pixels, then load its first frame."""
    # Pillow's own bomb check runs in Image.open: only the header read needs the warning filter (and so
    # the lock); the expensive decode below runs outside it, in parallel with other requests.
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image refused as a possible decompression bomb: {exc}") from exc
    _check_size(image.size, max_pixels)
    image.load()
    return image


# Where Pillow's Image.getexif() looks for an Orientation tag: EXIF blocks in `info`, XMP packets in
# `info`, and a TIFF's own tags. An image with none of them has no orientation to apply, and skipping
# ImageOps.exif_transpose for it (most images) saves its cost; the result is the same.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _may_have_orientation(image: Image.Image) -> bool:
    return hasattr(image, "tag_v2") or any(key in image.info for key in _ORIENTATION_SOURCES)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image whose width * height is over max_pixels."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width} x {height} = {width * height} pixels, over the limit of {max_pixels} pixels"
        )


def _to_gray(image: Image.Image) -> np.ndarray:
    """Convert any supported mode into a uint8 grayscale array (alpha composited onto white)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        return _round_u8(np.clip(values, 0.0, 65535.0) * (255.0 / 65535.0))
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return _round_u8(np.clip(values, 0.0, 255.0))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    if image.mode == "L":  # already grayscale: convert("L") would only copy it
        return np.asarray(image, dtype=np.uint8)
    if image.mode not in ("RGB", "RGBA", "P", "1"):
        image = image.convert("RGB")  # CMYK, YCbCr, ...
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _round_u8(values: np.ndarray) -> np.ndarray:
    """Round values already in 0..255 to uint8."""
    return np.rint(values).astype(np.uint8)


def _ink_is_high(gray: np.ndarray) -> np.ndarray:
    """Invert a uint8 image whose outermost 1-pixel frame has a median >= 128 (a light background)."""
    # np.median, exactly, at a tenth of its cost: the middle value, or the mean of the two middle ones.
    frame = np.sort(_border(gray))
    middle = len(frame) // 2
    if len(frame) % 2:
        light = int(frame[middle]) >= LIGHT_BORDER
    else:
        light = len(frame) > 0 and int(frame[middle - 1]) + int(frame[middle]) >= 2 * LIGHT_BORDER
    return 255 - gray if light else gray


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


def _resize_longer_side(image: np.ndarray, side: int) -> np.ndarray:
    """Resize so the longer side is `side` pixels, keeping the aspect ratio (the shorter side >= 1)."""
    height, width = image.shape
    scale = side / max(height, width)
    new_height = max(1, round(height * scale))
    new_width = max(1, round(width * scale))
    return _resize(image, new_height, new_width, Image.Resampling.LANCZOS)


def _resize(image: np.ndarray, height: int, width: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a float32 2-D array with Pillow (mode 'F', antialiased)."""
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((width, height), resample)
    return np.asarray(resized, dtype=np.float32)


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
