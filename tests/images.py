"""Test images made here: digit-like glyphs drawn with Pillow and the repo's MNIST sample."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLE = Path(__file__).resolve().parent.parent / "encoder_service" / "data" / "mnist-10k.npz"


def mnist_sample(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x uint8 [count, 28, 28], y) from the sample shipped in the repo."""
    with np.load(SAMPLE) as data:
        return data["x"][start : start + count], data["y"][start : start + count]


def glyph(size: tuple[int, int] = (120, 160), light_background: bool = False) -> Image.Image:
    """Returns an L-mode image of a thick '7'-like stroke."""
    image = Image.new("L", size, 255 if light_background else 0)
    draw = ImageDraw.Draw(image)
    w, h = size
    ink = 0 if light_background else 255
    draw.line([(w * 0.2, h * 0.2), (w * 0.8, h * 0.2), (w * 0.4, h * 0.85)], fill=ink, width=max(2, w // 10))
    return image


def encode(image: Image.Image, format_name: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def write_digits(folder: Path, count: int, start: int = 0, digits: int = 5) -> Path:
    """Writes `count` sample digits as folder/<label>/<number>.png (numbered from `start`); returns folder."""
    x, y = mnist_sample(count, start)
    for n, (digit, label) in enumerate(zip(x, y, strict=True), start=start):
        path = folder / str(label) / f"{n:0{digits}d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(path)
    return folder
