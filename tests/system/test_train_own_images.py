"""Training on people's own images (issue 17): a folder of colour files at any size, with label
subfolders or flat (no labels: the self-supervised recipe), trained at --input-shape with the photo
preprocessing, then served by a real encoder in colour. Few epochs: the paths are tested here; the
recipe's quality is measured by `make eval` and the training cards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_service import train
from encoder_service.datasets import SAMPLE_PATH, load_dataset, load_icons
from encoder_service.runtime import load_runtime
from imgsearch.cli import main as imgsearch_main
from imgsearch.client import EncoderClient
from tests.support import address, start_encoder

PER_CLASS = 40
CLASSES = ("actions", "apps", "places")  # three of the icon set's categories


def write_icons(root: Path, *, labelled: bool) -> dict[str, list[Path]]:
    """Real colour icons as PNG files of several sizes (48, 64 and 40x56 px), in label subfolders or all in
    one flat folder; returns the files by class."""
    icons = load_icons()
    sizes = ((48, 48), (64, 64), (40, 56))
    written: dict[str, list[Path]] = {}
    for label, name in enumerate(icons.class_names):
        if name not in CLASSES:
            continue
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        members = np.flatnonzero(icons.y_train == label)[:PER_CLASS]
        for n, i in enumerate(members):
            path = folder / f"{name}-{n:03d}.png"
            Image.fromarray(icons.x_train[i]).resize(sizes[n % 3], Image.Resampling.LANCZOS).save(path)
            written.setdefault(name, []).append(path)
    return written


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("labelled")
    return root, write_icons(root, labelled=True)


@pytest.fixture(scope="module")
def colour_model(
    labelled_folder: tuple[Path, dict[str, list[Path]]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    output = tmp_path_factory.mktemp("models") / "colour"
    argv = ["--dataset", str(labelled_folder[0]), "--input-shape", "32x32x3", "--epochs", "2"]
    assert train.main([*argv, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def unlabelled_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A flat folder of colour icons (no labels), trained at 32x32x3: the photo self-supervised recipe."""
    root = tmp_path_factory.mktemp("flat")
    write_icons(root, labelled=False)
    output = tmp_path_factory.mktemp("models") / "unlabelled"
    argv = ["--dataset", str(root), "--input-shape", "32x32x3", "--epochs", "3", "--batch-size", "32"]
    assert train.main([*argv, "--output", str(output)]) == 0
    return root, output


@pytest.fixture(scope="module")
def unlabelled_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of 300 real digits (no labels), trained at 28x28x1: the contrastive recipe."""
    root = tmp_path_factory.mktemp("flat-digits")
    with np.load(SAMPLE_PATH) as data:
        for n, pixels in enumerate(data["x"][:300]):
            Image.fromarray(pixels).save(root / f"{n:03d}.png")
    output = tmp_path_factory.mktemp("models") / "digits"
    argv = ["--dataset", str(root), "--epochs", "3", "--batch-size", "64"]
    assert train.main([*argv, "--output", str(output)]) == 0
    return output


def test_a_colour_folder_trains_a_photo_model(
    colour_model: Path, labelled_folder: tuple[Path, dict[str, list[Path]]]
) -> None:
    files = labelled_folder[1]
    card = json.loads((colour_model / "card.json").read_text())
    assert card["input_shape"] == [32, 32, 3]
    assert card["preprocess"] == "photo", "any shape but 28x28x1 takes the photo preprocessing by default"
    assert card["labels"] == "3 classes from the dataset"
    assert card["class_names"] == list(CLASSES)
    assert card["recipe"]["augment"] == "photo" and card["recipe"]["class_weight"] == 1.0
    assert card["train_size"] + card["validation_size"] == sum(map(len, files.values()))
    assert card["duplicate_distance"] > 0, "measured through decode_photo"
    assert "decode_photo" in card["duplicate_distance_measurement"]["path"]


def test_the_colour_model_is_served_in_colour_by_both_runtimes(
    colour_model: Path, labelled_folder: tuple[Path, dict[str, list[Path]]]
) -> None:
    files = [path.read_bytes() for paths in labelled_folder[1].values() for path in paths[:2]]
    vectors = {}
    for runtime in ("litert", "tensorflow"):
        encoder = start_encoder("--models", f"default,colour={colour_model}", "--runtime", runtime)
        try:
            with closing(EncoderClient(address(encoder))) as client:
                vectors[runtime] = client.embed(files, model="colour").vectors
                [view] = client.reconstruct(files[:1], model="colour")
        finally:
            encoder.stop(0)
        assert view.input.shape == (32, 32, 3) and view.output.shape == (32, 32, 3)
        assert np.ptp(view.input.astype(int), axis=2).max() > 30, "the input keeps its colours"
    assert vectors["litert"].shape == (len(files), 128)
    np.testing.assert_allclose(vectors["litert"], vectors["tensorflow"], atol=1e-4)
    loaded = load_runtime(colour_model)
    assert loaded.preprocess == "photo" and loaded.input_shape == (32, 32, 3)


def test_a_flat_folder_of_photos_trains_without_labels(unlabelled_model: tuple[Path, Path]) -> None:
    root, output = unlabelled_model
    card = json.loads((output / "card.json").read_text())
    assert card["labels"] == "none: the self-supervised recipe"
    assert card["class_names"] == [] and card["retrieval"] is None
    recipe = card["recipe"]
    assert (recipe["class_weight"], recipe["contrastive_weight"]) == (0.0, 0.0), "the autoencoder alone"
    assert (recipe["augment"], recipe["batch_size"], card["epochs"]) == ("photo-geometry", 32, 3)
    assert card["history"]["loss"][-1] < card["history"]["loss"][0], "the reconstruction improves"
    dataset = load_dataset(str(root), input_shape=(32, 32, 3), preprocess="photo")
    assert not dataset.labelled and dataset.x_train.shape == (len(list(root.iterdir())), 32, 32, 3)


def test_a_flat_folder_of_digits_trains_the_contrastive_recipe(unlabelled_digits: Path) -> None:
    card = json.loads((unlabelled_digits / "card.json").read_text())
    assert (card["input_shape"], card["preprocess"]) == ([28, 28, 1], "digits")
    recipe = card["recipe"]
    assert (recipe["class_weight"], recipe["contrastive_weight"], recipe["temperature"]) == (0.0, 1.0, 0.2)
    assert (recipe["augment"], recipe["batch_size"]) == ("digits", 64)
    assert "NT-Xent" in card["loss"]
    contrastive = card["history"]["contrastive"]
    assert len(contrastive) == 3 and contrastive[-1] < contrastive[0], "the two views are pulled together"
    assert set(card["history"]) >= {"reconstruction", "val_contrastive", "val_reconstruction"}
    assert card["validation_size"] == 30 and "novelty" not in card, "no 99th percentile of 30 images"
    runtime = load_runtime(unlabelled_digits)
    batch = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32)
    assert np.allclose(np.linalg.norm(runtime.embed(batch), axis=1), 1.0, atol=1e-5), "unit embeddings"


def test_labels_none_takes_every_image_of_a_labelled_folder(
    labelled_folder: tuple[Path, dict[str, list[Path]]],
) -> None:
    dataset = load_dataset(
        str(labelled_folder[0]), input_shape=(32, 32, 3), preprocess="photo", labels="none"
    )
    assert not dataset.labelled and dataset.class_names == ()
    assert len(dataset.x_train) == sum(map(len, labelled_folder[1].values()))
    assert set(dataset.y_train.tolist()) == {0}
    photos = train.recipe_for("wide", "folder", labelled=False, preprocess="photo", images=924)
    assert (photos.contrastive_weight, photos.augment, photos.epochs) == (0.0, "photo-geometry", 150)
    assert train.recipe_for("wide", "folder", labelled=False, preprocess="photo", images=100_000).epochs == 15
    digits = train.recipe_for("wide", "mnist-sample", labelled=False)
    assert (digits.contrastive_weight, digits.augment, digits.epochs) == (1.0, "digits", 30)
    clothes = train.recipe_for("wide", "fashion_mnist", labelled=False)
    assert (clothes.contrastive_weight, clothes.augment, clothes.class_weight) == (0.0, "garments", 0.0)


def test_labels_folders_refuses_a_flat_folder(
    unlabelled_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = unlabelled_model[0]
    argv = ["--dataset", str(root), "--input-shape", "32x32x3", "--labels", "folders"]
    assert train.main([*argv, "--output", str(tmp_path / "m")]) == 2
    assert "no label subfolders" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--input-shape", "30x30x3"], "input height 30: must be 8 to 256 pixels and a multiple of 4"),
        (["--input-shape", "32x32"], "expected HEIGHTxWIDTHxCHANNELS, e.g. 32x32x3"),
        (["--input-shape", "32x32x4"], "input channels 4: must be 1 (gray) or 3 (RGB)"),
        (["--input-shape", "512x512x3"], "input height 512: must be 8 to 256 pixels"),
        (["--input-shape", "32x32x3", "--preprocess", "digits"], "the digits preprocessing makes 28x28x1"),
        (["--input-shape", "32x32x3", "--dataset", "mnist-sample"], "holds 28x28x1 images, not the"),
    ],
)
def test_bad_input_shapes_get_a_clear_message(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the `imgsearch train` command users type, before any TensorFlow work."""
    dataset = [] if "--dataset" in flags else ["--dataset", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        code = imgsearch_main(["train", *dataset, *flags, "--output", str(tmp_path / "m")])
        raise SystemExit(code)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.fixture(autouse=True)
def _no_gpu_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    yield


def test_nt_xent_by_hand() -> None:
    """Two images with orthogonal embeddings, each view equal to its pair: every row's positive has
    cosine 1 and its two negatives 0, so the loss is -log(e^(1/t) / (e^(1/t) + 2)); swapping the second
    views (each view then resembles the other image's) makes it larger."""
    import tensorflow as tf

    from encoder_service.contrastive import nt_xent

    t = 0.2
    pair = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 2))
    assert float(nt_xent(pair, pair, t)) == pytest.approx(expected, rel=1e-5)
    assert float(nt_xent(pair, pair[::-1], t)) > expected + 4


def test_whitening_keeps_the_reconstruction_and_spreads_the_embedding() -> None:
    """encoder_service.whitening on a `wide` model: the whitened encoder serves unit vectors whose
    covariance over the fitted images is near isotropic, and the autoencoder behind it (Unwhiten, then the
    decoder) reconstructs exactly what it did before."""
    import keras

    from encoder_service.model import build_autoencoder
    from encoder_service.whitening import whiten

    keras.utils.set_random_seed(0)
    autoencoder, encoder = build_autoencoder("wide", (28, 28, 1))
    with np.load(SAMPLE_PATH) as data:
        x = (data["x"][:600, :, :, None] / 255.0).astype(np.float32)
    before_e = encoder.predict(x, verbose=0)
    before_r = autoencoder.predict(x, verbose=0)
    whitened_autoencoder, whitened_encoder, entry = whiten(autoencoder, encoder, x)
    served = whitened_encoder.predict(x, verbose=0)
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(served, before_e, atol=1e-2), "the served vectors change"
    spread = np.linalg.eigvalsh(np.cov(before_e.T)), np.linalg.eigvalsh(np.cov(served.T))
    assert spread[1].max() / spread[1].mean() < spread[0].max() / spread[0].mean() / 2, "variance spread out"
    np.testing.assert_allclose(whitened_autoencoder.predict(x, verbose=0), before_r, atol=2e-4)
    assert entry["shrink"] == 0.5 and "600" in entry["fitted_on"]


def test_a_whitened_model_loads_in_the_tensorflow_runtime(unlabelled_digits: Path) -> None:
    card = json.loads((unlabelled_digits / "card.json").read_text())
    assert card["whitening"]["shrink"] == 0.5
    batch = np.random.default_rng(1).random((3, 28, 28)).astype(np.float32)
    litert, tensorflow = (load_runtime(unlabelled_digits, name) for name in ("litert", "tensorflow"))
    np.testing.assert_allclose(litert.embed(batch), tensorflow.embed(batch), atol=1e-4)
    np.testing.assert_allclose(litert.reconstruct(batch), tensorflow.reconstruct(batch), atol=1e-4)
