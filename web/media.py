"""The stored images: finding an item's `source` file inside the media root only, and thumbnails of it.

Also turns the encoder's pixel arrays (a model's input and its reconstruction: grayscale for a digits model,
RGB for a colour one, at the model's input size) into the PNG data URLs the page shows."""

from __future__ import annotations

import base64
import hashlib
import io
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SOURCE_KEY = "source"  # the metadata key `imgsearch index` keeps each image's path under
MAX_IMAGE_PIXELS = 40_000_000  # as the encoder's default: a bigger stored file gets no thumbnail
THUMBNAIL_SIZES = (16, 512)  # the smallest and largest edge a request may ask for
DEFAULT_THUMBNAIL_SIZE = 128


class NoImage(Exception):
    """There is no image to show for this item; str() says why (for a 404)."""


def resolve_source(root: Path | None, source: str | None) -> Path:
    """Returns the file `source` names, resolved (symlinks followed), when it is a regular file inside
    `root` (resolved already); raises NoImage otherwise. A relative source is taken relative to the root;
    an absolute one must lie inside it. `..` segments and symlinks that lead out of the root are refused."""
    if root is None:
        raise NoImage("the gateway has no media root (--media-root), so it serves no stored images")
    if not source:
        raise NoImage("the item has no source image")
    if "\x00" in source:
        raise NoImage("the item's source is not a path")
    candidate = Path(source)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, unreadable
        raise NoImage("the item's source image is not in the media root") from None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise NoImage("the item's source image is not in the media root")
    return resolved


def read_source(root: Path | None, source: str | None) -> bytes:
    """The bytes of the file `source` names inside the root (see resolve_source)."""
    path = resolve_source(root, source)
    try:
        return path.read_bytes()
    except OSError:
        raise NoImage("the item's source image cannot be read") from None


def thumbnail(path: Path, size: int = DEFAULT_THUMBNAIL_SIZE) -> tuple[bytes, str]:
    """Returns (a PNG of the image at `path` fitted into size x size, never enlarged; an ETag for it).

    Cached by path, modification time and size, so a changed file gets a new thumbnail."""
    try:
        stat = path.stat()
    except OSError:
        raise NoImage("the item's source image cannot be read") from None
    return _thumbnail(str(path), stat.st_mtime_ns, stat.st_size, size)


@lru_cache(maxsize=1024)
def _thumbnail(path: str, mtime_ns: int, file_size: int, size: int) -> tuple[bytes, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise NoImage(
                        f"the item's source image is too large to show ({image.width}x{image.height})"
                    )
                image.seek(0)
                image.load()
                picture = ImageOps.exif_transpose(image)
    except NoImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise NoImage("the item's source image cannot be decoded") from None
    if picture.mode not in ("L", "RGB", "RGBA", "LA"):
        picture = picture.convert(
            "RGBA" if "A" in picture.getbands() or "transparency" in picture.info else "RGB"
        )
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps the aspect ratio; only shrinks
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    tag = hashlib.sha256(f"{path}\0{mtime_ns}\0{file_size}\0{size}".encode()).hexdigest()[:32]
    return data, f'"{tag}"'


def png_data_url(pixels: np.ndarray) -> str:
    """A uint8 array as a data: URL of a PNG, for an <img> on the page: [h, w] or [h, w, 1] gives a
    grayscale (L) PNG, [h, w, 3] an RGB one. Any other shape or dtype, or an empty image, is a ValueError."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"the pixels must be uint8, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"the pixels must be [h, w], [h, w, 1] or [h, w, 3], not {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the pixels hold no image ({array.shape[0]} x {array.shape[1]})")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")  # L for 2-D, RGB for 3 channels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
