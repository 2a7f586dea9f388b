"""The shipped colour set (encoder_service/data/oxygen-icons-32.npz) and its builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_service.datasets import ICONS_PATH, NAMED_DATASETS, load_dataset
from tools.build_colour_dataset import build, choose_icons, render, stratified_split

CLASSES = (
    "actions",
    "applets",
    "apps",
    "categories",
    "devices",
    "emblems",
    "mimetypes",
    "places",
    "status",
)


@pytest.fixture(scope="module")
def icons():
    return load_dataset("icons")


def test_loads_by_name_with_the_documented_shapes(icons) -> None:
    assert "icons" in NAMED_DATASETS
    assert icons.name == "icons"
    assert icons.class_names == CLASSES
    assert icons.x_train.shape == (1026, 32, 32, 3) and icons.x_train.dtype == np.uint8
    assert icons.x_test.shape == (257, 32, 32, 3) and icons.x_test.dtype == np.uint8
    assert icons.y_train.shape == (1026,) and icons.y_test.shape == (257,)
    assert np.issubdtype(icons.y_train.dtype, np.integer)
    assert set(np.unique(icons.y_train)) == set(np.unique(icons.y_test)) == set(range(len(CLASSES)))
    assert "oxygen-icon-theme" in icons.source
    # composited on white: the corners are white, and the images are colour, not grey
    assert (icons.x_train[:, 0, 0] == 255).mean() > 0.9
    assert np.abs(icons.x_train[..., 0].astype(int) - icons.x_train[..., 2]).mean() > 5


def test_the_split_is_stratified_and_disjoint(icons) -> None:
    for label in range(len(CLASSES)):
        n_train, n_test = int((icons.y_train == label).sum()), int((icons.y_test == label).sum())
        assert n_test == max(1, round(0.2 * (n_train + n_test)))
    with np.load(ICONS_PATH) as data:
        names, names_test = set(data["names"]), set(data["names_test"])
        assert len(names) == len(data["x"]) and len(names_test) == len(data["x_test"])
        assert data["size"].shape == data["y"].shape and data["size"].min() >= 32
    assert not names & names_test
    every = np.concatenate([icons.x_train, icons.x_test]).reshape(1283, -1)
    assert len(np.unique(every, axis=0)) == len(every)  # no exact duplicate, within or across the splits


def test_raw_pixels_retrieve_above_chance(icons) -> None:
    index = icons.x_train.reshape(len(icons.x_train), -1).astype(np.float32) / 255
    queries = icons.x_test.reshape(len(icons.x_test), -1).astype(np.float32) / 255
    distances = (queries**2).sum(1)[:, None] + (index**2).sum(1)[None] - 2 * queries @ index.T
    top = np.argsort(distances, axis=1, kind="stable")[:, :10]
    hits = (icons.y_train[top] == icons.y_test[:, None]).mean(axis=1)
    shares = np.bincount(icons.y_train, minlength=len(CLASSES)) / len(icons.y_train)
    chance = float(shares[icons.y_test].mean())  # what random results would score
    assert hits.mean() > chance + 0.1
    per_class = [hits[icons.y_test == label].mean() for label in range(len(CLASSES))]
    assert np.mean(per_class) > 3 / len(CLASSES)


def _png(path: Path, side: int, colour: tuple[int, int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (side, side), colour).save(path)


def test_the_builder_takes_one_size_per_icon_and_composites_on_white(tmp_path: Path) -> None:
    _png(tmp_path / "16x16" / "places" / "small-only.png", 16, (255, 0, 0, 255))
    _png(tmp_path / "32x32" / "places" / "folder.png", 32, (0, 0, 255, 255))
    _png(tmp_path / "48x48" / "places" / "folder.png", 48, (0, 255, 0, 255))
    _png(tmp_path / "48x48" / "places" / "big-only.png", 48, (0, 0, 0, 0))
    _png(tmp_path / "32x32" / "devices" / "clear.png", 32, (0, 0, 0, 0))  # the same pixels as big-only
    (tmp_path / "32x32" / "places" / "alias.png").symlink_to(tmp_path / "32x32" / "places" / "folder.png")
    chosen = {(i.category, i.name): i.side for i in choose_icons(tmp_path)}
    assert chosen == {("devices", "clear"): 32, ("places", "big-only"): 48, ("places", "folder"): 32}
    pixels, side = render(tmp_path / "48x48" / "places" / "big-only.png")
    assert side == 48 and pixels.shape == (32, 32, 3) and (pixels == 255).all()
    built = build(tmp_path, min_per_class=1)
    assert built.duplicates == 1 and built.classes == ("devices", "places")
    assert list(built.names) == ["devices/clear", "places/folder"]
    train, test = stratified_split(np.asarray([0] * 10 + [1] * 5, np.uint8))
    assert sorted(np.concatenate([train, test])) == list(range(15)) and len(test) == 3


def test_export_images_writes_both_splits_as_label_folders(tmp_path: Path) -> None:
    """tools.export_images: what the README's walk-through starts from."""
    from tools.export_images import SIDE, main

    assert main(["icons", str(tmp_path)]) == 0
    icons = load_dataset("icons")
    for split, labels in (("index", icons.y_train), ("queries", icons.y_test)):
        counts = {folder.name: len(list(folder.iterdir())) for folder in (tmp_path / split).iterdir()}
        expected = {
            icons.class_names[c]: int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)
        }
        assert counts == expected
    with Image.open(next((tmp_path / "queries" / "places").iterdir())) as image:
        assert (image.mode, image.size) == ("RGB", (SIDE, SIDE))
    assert main(["no-such-set", str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()
