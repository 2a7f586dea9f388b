"""Training and evaluation datasets: uint8 images with labels, grayscale [N, 28, 28] (0 = background,
255 = ink) or of a model's own input shape.

`load_dataset(name_or_path, input_shape=..., preprocess=..., labels=...)` understands:
- `mnist`: Keras's MNIST download (60,000 / 10,000); on any failure (offline, say) it logs a warning
  and falls back to the shipped sample, and the dataset's name says so (`mnist-sample`).
- `mnist-sample`: the shipped `encoder_service/data/mnist-10k.npz`, 10,000 real MNIST digits, split
  train = the first 8,000, test = the last 2,000 (the query split: never train on it).
- `icons`: the shipped colour set `encoder_service/data/oxygen-icons-32.npz` (KDE's Oxygen icons from
  Debian's `oxygen-icon-theme`, built by `python -m tools.build_colour_dataset`): RGB uint8
  [N, 32, 32, 3] composited on white, labels = the icon category (actions, apps, mimetypes...);
  train = the index split (1,026), test = the query split (257). Not 28x28 grayscale: see `load_icons`.
- `fashion_mnist`: Debian's IDX files in /usr/share/datasets/fashion-mnist when present (package
  `dataset-fashion-mnist`), else Keras's download.
- a path to an `.npz` with `x` and `y` (optional `x_test`, `y_test`; without them no test split).
- a path to a folder of images (no test split; in a seeded shuffled order, so the validation split that
  training holds out mixes the classes), each file decoded as the model will decode it: with
  `preprocess="digits"` by `encoder_service.preprocess.decode_image` (28x28 gray), with `"photo"` by
  `encoder_service.photo.decode_photo` at `input_shape` (colour kept). Undecodable files are skipped with
  a warning. Labels (`labels`): `"auto"` takes the subfolder names as the labels when there are
  subfolders, and a flat folder (images and no subfolders) as unlabelled; `"folders"` insists on
  subfolders; `"none"` takes every image under the folder, at any depth, as unlabelled.

An unlabelled dataset (`Dataset.labelled` False) has one placeholder label 0 for every image: training
learns from the images alone (the self-supervised recipe of `encoder_service.train`).

No TensorFlow at import time: Keras is imported only on the download paths.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SHAPE = (28, 28)
SAMPLE_PATH = Path(__file__).parent / "data" / "mnist-10k.npz"
SAMPLE_TRAIN_SIZE = 8_000
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
ICONS_PATH = Path(__file__).parent / "data" / "oxygen-icons-32.npz"
ICONS_SHAPE = (32, 32, 3)
NAMED_DATASETS = ("mnist", "mnist-sample", "fashion_mnist", "icons")
LABEL_MODES = ("auto", "folders", "none")
PREPROCESSINGS = ("digits", "photo")  # as the encoder service's: how a file becomes a model input
DIGITS_SHAPE = (28, 28, 1)  # what the digits preprocessing makes of every image


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 [N, H, W] (grayscale; 0 = background, 255 = ink for digits) or [N, H, W, 3] (RGB),
    and integer labels [N].

    `class_names[y]` is a label's name where known. A dataset without a test split holds empty
    [0, H, W(, 3)] / [0] test arrays. `labelled` False: the labels are placeholders (all 0), not
    classes; nothing may learn from them or be scored by them."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = ()
    source: str = field(default="", compare=False)
    labelled: bool = True

    @property
    def has_test(self) -> bool:
        return len(self.x_test) > 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of its images: a model trained on it takes this."""
        height, width = (int(v) for v in self.x_train.shape[1:3])
        return (height, width, int(self.x_train.shape[3]) if self.x_train.ndim == 4 else 1)


def load_dataset(
    name_or_path: str,
    *,
    input_shape: tuple[int, int, int] = DIGITS_SHAPE,
    preprocess: str = "digits",
    labels: str = "auto",
) -> Dataset:
    """Loads a dataset by name (`mnist`, `mnist-sample`, `fashion_mnist`, `icons`) or path (`.npz`, folder).

    `input_shape`, `preprocess` and `labels` say how a folder's files are read (see the module's
    docstring); named and .npz datasets hold arrays of their own shape. Raises ValueError for an unknown
    name, a file of the wrong format or a folder with no images to learn from."""
    if labels not in LABEL_MODES:
        raise ValueError(f"unknown labels mode {labels!r}; known: {', '.join(LABEL_MODES)}")
    if name_or_path == "mnist":
        return _load_mnist()
    if name_or_path == "mnist-sample":
        return load_mnist_sample()
    if name_or_path in ("fashion_mnist", "fashion-mnist"):
        return _load_fashion_mnist()
    if name_or_path == "icons":
        return load_icons()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_folder(path, name_or_path, input_shape, preprocess, labels)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ValueError(f"dataset file {str(path)!r} is not an .npz file (with arrays 'x' and 'y')")
        return _load_npz(path, name_or_path)
    raise ValueError(
        f"unknown dataset {name_or_path!r}: not one of {', '.join(NAMED_DATASETS)}, "
        "and no .npz file or folder of images exists at that path"
    )


def load_mnist_sample() -> Dataset:
    """The shipped 10,000-digit sample: train = the first 8,000, test = the last 2,000."""
    with np.load(SAMPLE_PATH) as data:
        x, y = _as_images(data["x"], SAMPLE_PATH), np.asarray(data["y"])
    n = SAMPLE_TRAIN_SIZE
    return Dataset(
        name="mnist-sample",
        x_train=x[:n],
        y_train=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        class_names=DIGIT_CLASSES,
        source="encoder_service/data/mnist-10k.npz",
    )


def load_icons(path: str | Path = ICONS_PATH) -> Dataset:
    """The shipped colour icon set: RGB uint8 [N, 32, 32, 3] (on white), train = index, test = queries.

    Its images are colour 32x32, unlike every other dataset here (grayscale 28x28, 0 = background):
    a consumer must take `x_train.shape[1:]` as the input shape (`--input-shape 32x32x3`)."""
    path = Path(path)
    with np.load(path) as data:
        x, y = np.asarray(data["x"]), np.asarray(data["y"])
        x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"])
        classes = tuple(str(c) for c in data["classes"])
        source = str(data["source"]) if "source" in data.files else str(path)
    for images, labels in ((x, y), (x_test, y_test)):
        if images.dtype != np.uint8 or images.shape[1:] != ICONS_SHAPE or len(images) != len(labels):
            raise ValueError(f"{path}: expected uint8 [N, 32, 32, 3] images and N labels, got {images.shape}")
    return Dataset(
        name="icons",
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        class_names=classes,
        source=source,
    )


def _load_mnist() -> Dataset:
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # offline, proxy, corrupt cache...: any failure falls back
        log.warning("could not load MNIST through Keras (%s); falling back to the shipped sample", exc)
        return load_mnist_sample()
    return Dataset(
        name="mnist",
        x_train=_as_images(x_train, "mnist"),
        y_train=np.asarray(y_train),
        x_test=_as_images(x_test, "mnist"),
        y_test=np.asarray(y_test),
        class_names=DIGIT_CLASSES,
        source="keras.datasets.mnist",
    )


def _load_fashion_mnist() -> Dataset:
    files = {
        key: FASHION_MNIST_DIR / f"{key}-ubyte.gz"
        for key in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    }
    if all(path.is_file() for path in files.values()):
        x_train, y_train = read_idx(files["train-images-idx3"]), read_idx(files["train-labels-idx1"])
        x_test, y_test = read_idx(files["t10k-images-idx3"]), read_idx(files["t10k-labels-idx1"])
        source = str(FASHION_MNIST_DIR)
    else:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
        source = "keras.datasets.fashion_mnist"
    return Dataset(
        name="fashion_mnist",
        x_train=_as_images(x_train, source),
        y_train=np.asarray(y_train),
        x_test=_as_images(x_test, source),
        y_test=np.asarray(y_test),
        class_names=FASHION_CLASSES,
        source=source,
    )


_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (MNIST's format), gzipped when the name ends in .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    array = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=header)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape}, the file holds {array.size} values")
    return array.reshape(shape)


def _load_npz(path: Path, name: str) -> Dataset:
    with np.load(path) as data:
        missing = [key for key in ("x", "y") if key not in data.files]
        if missing:
            raise ValueError(f"{path}: the .npz has no {', '.join(missing)} (found {data.files})")
        x, y = _as_images(data["x"], path), np.asarray(data["y"])
        if "x_test" in data.files and "y_test" in data.files:
            x_test, y_test = _as_images(data["x_test"], path), np.asarray(data["y_test"])
        else:
            x_test, y_test = _empty_split(y.dtype)
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels (test: {len(x_test)} / {len(y_test)})")
    return Dataset(name=name, x_train=x, y_train=y, x_test=x_test, y_test=y_test, source=str(path))


def _load_folder(
    root: Path, name: str, input_shape: tuple[int, int, int], preprocess: str, labels: str
) -> Dataset:
    from encoder_service.preprocess import ImageError

    decode = _decoder(preprocess, input_shape)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = labels == "none" or (labels == "auto" and not subfolders)
    if labels == "folders" and not subfolders:
        raise ValueError(f"{root}: no label subfolders (with --labels folders, each label is a subfolder)")
    if flat:
        files = [(file, 0) for file in _image_files(root)]
        class_names: tuple[str, ...] = ()
    else:
        class_names = tuple(subfolders)
        for stray in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
            log.warning("%s: not in a label subfolder, skipped (--labels none takes every image)", stray)
        files = [
            (file, label) for label, folder in enumerate(class_names) for file in _image_files(root / folder)
        ]
    images: list[np.ndarray] = []
    found: list[int] = []
    for file, label in files:
        try:
            pixels = decode(file.read_bytes())
        except (ImageError, OSError) as exc:
            log.warning("%s: skipped, could not decode (%s)", file, exc)
            continue
        images.append(np.round(np.asarray(pixels, np.float32) * 255.0).clip(0, 255).astype(np.uint8))
        found.append(label)
    if not images:
        where = "in it" if flat else f"in label subfolders (classes: {list(class_names)})"
        raise ValueError(f"{root}: no decodable images {where}")
    # A seeded shuffle: files come class by class, and training holds out the last images for validation.
    order = np.random.default_rng(0).permutation(len(images))
    x = np.stack(images)[order]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    return Dataset(
        name=name,
        x_train=x,
        y_train=np.asarray(found, np.int64)[order],
        x_test=np.zeros((0, *x.shape[1:]), np.uint8),
        y_test=np.zeros((0,), np.int64),
        class_names=class_names,
        source=str(root),
        labelled=not flat,
    )


def _image_files(folder: Path) -> list[Path]:
    """Every file under `folder`, at any depth, in a stable order; hidden files and folders left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _decoder(preprocess: str, input_shape: tuple[int, int, int]) -> Callable[[bytes], np.ndarray]:
    """How the encoder service will decode a file for a model of this preprocessing and input shape
    (`duplicate_distance.decoder_for`), refusing the digits preprocessing at any shape but its own."""
    from encoder_service.duplicate_distance import decoder_for

    if preprocess not in PREPROCESSINGS:
        raise ValueError(f"unknown preprocessing {preprocess!r}; known: {', '.join(PREPROCESSINGS)}")
    if preprocess == "digits" and tuple(input_shape) != DIGITS_SHAPE:
        raise ValueError(
            "the digits preprocessing makes 28x28x1 inputs only; "
            f"use --preprocess photo for {'x'.join(map(str, input_shape))}"
        )
    return decoder_for(preprocess, input_shape)


def _empty_split(label_dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros((0,), label_dtype)


def _as_images(x: np.ndarray, source: object) -> np.ndarray:
    """uint8 [N, 28, 28]; accepts [N, 28, 28, 1] and floats in [0, 1] (converted with round(v * 255))."""
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{source}: images must be [N, 28, 28] (or [N, 28, 28, 1]), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < 0.0 or np.nanmax(x) > 1.0):
            raise ValueError(f"{source}: float images must be in [0, 1]")
        return np.round(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{source}: integer images must be in [0, 255]")
        return x.astype(np.uint8)
    raise ValueError(f"{source}: images of dtype {x.dtype} are not supported")
