"""The images the encoder and end-to-end sections send: Fashion-MNIST as 8-bit grayscale PNG files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(pixels: np.ndarray) -> bytes:
    """Returns a standard PNG file (8-bit grayscale, not interlaced, filter None, zlib level 6) of a
    2-D uint8 array. About 20 times faster than Pillow's writer; Pillow reads it back pixel for pixel."""
    gray = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = gray.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row starts with its filter byte, 0 = None
    rows[:, 1:] = gray
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join(
        [
            _PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
            _chunk(b"IEND", b""),
        ]
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Returns (x_train, y_train, x_test, y_test, class names): uint8 [N, 28, 28] and int labels."""
    from encoder_service.datasets import load_dataset

    data = load_dataset("fashion_mnist")
    return data.x_train, data.y_train, data.x_test, data.y_test, data.class_names


def label_folder(name: str) -> str:
    """A class name as a folder name ("T-shirt/top" -> "T-shirt_top")."""
    return name.replace("/", "_").replace(" ", "_")


def write_png_folder(root: Path, x: np.ndarray, y: np.ndarray, class_names: tuple[str, ...]) -> int:
    """Writes each image as root/<label>/<number>.png; returns the bytes written."""
    folders = [root / label_folder(name) for name in class_names]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for number, (pixels, label) in enumerate(zip(x, y, strict=True)):
        data = png_bytes(pixels)
        (folders[int(label)] / f"{number:05d}.png").write_bytes(data)
        total += len(data)
    return total
