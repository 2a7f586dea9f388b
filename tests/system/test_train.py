"""Training (`encoder_service.train`), the architectures (`encoder_service.model`) and the datasets."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoder_service import train
from encoder_service.datasets import SAMPLE_PATH, load_dataset, read_idx
from encoder_service.model_dir import MODEL_FILES

TINY = 256


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 digits of the shipped sample's training split, and 64 of its test split, as an .npz."""
    with np.load(SAMPLE_PATH) as data:
        x, y = data["x"], data["y"]
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x[:TINY], y=y[:TINY], x_test=x[-64:], y_test=y[-64:])
    return path


@pytest.fixture(scope="module")
def trained(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory written by the CLI: 1 epoch on the tiny dataset."""
    output = tmp_path_factory.mktemp("models") / "tiny"
    argv = ["--dataset", str(tiny_npz), "--epochs", "1", "--batch-size", "64", "--seed", "3"]
    assert train.main([*argv, "--output", str(output)]) == 0
    return output


def test_writes_the_model_files_and_nothing_else(trained: Path) -> None:
    assert sorted(p.name for p in trained.iterdir()) == sorted(MODEL_FILES)
    for name in MODEL_FILES:
        size = (trained / name).stat().st_size
        assert 0 < size < 3_000_000, (name, size)
    leftovers = [p.name for p in trained.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "temporary directories left behind"


def test_card_fields(trained: Path, tiny_npz: Path) -> None:
    card = json.loads((trained / "card.json").read_text())
    assert card["dataset"] == str(tiny_npz)
    assert card["architecture"] == "wide"
    assert (card["epochs"], card["batch_size"], card["seed"]) == (1, 64, 3)
    assert card["recipe"] == {
        "architecture": "wide",
        "epochs": 1,
        "batch_size": 64,
        "learning_rate": 2e-3,
        "cosine_decay": True,
        "augment": "none",  # an .npz of unknown content: no augmentation by default
        "class_weight": 1.0,
        "margin": 0.2,
        "scale": 24.0,
        "patience": 0,
        "contrastive_weight": 0.0,
        "temperature": 0.1,
        "whiten": False,
    }
    assert card["whitening"] is None, "a recipe with labels serves its embedding as trained"
    assert (card["preprocess"], card["labels"]) == ("digits", "10 classes from the dataset")
    assert card["command"][:3] == ["python", "-m", "encoder_service.train"]
    assert set(card["history"]) >= {"loss", "val_loss", "reconstruction_loss", "classes_loss"}
    retrieval = card["retrieval"]
    assert retrieval["k"] == 10 and 0.0 < retrieval["p_at_k"] <= retrieval["map_at_k"] <= 1.0
    assert card["train_size"] + card["validation_size"] == TINY
    assert card["validation_size"] == int(TINY * 0.1)
    assert card["test_size"] == 64
    assert card["input_shape"] == [28, 28, 1]
    assert card["embedding_dim"] == 128
    assert 0.0 < card["test_loss"] < 1.0, "the reconstruction's binary cross-entropy"
    assert card["final_train_loss"] > 0 and card["final_val_loss"] > 0
    assert card["model_version"].startswith("wide-")
    assert len(card["model_version"]) == len("wide-") + 12
    assert card["created"].endswith("+00:00")
    assert card["tflite_max_abs_diff"] is not None and card["tflite_max_abs_diff"] < 1e-4


def test_version_is_the_hash_of_the_weights(trained: Path) -> None:
    import keras

    from encoder_service.model import build_autoencoder, model_version, weights_digest

    card = json.loads((trained / "card.json").read_text())
    encoder = keras.saving.load_model(trained / "encoder.keras", compile=False)
    assert model_version("wide", encoder) == card["model_version"]

    # The same weights in a freshly built model hash the same; other weights do not.
    _, fresh = build_autoencoder("wide")
    assert weights_digest(fresh) != weights_digest(encoder)
    fresh.set_weights(encoder.get_weights())
    assert weights_digest(fresh) == weights_digest(encoder)


def test_same_seed_same_version(trained: Path, tiny_npz: Path, tmp_path: Path) -> None:
    argv = ["--dataset", str(tiny_npz), "--epochs", "1", "--batch-size", "64", "--seed", "3"]
    assert train.main([*argv, "--output", str(tmp_path / "again")]) == 0
    first = json.loads((trained / "card.json").read_text())
    again = json.loads((tmp_path / "again" / "card.json").read_text())
    assert again["model_version"] == first["model_version"]
    assert again["final_train_loss"] == pytest.approx(first["final_train_loss"], rel=1e-5)


def test_retraining_replaces_the_directory_whole(trained: Path, tiny_npz: Path, tmp_path: Path) -> None:
    output = tmp_path / "model"
    argv = ["--dataset", str(tiny_npz), "--epochs", "1", "--batch-size", "128", "--validation-split", "0"]
    assert train.main([*argv, "--output", str(output)]) == 0
    first = json.loads((output / "card.json").read_text())
    assert first["final_val_loss"] is None and first["validation_size"] == 0
    assert train.main([*argv, "--seed", "1", "--output", str(output)]) == 0
    second = json.loads((output / "card.json").read_text())
    assert second["seed"] == 1 and second["model_version"] != first["model_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuses_an_output_directory_with_other_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert train.main(["--output", str(tmp_path), "--epochs", "1"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'no-such-data'.*mnist-sample"):
        load_dataset("no-such-data")
    assert train.main(["--dataset", "no-such-data", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: unknown dataset 'no-such-data'" in err
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "data.csv"
    bad.write_text("1,2,3")
    with pytest.raises(ValueError, match=r"not an \.npz"):
        load_dataset(str(bad))
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="no x, y"):
        load_dataset(str(tmp_path / "nox.npz"))


def test_unknown_architecture_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert train.main(["--model", "resnet9000", "--output", str(tmp_path / "out")]) == 2
    assert "unknown model architecture 'resnet9000'; known: tutorial, wide" in capsys.readouterr().err


@pytest.mark.parametrize("architecture", ["tutorial", "wide"])
def test_architecture_shapes(architecture: str) -> None:
    from encoder_service.model import build_autoencoder

    autoencoder, encoder = build_autoencoder(architecture)
    assert autoencoder.input_shape == (None, 28, 28, 1)
    assert autoencoder.output_shape == (None, 28, 28, 1)
    assert encoder.output_shape == (None, 128)
    assert {id(w) for w in encoder.weights} <= {id(w) for w in autoencoder.weights}, "layers are shared"


def test_wide_embeddings_are_unit_vectors() -> None:
    from encoder_service.model import build_autoencoder

    _, encoder = build_autoencoder("wide")
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype(np.float32)
    assert np.allclose(np.linalg.norm(np.asarray(encoder(x)), axis=1), 1.0, atol=1e-5)


def test_the_tutorial_recipe(tiny_npz: Path, tmp_path: Path) -> None:
    """The tutorial's model trains as the tutorial did: reconstruction only, no augmentation, Adam 1e-3."""
    output = tmp_path / "tutorial"
    assert (
        train.main(
            ["--dataset", str(tiny_npz), "--model", "tutorial", "--epochs", "1", "--output", str(output)]
        )
        == 0
    )
    card = json.loads((output / "card.json").read_text())
    assert card["model_version"].startswith("tutorial-")
    recipe = card["recipe"]
    assert (recipe["class_weight"], recipe["augment"], recipe["learning_rate"]) == (0.0, "none", 1e-3)
    assert not recipe["cosine_decay"]
    assert set(card["history"]) == {"loss", "val_loss"}
    assert 0.0 < card["final_train_loss"] < 1.0


def test_recipes_follow_the_data() -> None:
    assert train.recipe_for("wide", "mnist-sample").augment == "digits"
    assert (train.recipe_for("wide", "mnist").epochs, train.recipe_for("wide", "mnist").patience) == (40, 3)
    assert train.recipe_for("wide", "/data/my.npz").patience == 0
    assert train.recipe_for("wide", "fashion_mnist").augment == "none"
    assert train.recipe_for("wide", "fashion_mnist").epochs == 7
    assert train.recipe_for("wide", "/data/my.npz").augment == "none"
    assert train.recipe_for("tutorial", "mnist-sample").augment == "none"


def test_augmentation_keeps_shape_and_range() -> None:
    import tensorflow as tf

    from encoder_service.augment import augment

    with np.load(SAMPLE_PATH) as data:
        x = tf.constant(data["x"][:32, :, :, None].astype(np.float32) / 255.0)
    for preset in ("digits", "clothes", "none"):
        changed = augment(x, preset).numpy()
        assert changed.shape == (32, 28, 28, 1), preset
        assert changed.min() >= 0.0 and changed.max() <= 1.0, preset
    assert not np.allclose(augment(x, "digits").numpy(), x.numpy()), "digits are moved"
    assert np.array_equal(augment(x, "none").numpy(), x.numpy())
    with pytest.raises(ValueError, match="unknown augmentation 'sideways'"):
        augment(x, "sideways")


def test_photo_augmentation_keeps_colour_shape_and_range() -> None:
    """The photo presets on real colour icons of a non-square size: shape and range kept, the border
    filled with the edge colour (no black corners on a white icon), colours changed only by `photo`."""
    import tensorflow as tf

    from encoder_service.augment import PRESETS, augment
    from encoder_service.datasets import load_icons

    icons = load_icons().x_train[:16].astype(np.float32) / 255.0
    x = tf.constant(np.concatenate([icons, icons[:, :8]], axis=1))  # 40x32: not square
    for preset in PRESETS:
        changed = augment(x, preset).numpy()
        assert changed.shape == (16, 40, 32, 3) and 0.0 <= changed.min() <= changed.max() <= 1.0, preset
    geometry = augment(x, "photo-geometry").numpy()
    assert not np.allclose(geometry, x.numpy()), "moved"
    corners = geometry[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    original = x.numpy()
    border = np.concatenate([original[:, [0, -1]].reshape(-1, 3), original[:, :, [0, -1]].reshape(-1, 3)])
    black = np.mean(np.all(border < 0.05, axis=-1))  # how often the icons' own edges are black
    assert np.mean(np.all(corners < 0.05, axis=-1)) <= black + 0.05, "the edge extended, not filled black"
    gray = np.repeat(x.numpy().mean(axis=3, keepdims=True), 3, axis=3)
    jittered = augment(tf.constant(gray), "photo").numpy()
    assert np.allclose(jittered, jittered[..., :1], atol=1e-6), "a gray image stays gray"


def test_early_stopping_keeps_the_best_weights(tiny_npz: Path, tmp_path: Path) -> None:
    output = tmp_path / "early"
    argv = ["--dataset", str(tiny_npz), "--epochs", "40", "--patience", "1", "--learning-rate", "0.05"]
    assert train.main([*argv, "--output", str(output)]) == 0
    card = json.loads((output / "card.json").read_text())
    assert card["epochs"] < 40, "a rate this high stops improving the validation loss long before"
    assert card["recipe"]["patience"] == 1


def test_mnist_sample_split() -> None:
    dataset = load_dataset("mnist-sample")
    with np.load(SAMPLE_PATH) as data:
        x = data["x"]
    assert dataset.x_train.shape == (8000, 28, 28) and dataset.x_train.dtype == np.uint8
    assert dataset.x_test.shape == (2000, 28, 28)
    assert np.array_equal(dataset.x_test, x[-2000:]), "the test split is the last 2,000"
    assert np.array_equal(dataset.x_train, x[:8000])
    assert len(dataset.y_train) == 8000 and len(dataset.y_test) == 2000


def test_npz_without_test_split(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 28, 28, 1)).astype(np.float32)  # floats in [0, 1] are accepted
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    dataset = load_dataset(str(tmp_path / "d.npz"))
    assert dataset.x_train.shape == (5, 28, 28) and dataset.x_train.dtype == np.uint8
    assert np.array_equal(dataset.x_train, np.round(x[..., 0] * 255).astype(np.uint8))
    assert dataset.x_test.shape == (0, 28, 28) and not dataset.has_test


def test_folder_of_images_labels_from_subfolders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with np.load(SAMPLE_PATH) as data:
        x = data["x"][:6]
    labels = ["cat", "cat", "dog", "dog", "dog", "emu"]
    for i, label in enumerate(labels):
        folder = tmp_path / label
        folder.mkdir(exist_ok=True)
        Image.fromarray(x[i]).save(folder / f"{i}.png")
    (tmp_path / "emu" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "stray.png").write_bytes((tmp_path / "cat" / "0.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="encoder_service.datasets"):
        dataset = load_dataset(str(tmp_path))
    assert dataset.class_names == ("cat", "dog", "emu")
    assert sorted(dataset.y_train.tolist()) == [0, 0, 1, 1, 1, 2], "in a seeded shuffled order"
    for image, label in zip(dataset.x_train, dataset.y_train, strict=True):  # each image kept with its label
        assert any(
            np.array_equal(image, x[i]) for i, name in enumerate(labels) if name == dataset.class_names[label]
        )
    assert dataset.x_train.shape == (6, 28, 28) and dataset.x_train.dtype == np.uint8
    assert dataset.x_train.max() > 200, "ink stays ink"
    assert not dataset.has_test
    assert "broken.png" in caplog.text and "stray.png" in caplog.text


def test_read_idx(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 28, 28], ">u4").tobytes()
    with gzip.open(tmp_path / "images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    assert np.array_equal(read_idx(tmp_path / "images-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
