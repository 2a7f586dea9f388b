"""Trains an autoencoder and writes the model directory that the encoder service serves.

    python -m encoder_service.train --dataset mnist-sample --output encoder_service/models/default
    python -m encoder_service.train --model tutorial --output encoder_service/models/tutorial

    python -m encoder_service.train --dataset photos/ --input-shape 32x32x3 --output models/photos

The model takes `--input-shape HxWxC` (default: the dataset's own; 28x28x1 for a folder) and records
`--preprocess` (digits at 28x28x1, photo otherwise) in its card: the encoder decodes images for it the
same way, and a folder's files are decoded that way for training.

Recipes, by architecture (`--model`) and by whether there are labels (every part can be changed by its flag):
- `wide` (the default), with labels: Adam at 2e-3 with cosine decay, binary cross-entropy on the
  reconstruction plus a cosine class head with an additive margin (CosFace; `--class-weight 0` turns it
  off); on MNIST up to 40 epochs, stopped 3 after the best validation loss, with `digits` augmentation
  (see `encoder_service.augment`); on Fashion-MNIST 7 epochs, no augmentation; photo models `photo`
  augmentation for about 1,200 steps (`photo_epochs`: 150 epochs on the icons); elsewhere 15 epochs;
- `wide` without labels (a flat folder, a single class, or `--labels none`): the self-supervised recipe
  (`self_supervised_recipe`), two augmented views of each image pulled together by NT-Xent beside the
  reconstruction (`encoder_service.contrastive`), batches of 256, temperature 0.2, 30 epochs of `digits`
  augmentation, for gray data; Fashion-MNIST and photos take the autoencoder alone on augmented images
  instead (`garments`, 20 epochs; `photo-geometry`, about 1,200 steps), which measured better there
  than every contrastive variant (below);
- `tutorial`: the tutorial's: 10 epochs of Adam at its default rate, reconstruction only, no augmentation.

What the self-supervised recipe was measured against (P@10, test split against the training split, exact
L2; 2 cores):
- MNIST sample (training on its first 7,200 digits): the autoencoder alone (what training without labels
  was before) 0.92. NT-Xent beside the reconstruction at temperature 0.1, 40 epochs: 0.945; with a
  two-layer projection head under the loss 0.953; batches of 512 0.944; 15 epochs then 15 more with a
  cosine head on k-means pseudo-labels (K = 50 / 100) 0.955 / 0.952; temperature 0.2, 40 epochs, 0.956.
  Kept: temperature 0.2, no head, 30 epochs: 0.957 in 135 s of training; whitened (below) 0.963.
- Fashion-MNIST (20,000 of the training split for 10 epochs; index: all 60,000, queries: the 10,000 test
  images; raw pixels 0.805): NT-Xent at 0.2 on `garments` views 0.805 (all 60,000: 0.814); its
  reconstruction weighted 0.1 or 3: 0.805, 0.805; a projection head 0.786; stronger views (25 % zoom,
  erased patches) 0.794; temperature 0.5 0.775, 0.1 (`clothes` views) 0.795; the contrastive loss weighted
  0.2: 0.806; the autoencoder alone on `garments` views 0.819, then k-means pseudo-labels (K = 100) 0.815.
  Kept: the autoencoder alone on `garments` views, 20 epochs on all 60,000: 0.833 (P@1 0.872); whitened
  0.844 (P@1 0.882), in 352 s of training, 6.3 minutes in all (the target was 0.85: not reached).
- The icons (index 1,026, queries 257; raw pixels P@10 0.491, mean per class 0.486): NT-Xent on `photo`
  views, 150 epochs, at 0.2: 0.479 (mean per class 0.345), at 0.1: 0.508 (0.373), on `photo-geometry`
  views 0.504 (0.350); the autoencoder alone on `photo` views, 100 epochs: 0.559 (0.484), on
  `photo-geometry` views 0.568 (0.492). Kept: the autoencoder alone on `photo-geometry` views, about 1,200
  steps (150 epochs): 0.562 (P@1 0.697) in 131 s; whitened 0.579 (P@1 0.700). With labels (the class
  head, `photo` views): 0.490 after 30 epochs, 0.666 after 150.
The contrastive loss pays where views of one class look alike once moved (digits); where classes differ
by details or colour (clothes, icons), it teaches the model to ignore what tells them apart.
Every self-supervised model's served embedding is then whitened on the training split's embeddings
(`encoder_service.whitening`; `whiten` in the recipe): it spreads the variance that training left in a
few directions, and gained on all three sets (figures above and in that module).

`--patience N` stops early once the validation loss has not improved for N epochs (keeping the best
weights). After training, the retrieval figures on the dataset's test split (index = the training
split, exact L2, k = 10) go into the card when there is a test split.

The output directory gets:
- `autoencoder.keras`: the whole autoencoder (to resume or inspect reconstructions);
- `encoder.keras`: the encoder alone, served by the TensorFlow runtime;
- `encoder.tflite`: the encoder as a LiteRT flatbuffer with a dynamic batch dimension, served by default;
- `decoder.tflite`: the decoder, from the served embedding to the reconstruction (of the input's shape),
  for the service's `Reconstruct` (`encoder_service.export`, which also adds it to a model directory
  trained before);
- `card.json`: what was trained on what, the losses, and `model_version`, a content hash of the encoder's
  weights ("<architecture>-" + 12 hex of sha256), identical for identical weights; and the model's
  near-duplicate distance `duplicate_distance` with its `nothing_close_factor`, measured on the dataset's
  images through the written model (`encoder_service.duplicate_distance`, a few seconds); and `novelty`,
  the distribution of the reconstruction errors on the validation split, whose 99th percentile the
  encoder's novelty score divides by (`encoder_service.novelty`, a second).

Everything is written to a temporary sibling directory first and swapped in at the end, so a crash never
leaves a half-written model behind. TensorFlow is imported only once training starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.augment import PRESETS as AUGMENTATIONS
from encoder_service.datasets import DIGITS_SHAPE, LABEL_MODES, PREPROCESSINGS, Dataset, load_dataset
from encoder_service.model_dir import (
    AUTOENCODER_KERAS,
    CARD_JSON,
    ENCODER_KERAS,
    ENCODER_TFLITE,
    MODEL_FILES,
    check_tflite,
    to_tflite,
)
from encoder_service.shapes import parse_input_shape

log = logging.getLogger(__name__)
DEFAULT_ARCHITECTURE = "wide"

DEFAULT_OUTPUT = "models/custom"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_service.train",
        description="Train the image autoencoder and write a model directory for the encoder service.",
    )
    parser.add_argument(
        "--dataset",
        default="mnist-sample",
        help="mnist, mnist-sample (default: the shipped 8,000 training digits), fashion_mnist, icons (the "
        "shipped colour set), a path to an .npz with x and y, or a folder of images: in label subfolders, "
        "or flat (no labels: the self-supervised recipe)",
    )
    parser.add_argument(
        "--input-shape",
        type=_input_shape,
        help="the model's input, HEIGHTxWIDTHxCHANNELS (for example 32x32x3, 64x64x3; sides 8-256 in "
        "multiples of 4, 1 or 3 channels). Default: the dataset's own shape; 28x28x1 for a folder",
    )
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESSINGS,
        help="how an image becomes the model's input, in training and in the service: digits (the MNIST "
        "fit: gray, ink centred by its box; 28x28x1 only) or photo (colour kept, padded to a square with "
        "the border colour and resized). Default: digits at 28x28x1, photo otherwise",
    )
    parser.add_argument(
        "--labels",
        choices=LABEL_MODES,
        default="auto",
        help="auto (default): a folder's label subfolders when it has them, a dataset's labels; folders: "
        "insist on label subfolders; none: ignore any labels and train the self-supervised recipe",
    )
    parser.add_argument("--model", default="wide", help="architecture and recipe: wide (default) or tutorial")
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        help="default: 40 with --patience 3 (wide on MNIST), 7 (wide on Fashion-MNIST), 15 (wide), "
        "10 (tutorial)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, help="default: 128; 256 for the self-supervised recipe"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help="Adam's initial rate (default: 2e-3 decaying (wide), 1e-3 (tutorial))",
    )
    parser.add_argument(
        "--augment",
        choices=("auto", *AUGMENTATIONS),
        default="auto",
        help="auto (default): digits for MNIST, none for other data and the tutorial",
    )
    parser.add_argument(
        "--class-weight",
        type=float,
        help="weight of the class head's loss beside the reconstruction's (default: 1 (wide), 0 (tutorial))",
    )
    parser.add_argument(
        "--margin", type=float, default=0.2, help="the class head's cosine margin (default 0.2)"
    )
    parser.add_argument("--scale", type=float, default=24.0, help="the class head's logit scale (default 24)")
    parser.add_argument(
        "--patience",
        type=int,
        help="stop after this many epochs without a better validation loss, keeping the best weights "
        "(0: train every epoch; default 3 for wide on MNIST, else 0)",
    )
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
        shape = args.input_shape or DIGITS_SHAPE
        preprocess = args.preprocess or ("digits" if shape == DIGITS_SHAPE else "photo")
        dataset = load_dataset(args.dataset, input_shape=shape, preprocess=preprocess, labels=args.labels)
        if args.input_shape is None and dataset.input_shape != shape:  # a named or .npz set of its own shape
            shape = dataset.input_shape
            preprocess = args.preprocess or ("digits" if shape == DIGITS_SHAPE else "photo")
        if dataset.input_shape != shape:
            raise ValueError(
                f"dataset {args.dataset!r} holds {_shape_text(dataset.input_shape)} images, not the "
                f"--input-shape {_shape_text(shape)}; a folder of image files is decoded to any shape"
            )
        if preprocess == "digits" and shape != DIGITS_SHAPE:
            raise ValueError(
                f"the digits preprocessing makes 28x28x1 inputs only; use --preprocess photo for "
                f"{_shape_text(shape)}"
            )
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
    use_labels = args.labels != "none" and _has_classes(dataset)
    if args.labels != "none" and dataset.labelled and not use_labels:
        log.warning("dataset %r has one class: training the self-supervised recipe", dataset.name)
    images = len(dataset.x_train) - int(len(dataset.x_train) * args.validation_split)
    recipe = recipe_for(args.model, dataset.name, labelled=use_labels, preprocess=preprocess, images=images)
    overrides = {
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "class_weight": args.class_weight,
        "augment": None if args.augment == "auto" else args.augment,
        "patience": args.patience,
        "batch_size": args.batch_size,
    }
    recipe = replace(
        recipe,
        margin=args.margin,
        scale=args.scale,
        **{key: value for key, value in overrides.items() if value is not None},
    )
    card = train(
        dataset,
        output,
        recipe=recipe,
        validation_split=args.validation_split,
        seed=args.seed,
        preprocess=preprocess,
        use_labels=use_labels,
        command=["python", "-m", "encoder_service.train", *(sys.argv[1:] if argv is None else argv)],
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


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: recorded whole in its card."""

    architecture: str = "wide"
    epochs: int = 15
    batch_size: int = 128
    learning_rate: float = 2e-3
    cosine_decay: bool = True  # the rate decays to 1 % of itself over the planned epochs
    augment: str = "none"
    class_weight: float = 1.0  # 0: reconstruction only
    margin: float = 0.2
    scale: float = 24.0
    patience: int = 0  # early stopping on the validation loss; 0 = off
    # The self-supervised objective (encoder_service.contrastive), for data without labels: 0 = off.
    contrastive_weight: float = 0.0
    temperature: float = 0.1
    whiten: bool = False  # the served embedding whitened after training (encoder_service.whitening)


PHOTO_STEPS = 1_200  # training steps a photo recipe aims at, whatever the folder's size (see photo_epochs)
PHOTO_EPOCHS = (15, 150)  # the fewest and most epochs it takes to get there


def photo_epochs(images: int, batch_size: int) -> int:
    """Epochs for a photo recipe: about PHOTO_STEPS steps, within PHOTO_EPOCHS. A small folder (the 924
    training icons: 8 steps an epoch) gets many epochs, a large one few, so that training takes minutes
    either way (measured on the icons: P@10 0.49 after 30 epochs, 0.67 after 150)."""
    steps = max(1, -(-images // batch_size))
    low, high = PHOTO_EPOCHS
    return max(low, min(high, -(-PHOTO_STEPS // steps)))


def recipe_for(
    architecture: str,
    dataset: str,
    *,
    labelled: bool = True,
    preprocess: str = "digits",
    images: int = 0,
) -> Recipe:
    """The default recipe of an architecture on a dataset (see the module's docstring): `labelled` False
    (no labels, or --labels none) picks the self-supervised one; `images`, the number of training
    images, sets a photo recipe's epochs."""
    if architecture == "tutorial":
        return Recipe(architecture, epochs=10, learning_rate=1e-3, cosine_decay=False, class_weight=0.0)
    if not labelled:
        return self_supervised_recipe(architecture, dataset, preprocess, images)
    if preprocess == "photo":
        return Recipe(architecture, epochs=photo_epochs(images, 128), augment="photo")
    if "fashion" in dataset:
        # Measured (docs/eval/EVAL.md): in a schedule this short, mirroring and shifting clothes cost
        # more than they teach; 7 epochs keep training under 10 minutes on 2 cores.
        return Recipe(architecture, epochs=7, augment="none")
    if dataset.startswith("mnist"):
        # Measured (python -m encoder_service.ablation): stopping 3 epochs after the best validation loss,
        # within 40, beats a fixed 15 (P@10 0.986 against 0.983 on the sample, in under 6 minutes).
        return Recipe(architecture, epochs=40, patience=3, augment="digits")
    return Recipe(architecture)


def self_supervised_recipe(architecture: str, dataset: str, preprocess: str, images: int = 0) -> Recipe:
    """Two augmented views pulled together beside the reconstruction (encoder_service.contrastive), by
    what the images are: measured in the module's docstring."""
    if preprocess == "photo":
        # Measured (the module's docstring): on the icons the autoencoder alone on shapes moved, mirrored
        # and scaled beat every contrastive variant tried, and raw pixels.
        return Recipe(
            architecture,
            epochs=photo_epochs(images, 128),
            augment="photo-geometry",
            class_weight=0.0,
            whiten=True,
        )
    if "fashion" in dataset:
        # Measured (the module's docstring): every contrastive variant tried scored below the autoencoder
        # alone on Fashion-MNIST, whose classes differ by details that augmented views are taught to ignore.
        return Recipe(architecture, epochs=20, augment="garments", class_weight=0.0, whiten=True)
    return Recipe(
        architecture,
        epochs=30,
        batch_size=256,
        augment="digits",
        class_weight=0.0,
        contrastive_weight=1.0,
        temperature=0.2,
        whiten=True,
    )


def train(
    dataset: Dataset,
    output: Path,
    *,
    recipe: Recipe | None = None,
    validation_split: float = 0.1,
    seed: int = 0,
    verbose: int | None = None,
    command: list[str] | None = None,
    preprocess: str | None = None,
    use_labels: bool | None = None,
) -> dict[str, Any]:
    """Trains on `dataset.x_train` only, writes the model directory, and returns its card.

    The model takes the dataset's input shape; `preprocess` (default: digits at 28x28x1, photo otherwise)
    is how the service will decode images for it, recorded in the card. `use_labels` False (default: the
    dataset's `labelled`) trains without the labels: the recipe must then have no class head."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from encoder_service.export import write_decoder
    from encoder_service.model import EMBEDDING_DIM, build_autoencoder, model_version

    shape = dataset.input_shape
    preprocess = preprocess or ("digits" if shape == DIGITS_SHAPE else "photo")
    use_labels = _has_classes(dataset) if use_labels is None else use_labels
    recipe = recipe or recipe_for(
        DEFAULT_ARCHITECTURE,
        dataset.name,
        labelled=use_labels,
        preprocess=preprocess,
        images=len(dataset.x_train) - int(len(dataset.x_train) * validation_split),
    )
    if not use_labels and recipe.class_weight > 0:
        raise ValueError("training without labels takes a recipe without the class head (class_weight 0)")
    keras.utils.set_random_seed(seed)
    with contextlib.suppress(Exception):  # already enabled, or unsupported: seeding still applies
        tf.config.experimental.enable_op_determinism()

    x = _to_input(dataset.x_train)
    y = np.asarray(dataset.y_train).astype(np.int32)
    n_val = int(len(x) * validation_split)
    if validation_split > 0 and n_val == 0:
        n_val = 1  # Keras would hold out nothing and report no validation loss
    classes = int(y.max()) + 1 if len(y) else 0
    if recipe.class_weight > 0 and classes < 2:
        log.warning("dataset %r has one class: training without the class head", dataset.name)
        recipe = replace(recipe, class_weight=0.0)
    autoencoder, encoder = build_autoencoder(recipe.architecture, shape)
    train_x, train_y = x[: len(x) - n_val], y[: len(y) - n_val]
    val_x, val_y = x[len(x) - n_val :], y[len(y) - n_val :]
    steps_per_epoch = -(-len(train_x) // recipe.batch_size)
    if recipe.contrastive_weight > 0:
        steps_per_epoch = max(1, len(train_x) // recipe.batch_size)  # whole batches: see _batches
    model = _training_model(autoencoder, encoder, recipe, classes, steps_per_epoch)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2  # the progress bar on a terminal, a line per epoch in logs
    callbacks = []
    if recipe.patience > 0 and n_val:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=recipe.patience, restore_best_weights=True
            )
        )
    started = time.perf_counter()
    history = model.fit(
        _batches(train_x, train_y, recipe, seed, augmented=True),
        epochs=recipe.epochs,
        validation_data=_batches(val_x, val_y, recipe, seed, augmented=False) if n_val else None,
        callbacks=callbacks,
        verbose=verbose,
    )
    training_seconds = time.perf_counter() - started
    whitening = None
    if recipe.whiten:
        from encoder_service.whitening import whiten

        autoencoder, encoder, whitening = whiten(autoencoder, encoder, train_x)
    test_loss = None
    if dataset.has_test:
        x_test = _to_input(dataset.x_test)
        test_loss = float(autoencoder.evaluate(x_test, x_test, verbose=0))

    version = model_version(recipe.architecture, encoder)
    losses = history.history.get("loss", [])
    val_losses = history.history.get("val_loss", [])
    card: dict[str, Any] = {
        "model_version": version,
        "architecture": recipe.architecture,
        "dataset": dataset.name,
        "dataset_source": _portable(dataset.source),
        "class_names": list(dataset.class_names),
        "epochs": len(losses),
        "batch_size": recipe.batch_size,
        "validation_split": validation_split,
        "seed": seed,
        "recipe": asdict(recipe),
        "command": command,
        "train_size": len(x) - n_val,
        "validation_size": n_val,
        "test_size": len(dataset.x_test),
        "final_train_loss": float(losses[-1]) if losses else None,
        "final_val_loss": float(val_losses[-1]) if val_losses else None,
        "test_loss": test_loss,
        "history": {key: [round(float(v), 5) for v in values] for key, values in history.history.items()},
        "loss": "binary_crossentropy"
        + (" + cosine-margin softmax" if recipe.class_weight > 0 else "")
        + (" + NT-Xent between two augmented views" if recipe.contrastive_weight > 0 else ""),
        "input_shape": list(shape),
        "preprocess": preprocess,
        "labels": f"{classes} classes from the dataset" if use_labels else "none: the self-supervised recipe",
        "input_range": [0.0, 1.0],
        "embedding_dim": EMBEDDING_DIM,
        "whitening": whitening,
        "training_seconds": round(training_seconds, 2),
        "retrieval": _retrieval(encoder, dataset) if dataset.has_test and dataset.labelled else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory should read like any other
    try:
        autoencoder.save(tmp / AUTOENCODER_KERAS)
        encoder.save(tmp / ENCODER_KERAS)
        tflite = to_tflite(encoder)
        (tmp / ENCODER_TFLITE).write_bytes(tflite)
        card["tflite_max_abs_diff"] = check_tflite(tflite, encoder, x[:16])
        card.update(write_decoder(autoencoder, encoder, tmp, x[:16]))  # decoder.tflite, checked
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        card.update(_duplicate_distance(tmp, encoder, dataset, preprocess))  # through the model just written
        held_out = val_x[..., 0] if preprocess == "digits" else val_x  # as the runtime takes each
        card.update(_novelty(tmp, autoencoder, held_out, dataset, preprocess))
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        _swap_in(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def _training_model(
    autoencoder: Any, encoder: Any, recipe: Recipe, classes: int, steps_per_epoch: int
) -> Any:
    """The autoencoder, with the class head beside it when the recipe has one, compiled; the contrastive
    trainer around it for the self-supervised recipe."""
    import keras

    from encoder_service.model import CosineHead, cosine_margin_loss

    rate: Any = recipe.learning_rate
    if recipe.cosine_decay:
        rate = keras.optimizers.schedules.CosineDecay(
            recipe.learning_rate, recipe.epochs * steps_per_epoch, alpha=0.01
        )
    if recipe.contrastive_weight > 0:
        from encoder_service.contrastive import ContrastiveTrainer

        trainer = ContrastiveTrainer(
            autoencoder,
            encoder,
            augment_preset=recipe.augment,
            temperature=recipe.temperature,
            contrastive_weight=recipe.contrastive_weight,
        )
        trainer.compile(optimizer=keras.optimizers.Adam(rate))
        return trainer

    outputs = {"reconstruction": autoencoder.output}
    losses: dict[str, Any] = {"reconstruction": "binary_crossentropy"}
    weights = {"reconstruction": 1.0}
    if recipe.class_weight > 0:
        outputs["classes"] = CosineHead(classes, name="classes")(encoder.output)
        losses["classes"] = cosine_margin_loss(classes, recipe.scale, recipe.margin)
        weights["classes"] = recipe.class_weight
    model = keras.Model(autoencoder.input, outputs, name="training")
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=losses, loss_weights=weights)
    return model


def _batches(x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int, *, augmented: bool) -> Any:
    """A tf.data pipeline of (image, targets) batches: the training split shuffled and augmented anew
    each epoch (the reconstruction target is the augmented image: the model learns to see it as it is),
    the validation split as it is. For the self-supervised recipe, batches of images alone, whole ones in
    training (a batch's other images are each image's negatives), augmented by the trainer itself."""
    import tensorflow as tf

    from encoder_service.augment import augment

    if recipe.contrastive_weight > 0:
        images = tf.data.Dataset.from_tensor_slices(x)
        if augmented:
            images = images.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        whole = augmented and len(x) >= recipe.batch_size
        return images.batch(recipe.batch_size, drop_remainder=whole).prefetch(2)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if augmented:
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(recipe.batch_size)

    def targets(images: Any, labels: Any) -> Any:
        if augmented:
            images = augment(images, recipe.augment)
        wanted = {"reconstruction": images}
        if recipe.class_weight > 0:
            wanted["classes"] = labels
        return images, wanted

    return data.map(targets, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def _retrieval(encoder: Any, dataset: Dataset, k: int = 10) -> dict[str, Any]:
    """P@1, P@k and mAP@k of the test split's images searched among the training split's (exact L2),
    by label agreement: the in-process fast path of `make eval`, which measures through the services."""
    from imgsearch.evaluate import nearest_labels, retrieval_quality

    index = np.asarray(encoder.predict(_to_input(dataset.x_train), batch_size=512, verbose=0))
    queries = np.asarray(encoder.predict(_to_input(dataset.x_test), batch_size=512, verbose=0))
    names = [str(v) for v in dataset.y_train]
    found = nearest_labels(index, names, queries, k)
    quality = retrieval_quality([str(v) for v in dataset.y_test], found, k)
    return {
        "index": "the training split",
        "queries": "the test split",
        "k": k,
        "p_at_1": round(quality.p_at_1, 4),
        "p_at_k": round(quality.p_at_k, 4),
        "map_at_k": round(quality.map_at_k, 4),
    }


def _duplicate_distance(model_dir: Path, encoder: Any, dataset: Dataset, preprocess: str) -> dict[str, Any]:
    """The card's `duplicate_distance`, `nothing_close_factor` and their measurement, as
    `python -m tools.duplicate_distance` measures a shipped model: on the dataset's images (training
    split then test split; a seeded sample of 10,000 of a larger one), each a PNG through the model's
    preprocessing (decode_image or decode_photo) and the LiteRT runtime of `model_dir` (the Keras encoder
    where LiteRT is not installed), class labels as the dataset gives them (the nearest distinct image
    decides D either way; an unlabelled dataset has none)."""
    from encoder_service.duplicate_distance import MAX_POOL, decoder_for, measure, outside_sample

    try:
        from encoder_service.runtime import load_runtime

        embed = load_runtime(model_dir).embed
    except ImportError:

        def embed(batch: np.ndarray) -> np.ndarray:
            return np.asarray(encoder.predict(_with_channels(batch), batch_size=512, verbose=0))

    images = np.concatenate([dataset.x_train, dataset.x_test])
    labels = np.concatenate([dataset.y_train, dataset.y_test]).astype(np.int64) if dataset.labelled else None
    outside = outside_sample(dataset.name, preprocess)  # gray 28x28 images, decoded as the model decodes
    measurement = measure(
        embed,
        images,
        labels,
        outside=outside[0] if outside else None,
        decode=decoder_for(preprocess, dataset.input_shape),
    )
    source = _portable(dataset.source) or dataset.name
    if len(images) > MAX_POOL:
        source += f" (a seeded sample of {MAX_POOL} of its {len(images)} images)"
    return measurement.card_entries(source, outside[1] if outside else "")


def _novelty(
    model_dir: Path, autoencoder: Any, held_out: np.ndarray, dataset: Dataset, preprocess: str
) -> dict[str, Any]:
    """The card's `novelty`, as `python -m tools.novelty` measures a shipped model: the reconstruction
    errors of the validation split (float32 [N, 28, 28] in [0, 1] for digits, [N, H, W, C] for photo
    models; held out from training) through the
    LiteRT runtime of `model_dir` (the Keras autoencoder where LiteRT is not installed), with the test
    split and images of another domain (`duplicate_distance.outside_sample`) as checks. {} (logged) when
    the validation split is under 100 images: too few for a 99th percentile."""
    from encoder_service.duplicate_distance import decoded, decoder_for, outside_sample
    from encoder_service.novelty import CARD_KEY, measure, model_input

    def outside_inputs(images: np.ndarray) -> np.ndarray:  # the model's inputs of gray 28x28 images
        if preprocess == "digits":
            return model_input(images)
        return decoded(images, decoder_for(preprocess, dataset.input_shape))

    if len(held_out) < 100:
        log.warning("no novelty threshold: the validation split has %d images, under 100", len(held_out))
        return {}
    try:
        from encoder_service.runtime import load_runtime

        reconstruct = load_runtime(model_dir).reconstruct
    except ImportError:

        def reconstruct(batch: np.ndarray) -> np.ndarray:
            pictures = np.asarray(autoencoder.predict(_with_channels(batch), batch_size=512, verbose=0))
            return pictures[..., 0] if batch.ndim == 3 else pictures

    source = _portable(dataset.source) or dataset.name
    first = len(dataset.x_train) - len(held_out)
    outside = outside_sample(dataset.name, preprocess)  # gray 28x28 images
    measurement = measure(
        reconstruct,
        held_out,
        data=f"{source} training images {first}-{len(dataset.x_train) - 1}: the model's validation split, "
        "held out from its training",
        test=(model_input(dataset.x_test), f"{source}: the test split (never trained on)")
        if dataset.has_test
        else None,
        outside=(outside_inputs(outside[0]), outside[1]) if outside else None,
    )
    return {CARD_KEY: measurement.card_entry()}


def _portable(source: str) -> str:
    """The dataset's path relative to the repository when it lies inside it (no build machine's path
    in a shipped card)."""
    try:
        return str(Path(source).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        return source


def _has_classes(dataset: Dataset) -> bool:
    """Whether the dataset's labels are classes to learn from: real labels, at least two of them."""
    return dataset.labelled and len(np.unique(dataset.y_train)) >= 2


def _to_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] (gray) or [N, H, W, C] -> float32 [N, H, W, C] in [0, 1]."""
    x = np.asarray(images, np.float32) / np.float32(255.0)
    return x[..., None] if x.ndim == 3 else x


def _with_channels(batch: np.ndarray) -> np.ndarray:
    """A float batch [N, H, W] (the digits path's model inputs) or [N, H, W, C] as [N, H, W, C]."""
    return batch[..., None] if batch.ndim == 3 else batch


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


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        return parse_input_shape(text)
    except ValueError as error:  # argparse prints it after the flag's name: drop the message's own
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--input-shape {text!r}: ")) from None


def _shape_text(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


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
