"""The tutorial's picture: each query beside its nearest neighbours, distances in the titles."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgsearch.client import Match


def _load(source: str | bytes | None) -> np.ndarray | None:
    """Returns the image as a grayscale array, or None when it cannot be read."""
    if source is None:
        return None
    try:
        image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
        return np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError):
        return None


def draw_similar(
    queries: Sequence[tuple[str, bytes]], results: Sequence[Sequence[Match]], output: str | Path
) -> Path:
    """Writes a PNG grid: one row per query, the query first, then its matches (read from their `source`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max((len(r) for r in results), default=0)
    figure, axes = plt.subplots(
        len(queries), columns, figsize=(1.8 * columns, 2.0 * len(queries)), squeeze=False
    )
    for row, ((name, data), matches) in enumerate(zip(queries, results, strict=True)):
        cells: list[tuple[np.ndarray | None, str]] = [(_load(data), f"query\n{Path(name).name}")]
        cells += [(_load(m.metadata.get("source")), f"{m.id}\nd={m.distance:.3f}") for m in matches]
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(cells):
                pixels, title = cells[column]
                if pixels is not None:
                    axis.imshow(pixels, cmap="gray")
                axis.set_title(title, fontsize=7)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
