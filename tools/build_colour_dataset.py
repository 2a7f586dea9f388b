"""Builds the shipped colour data set `encoder_service/data/oxygen-icons-32.npz` from Debian's package
`oxygen-icon-theme` (KDE's Oxygen icons, LGPL-3+), offline: the PNG files under its category folders
(actions, apps, devices, mimetypes, places, status...) are the images, the folder names the labels.

    apt-get install oxygen-icon-theme
    python -m tools.build_colour_dataset                   # writes encoder_service/data/oxygen-icons-32.npz
    python -m tools.build_colour_dataset --source DIR --output PATH

How (deterministic: the same package version gives the same file):
- An icon is (category, name). Symlinks are skipped (they are aliases of another icon). One size per
  icon, by the PNG's own pixel size (a few files sit in another size's folder): a 32x32 PNG, or where
  it has none the smallest larger square one, downscaled; icons drawn only smaller than 32 px are left
  out (upscaling would only blur them), and so are non-square PNGs (animation strips).
- Each PNG is composited on white (alpha over an opaque white background) at its own size, then
  resized to 32x32 (Lanczos). White because the icons are
  drawn for light backgrounds and a query from a web page or screenshot shows them on one; and
  compositing before resizing keeps the transparent pixels' (arbitrary) colours out of the edges.
- Exact duplicates (the same 32x32x3 pixels) are dropped: the first in (category, name) order is kept.
- Categories with fewer than --min-per-class images are dropped.
- Split per class, seed 0: round(20%) of each class is the query split (`x_test`), the rest the index
  split (`x`); each split is then shuffled (seed 0).

The .npz (compressed) holds `x` uint8 [N, 32, 32, 3] RGB, `y` uint8 labels, `x_test`, `y_test`,
`classes` (the label names), `names` / `names_test` ("category/icon-name"), `size` / `size_test` (the
side in pixels of the PNG each image came from) and `source` (package, version, folder, method).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "oxygen-icon-theme"
DEFAULT_SOURCE = Path("/usr/share/icons/oxygen/base")
DEFAULT_OUTPUT = ROOT / "encoder_service" / "data" / "oxygen-icons-32.npz"
SIDE = 32
TEST_FRACTION = 0.2
SEED = 0
MIN_PER_CLASS = 20


@dataclass(frozen=True)
class Icon:
    category: str
    name: str
    path: Path
    side: int  # the PNG's side in pixels


def size_folders(source: Path) -> list[tuple[int, Path]]:
    """The `NxN` folders under the theme's root, as (N, folder), smallest first."""
    folders = []
    for folder in source.iterdir():
        width, sep, height = folder.name.partition("x")
        if folder.is_dir() and sep and width.isdigit() and width == height:
            folders.append((int(width), folder))
    return sorted(folders)


def choose_icons(source: Path, side: int = SIDE) -> list[Icon]:
    """One PNG per (category, name): one `side` pixels square, else the smallest larger square one.

    By the PNG's own size, not its folder's (a few files in a size folder are drawn at another size);
    symlinks, smaller PNGs and non-square ones (animation strips) are skipped."""
    chosen: dict[tuple[str, str], Icon] = {}
    for _, folder in size_folders(source):
        for category in sorted(p for p in folder.iterdir() if p.is_dir()):
            for file in sorted(category.glob("*.png")):
                if file.is_symlink() or not file.is_file():
                    continue
                with Image.open(file) as image:  # reads the header only
                    width, height = image.size
                if width != height or width < side:
                    continue
                key = (category.name, file.stem)
                if key not in chosen or width < chosen[key].side:
                    chosen[key] = Icon(category.name, file.stem, file, width)
    return [chosen[key] for key in sorted(chosen)]


def render(path: Path, side: int = SIDE) -> tuple[np.ndarray, int]:
    """RGB uint8 [side, side, 3] of a square PNG: composited on white, then resized (Lanczos).

    Returns it with the original's side in pixels."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    if rgba.size[0] != rgba.size[1]:
        raise ValueError(f"{path}: not square ({rgba.size[0]}x{rgba.size[1]})")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    original = rgb.size[0]
    if original != side:
        rgb = rgb.resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(rgb, np.uint8), original


def package_version(package: str = PACKAGE) -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


@dataclass(frozen=True)
class Built:
    x: np.ndarray
    y: np.ndarray
    names: np.ndarray
    sizes: np.ndarray
    classes: tuple[str, ...]
    duplicates: int
    dropped_classes: dict[str, int]


def build(source: Path, side: int = SIDE, min_per_class: int = MIN_PER_CLASS) -> Built:
    """Every chosen icon rendered, de-duplicated, in (category, name) order; small classes dropped."""
    seen: set[bytes] = set()
    rows: list[tuple[str, str, np.ndarray, int]] = []
    duplicates = 0
    for icon in choose_icons(source, side):
        pixels, original = render(icon.path, side)
        digest = hashlib.sha256(pixels.tobytes()).digest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        rows.append((icon.category, icon.name, pixels, original))
    counts = Counter(category for category, *_ in rows)
    classes = tuple(sorted(c for c, n in counts.items() if n >= min_per_class))
    dropped = {c: n for c, n in sorted(counts.items()) if n < min_per_class}
    kept = [row for row in rows if row[0] in classes]
    if not kept:
        raise ValueError(f"{source}: no category with {min_per_class} or more PNG icons of >= {side} px")
    label = {c: i for i, c in enumerate(classes)}
    return Built(
        x=np.stack([row[2] for row in kept]),
        y=np.asarray([label[row[0]] for row in kept], np.uint8),
        names=np.asarray([f"{row[0]}/{row[1]}" for row in kept]),
        sizes=np.asarray([row[3] for row in kept], np.int16),
        classes=classes,
        duplicates=duplicates,
        dropped_classes=dropped,
    )


def stratified_split(
    y: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(index, query) positions: round(test_fraction) of each class (at least 1) to the queries."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = max(1, round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the theme's root (NxN/...)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS)
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        print(f"error: {args.source} is not a folder (apt-get install {PACKAGE})", file=sys.stderr)
        return 2
    built = build(args.source, SIDE, args.min_per_class)
    train, test = stratified_split(built.y)
    version = package_version()
    source = (
        f"Debian package {PACKAGE} {version}, {args.source}: one PNG per category/icon (32x32, else the "
        "smallest larger square one, by its pixel size), symlinks skipped, composited on white, resized "
        "to 32x32 (Lanczos), exact duplicates dropped; "
        f"stratified split {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SEED}; "
        "built by python -m tools.build_colour_dataset"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        x=built.x[train],
        y=built.y[train],
        x_test=built.x[test],
        y_test=built.y[test],
        classes=np.asarray(built.classes),
        names=built.names[train],
        names_test=built.names[test],
        size=built.sizes[train],
        size_test=built.sizes[test],
        source=np.asarray(source),
    )
    print(source)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes)")
    print(f"{len(built.y):,} images, {built.duplicates} exact duplicates dropped")
    if built.dropped_classes:
        dropped = ", ".join(f"{c} ({n})" for c, n in built.dropped_classes.items())
        print(f"categories dropped (< {args.min_per_class} images): {dropped}")
    print("| class | index | query | total | from a larger size |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, name in enumerate(built.classes):
        n_train = int(np.sum(built.y[train] == label))
        n_test = int(np.sum(built.y[test] == label))
        larger = int(np.sum((built.y == label) & (built.sizes != SIDE)))
        print(f"| {name} | {n_train} | {n_test} | {n_train + n_test} | {larger} |")
    print(f"| total | {len(train)} | {len(test)} | {len(built.y)} | {int(np.sum(built.sizes != SIDE))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
