"""The `photo` preprocessing: any image to a colour (or gray) model input of any size, [H, W, C] float32 in
[0, 1], keeping its colours: the image is padded to the input's aspect with its border colour and resized
(Lanczos), centred; no ink box, no inversion (that is the `digits` fit, preprocess.py).

It shares the digits path's guards (formats, the pixel limit, the decoding budget's `admit`, EXIF
orientation, alpha composited onto white) and its memory discipline: the frame is converted to 8-bit RGB a
tile at a time and freed before the resize, so a decode peaks at about the frame plus 3 bytes a pixel.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import numpy as np
from PIL import Image

from encoder_service.preprocess import (
    _SIXTEEN_BIT_MODES,
    TILE_PIXELS,
    Admit,
    ImageError,
    ImageHeader,
    _header,
    _may_have_orientation,
    _open,
    _orientation,
    _round_u8,
    _tiles,
)

PHOTO_EXTRA_BYTES = 3  # per pixel, beyond the digits path's estimate: the 8-bit RGB copy
_SWAPS_AXES = (
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def photo_header(image: Image.Image) -> ImageHeader:
    """The digits path's header with the RGB copy's bytes added to the peak."""
    header = _header(image)
    return dataclasses.replace(header, decode_bytes=header.decode_bytes + PHOTO_EXTRA_BYTES * header.pixels)


def decode_photo(
    data: bytes,
    input_shape: tuple[int, int, int],
    *,
    max_pixels: int = 40_000_000,
    admit: Admit | None = None,
) -> np.ndarray:
    """Decode an encoded image into the model's [H, W, C] input (C 3: RGB; C 1: its luminance)."""
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise ValueError(f"the photo preprocessing makes 1 or 3 channels, not {channels}")
    if not data:
        raise ImageError("empty image")
    image = _open(bytes(data), max_pixels)
    try:
        with admit(photo_header(image)) if admit is not None else nullcontext():
            try:
                image.load()
                transpose = _orientation(image) if _may_have_orientation(image) else None
                rgb = _to_rgb(image)
                image.close()
            except ImageError:
                raise
            except Exception as exc:  # Pillow's decoders raise many kinds
                raise ImageError(f"cannot decode image: {exc}") from exc
            fitted = fit_photo(rgb, height, width, transpose)
    finally:
        image.close()
    if channels == 1:
        gray = fitted @ np.array([0.299, 0.587, 0.114], np.float32)
        return gray[..., None].astype(np.float32)
    return fitted


def from_raw_photo(
    height: int, width: int, channels: int, pixels: bytes, shape: tuple[int, int, int]
) -> np.ndarray:
    """Raw uint8 pixels (row-major, channels last) of exactly the model's input shape, scaled to [0, 1]."""
    if (height, width, channels) != shape:
        expected = " x ".join(map(str, shape))
        raise ImageError(f"raw pixels must be {expected}, got {height} x {width} x {channels}")
    if len(pixels) != height * width * channels:
        raise ImageError(f"raw pixels: expected {height * width * channels} bytes, got {len(pixels)}")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(shape).astype(np.float32) / 255.0


def fit_photo(
    rgb: np.ndarray, height: int, width: int, transpose: Image.Transpose | None = None
) -> np.ndarray:
    """An upright uint8 RGB array [h, w, 3] to [height, width, 3] float32 in [0, 1]: resized to fit inside
    the input (aspect kept, Lanczos), centred on the median colour of its outermost frame of pixels, then
    turned upright (`transpose`, from its EXIF orientation)."""
    rows, columns = rgb.shape[:2]
    target_height, target_width = (width, height) if transpose in _SWAPS_AXES else (height, width)
    scale = min(target_width / columns, target_height / rows)
    size = (
        max(1, min(target_width, round(columns * scale))),
        max(1, min(target_height, round(rows * scale))),
    )
    border = tuple(int(v) for v in _border_colour(rgb))
    source = Image.frombuffer("RGB", (columns, rows), np.ascontiguousarray(rgb), "raw", "RGB", 0, 1)
    resized = source.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (target_width, target_height), border)
    canvas.paste(resized, ((target_width - size[0]) // 2, (target_height - size[1]) // 2))
    if transpose is not None:
        canvas = canvas.transpose(transpose)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _border_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the outermost 1-pixel frame: what a padded square is filled with."""
    frame = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(frame, axis=0)


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any supported mode as a uint8 [h, w, 3] array (alpha composited onto white), a tile at a time."""
    width, height = image.size
    if width * height <= TILE_PIXELS:
        return _tile_to_rgb(image)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for left, top, right, bottom in _tiles(width, height):
        rgb[top:bottom, left:right] = _tile_to_rgb(image.crop((left, top, right, bottom)))
    return rgb


def _tile_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.array(image, dtype=np.float64)
        np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if image.mode != "F":
            values *= 255.0 / 65535.0
        gray = _round_u8(np.clip(values, 0.0, 255.0, out=values))
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
