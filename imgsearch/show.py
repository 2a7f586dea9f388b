"""The tutorial's picture: each query beside its nearest neighbours, distances in the titles."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgsearch.client import Match

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure


def _load(source: str | bytes | None) -> np.ndarray | None:
    """Returns the image as a grayscale array, or None when it cannot be read."""
    if source is None:
        return None
    try:
        image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else Image.open(source)
        return np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError):
        return None


ELLIPSIS = "\u2026"
TITLE_SHARE = 0.92  # of a column's width: what a title may take, so that neighbours keep a gap


def ellipsize(text: str, length: int) -> str:
    """`text` cut to `length` characters by an ellipsis in the middle, where an id or a path tells least
    (its start and its file name stay)."""
    if len(text) <= length:
        return text
    if length <= 1:
        return ELLIPSIS[:length]
    head = length // 2
    tail = length - 1 - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def _fit_title(axis: Axes, lines: list[str], long: int, width_px: float, renderer: RendererBase) -> None:
    """Titles the axis with `lines`, the one at `long` (an id, a file name) ellipsized as little as keeps
    the title within width_px, so that a long one never runs into the titles beside it."""

    def fits(length: int) -> bool:
        shown = [ellipsize(line, length) if n == long else line for n, line in enumerate(lines)]
        # parse_math off: an id is text, `$` and all, not mathtext
        title = axis.set_title("\n".join(shown), fontsize=7, parse_math=False)
        return bool(title.get_window_extent(renderer).width <= width_px)

    if fits(len(lines[long])):
        return
    low, high = 1, len(lines[long]) - 1  # the longest that fits, by bisection (1: the ellipsis alone)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    fits(low)


def similar_figure(queries: Sequence[tuple[str, bytes]], results: Sequence[Sequence[Match]]) -> Figure:
    """The grid as a figure: one row per query, the query first, then its matches (read from their
    `source`), each titled with its id (ellipsized to its column's width) and its distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max((len(r) for r in results), default=0)
    figure, axes = plt.subplots(
        len(queries), columns, figsize=(1.8 * columns, 2.0 * len(queries)), squeeze=False
    )
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    width_px = TITLE_SHARE * figure.bbox.width / columns
    for row, ((name, data), matches) in enumerate(zip(queries, results, strict=True)):
        cells: list[tuple[np.ndarray | None, list[str], int]] = [(_load(data), ["query", Path(name).name], 1)]
        cells += [(_load(m.metadata.get("source")), [m.id, f"d={m.distance:.3f}"], 0) for m in matches]
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(cells):
                pixels, lines, long = cells[column]
                if pixels is not None:
                    axis.imshow(pixels, cmap="gray")
                _fit_title(axis, lines, long, width_px, renderer)
    figure.tight_layout()
    return figure


def draw_similar(
    queries: Sequence[tuple[str, bytes]], results: Sequence[Sequence[Match]], output: str | Path
) -> Path:
    """Writes a PNG grid: one row per query, the query first, then its matches (read from their `source`)."""
    import matplotlib.pyplot as plt

    figure = similar_figure(queries, results)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output
