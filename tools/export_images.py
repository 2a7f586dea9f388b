"""Writes a shipped data set out as image files, the way people's own folders look: the README's "Your own
images" walk-through starts from them.

    python -m tools.export_images icons out/icons

gives `out/icons/index/<label>/` (the index split) and `out/icons/queries/<label>/` (the query split), in
label subfolders so that `imgsearch eval` can score the results (`imgsearch index` keeps each file's folder
as its `label`); `imgsearch train --labels none` trains on the index folder as if it had no labels, as
most people's folders have none (a flat folder trains that way without the flag). The PNG files are
64x64 (upscaled with Lanczos from the set's 32x32), so the encoder has to fit them to the model's input as it
does any file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from encoder_service.datasets import NAMED_DATASETS, load_dataset

SIDE = 64


def write_image(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).resize((SIDE, SIDE), Image.Resampling.LANCZOS).save(path)


def export(dataset: str, output: Path) -> tuple[int, int]:
    """Writes both splits by label; returns (index files, query files)."""
    data = load_dataset(dataset)
    if not data.has_test:
        raise ValueError(f"dataset {dataset!r} has no query split")
    for split, images, labels in (
        ("index", data.x_train, data.y_train),
        ("queries", data.x_test, data.y_test),
    ):
        for number, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            name = data.class_names[int(label)] if data.class_names else str(int(label))
            write_image(pixels, output / split / name.replace("/", "_") / f"{number:05d}.png")
    return len(data.x_train), len(data.x_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export_images", description=__doc__)
    parser.add_argument("dataset", help=f"one of {', '.join(NAMED_DATASETS)}")
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        index, queries = export(args.dataset, args.output)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {index} index images to {args.output / 'index'} "
        f"and {queries} queries to {args.output / 'queries'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
