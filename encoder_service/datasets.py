"""Training and evaluation datasets: 28x28 grayscale uint8 images (0 = background, 255 = ink) with labels.

`load_dataset(name_or_path)` understands:
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
- a path to a folder of images whose subfolder names are the labels (no test split); each file is
  decoded with `encoder_service.preprocess.decode_image`, undecodable files are skipped with a warning.

No TensorFlow at import time: Keras is imported only on the download paths.
"""

from __future__ import annotations

import gzip
import logging
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


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 [N, 28, 28] (0 = background, 255 = ink) and integer labels [N].

    `class_names[y]` is a label's name where known. A dataset without a test split holds empty
    [0, 28, 28] / [0] test arrays."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = ()
    source: str = field(default="", compare=False)

    @property
    def has_test(self) -> bool:
        return len(self.x_test) > 0


def load_dataset(name_or_path: str) -> Dataset:
    """Loads a dataset by name (`mnist`, `mnist-sample`, `fashion_mnist`, `icons`) or path (`.npz`, folder).

    Raises ValueError for an unknown name or a file of the wrong format."""
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
        return _load_folder(path, name_or_path)
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


def _load_folder(root: Path, name: str) -> Dataset:
    from encoder_service.preprocess import ImageError, decode_image

    class_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    for stray in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        log.warning("%s: not in a label subfolder, skipped", stray)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        for file in sorted(p for p in (root / class_name).rglob("*") if p.is_file()):
            if file.name.startswith("."):
                continue
            try:
                pixels = decode_image(file.read_bytes())
            except (ImageError, OSError) as exc:
                log.warning("%s: skipped, could not decode (%s)", file, exc)
                continue
            images.append(np.round(np.asarray(pixels, np.float32) * 255.0).clip(0, 255).astype(np.uint8))
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no decodable images in label subfolders (classes: {list(class_names)})")
    x_test, y_test = _empty_split(np.int64)
    return Dataset(
        name=name,
        x_train=np.stack(images),
        y_train=np.asarray(labels, np.int64),
        x_test=x_test,
        y_test=y_test,
        class_names=class_names,
        source=str(root),
    )


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
