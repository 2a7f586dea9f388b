"""Trains an autoencoder and writes the model directory that the encoder service serves.

    python -m encoder_service.train --dataset mnist-sample --epochs 10 --output encoder_service/models/default

The output directory gets:
- `autoencoder.keras`: the whole autoencoder (to resume or inspect reconstructions);
- `encoder.keras`: the encoder alone, served by the TensorFlow runtime;
- `encoder.tflite`: the encoder as a LiteRT flatbuffer with a dynamic batch dimension, served by default;
- `card.json`: what was trained on what, the losses, and `model_version`, a content hash of the encoder's
  weights ("<architecture>-" + 12 hex of sha256), identical for identical weights.

Everything is written to a temporary sibling directory first and swapped in at the end, so a crash never
leaves a half-written model behind. TensorFlow is imported only once training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.datasets import Dataset, load_dataset

MODEL_FILES = ("autoencoder.keras", "encoder.keras", "encoder.tflite", "card.json")
DEFAULT_OUTPUT = "models/custom"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_service.train",
        description="Train the image autoencoder and write a model directory for the encoder service.",
    )
    parser.add_argument(
        "--dataset",
        default="mnist-sample",
        help="mnist, mnist-sample (default: the shipped 8,000 training digits), fashion_mnist, "
        "a path to an .npz with x and y, or a folder of images in label subfolders",
    )
    parser.add_argument("--model", default="tutorial", help="architecture name (default: tutorial)")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="default: 10")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="default: 128")
    parser.add_argument(
        "--validation-split",
        type=_fraction,
        default=0.1,
        help="fraction of the training images held out for the validation loss, in [0, 1) (default: 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"model directory to write (default: {DEFAULT_OUTPUT})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (also `imgsearch train`). Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        dataset = load_dataset(args.dataset)
        output = _check_output(Path(args.output))
        from encoder_service.model import ARCHITECTURES

        if args.model not in ARCHITECTURES:
            raise ValueError(f"unknown model architecture {args.model!r}; known: {', '.join(ARCHITECTURES)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(dataset.x_train) < 2:
        print(f"error: dataset {dataset.name!r} has {len(dataset.x_train)} training images", file=sys.stderr)
        return 2
    started = time.perf_counter()
    card = train(
        dataset,
        output,
        architecture=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.validation_split,
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    val = card["final_val_loss"]
    print(
        f"wrote {output}: model_version {card['model_version']}, {card['architecture']} on "
        f"{card['dataset']} ({card['train_size']} images, {card['epochs']} epochs), "
        f"train loss {card['final_train_loss']:.4f}, "
        f"val loss {'n/a' if val is None else f'{val:.4f}'}, {seconds:.1f} s"
    )
    return 0


def train(
    dataset: Dataset,
    output: Path,
    *,
    architecture: str = "tutorial",
    epochs: int = 10,
    batch_size: int = 128,
    validation_split: float = 0.1,
    seed: int = 0,
    verbose: int | None = None,
) -> dict[str, Any]:
    """Trains on `dataset.x_train` only, writes the model directory, and returns its card."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from encoder_service.model import EMBEDDING_DIM, INPUT_SHAPE, build_autoencoder, model_version

    keras.utils.set_random_seed(seed)
    with contextlib.suppress(Exception):  # already enabled, or unsupported: seeding still applies
        tf.config.experimental.enable_op_determinism()

    x = _to_input(dataset.x_train)
    n_val = int(len(x) * validation_split)
    if validation_split > 0 and n_val == 0:
        n_val = 1  # Keras would hold out nothing and report no validation loss
    autoencoder, encoder = build_autoencoder(architecture)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2  # the progress bar on a terminal, a line per epoch in logs
    started = time.perf_counter()
    history = autoencoder.fit(
        x[: len(x) - n_val],
        x[: len(x) - n_val],
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        validation_data=(x[len(x) - n_val :], x[len(x) - n_val :]) if n_val else None,
        verbose=verbose,
    )
    training_seconds = time.perf_counter() - started
    test_loss = None
    if dataset.has_test:
        x_test = _to_input(dataset.x_test)
        test_loss = float(autoencoder.evaluate(x_test, x_test, verbose=0))

    version = model_version(architecture, encoder)
    losses = history.history.get("loss", [])
    val_losses = history.history.get("val_loss", [])
    card: dict[str, Any] = {
        "model_version": version,
        "architecture": architecture,
        "dataset": dataset.name,
        "dataset_source": dataset.source,
        "class_names": list(dataset.class_names),
        "epochs": epochs,
        "batch_size": batch_size,
        "validation_split": validation_split,
        "seed": seed,
        "train_size": len(x) - n_val,
        "validation_size": n_val,
        "test_size": len(dataset.x_test),
        "final_train_loss": float(losses[-1]) if losses else None,
        "final_val_loss": float(val_losses[-1]) if val_losses else None,
        "test_loss": test_loss,
        "loss": "binary_crossentropy",
        "input_shape": list(INPUT_SHAPE),
        "input_range": [0.0, 1.0],
        "embedding_dim": EMBEDDING_DIM,
        "training_seconds": round(training_seconds, 2),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory should read like any other
    try:
        autoencoder.save(tmp / "autoencoder.keras")
        encoder.save(tmp / "encoder.keras")
        tflite = _to_tflite(encoder)
        (tmp / "encoder.tflite").write_bytes(tflite)
        card["tflite_max_abs_diff"] = _check_tflite(tflite, encoder, x[:16])
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        _swap_in(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def _to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 28, 28, 1] in [0, 1]."""
    return (np.asarray(images, np.float32) / np.float32(255.0))[..., None]


def _to_tflite(encoder: Any) -> bytes:
    """The encoder as a LiteRT flatbuffer, with Keras's dynamic batch dimension: input [-1, 28, 28, 1]."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(encoder)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its temporary SavedModel
        return bytes(converter.convert())


def _check_tflite(tflite: bytes, encoder: Any, x: np.ndarray) -> float | None:
    """Max abs difference between the flatbuffer's and Keras's embeddings of `x` (None without LiteRT)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interpreter = Interpreter(model_content=tflite)
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    diff = float(np.max(np.abs(interpreter.get_tensor(out["index"]) - np.asarray(encoder(x)))))
    if diff > 1e-4:
        raise RuntimeError(f"the LiteRT flatbuffer disagrees with the Keras encoder by {diff}")
    return diff


def _check_output(output: Path) -> Path:
    """Refuses an output path that holds anything other than a model directory's files."""
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"output {str(output)!r} exists and is not a directory")
        foreign = sorted(p.name for p in output.iterdir() if p.name not in MODEL_FILES)
        if foreign:
            raise ValueError(
                f"output directory {str(output)!r} holds files that are not a model's "
                f"({', '.join(foreign[:5])}); "
                "choose an empty or new directory"
            )
    return output


def _swap_in(tmp: Path, output: Path) -> None:
    """Replaces `output` with the finished directory `tmp`: at any moment one whole model is there,
    except for the instant between two renames when an old one exists only as `.<name>.old-*`."""
    if not output.exists():
        os.replace(tmp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.rmdir(old)
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
