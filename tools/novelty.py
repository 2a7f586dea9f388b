"""Measures each shipped model's novelty threshold (encoder_service/novelty.py) on held-out images, and with
--write records it in the model's card.json under `novelty` (nothing else in the card changes).

    python -m tools.novelty                  # the default model: print the figures
    python -m tools.novelty --all --write    # every shipped model, into its card

The held-out images are the model's own validation split, as training takes it (the last
`validation_size` images of its training split: held out from the gradient steps; the shipped wide digit
model's early stopping watched their loss), so that the test split stays an independent check:
- a digit model (`mnist-sample`): images 7,200-7,999 of encoder_service/data/mnist-10k.npz; the check is
  the query split (images 8,000-9,999, never trained on);
- a Fashion-MNIST model: images 54,000-59,999 of Fashion-MNIST's train split (Debian's
  dataset-fashion-mnist, else the Keras download); the check is the shipped sample of its test split
  (encoder_service/data/fashion-3k.npz). Without the full dataset, the sample itself is the held-out
  set (it is held out too: test images) and there is no check.
The out-of-domain images are those of the near-duplicate measurement: the Fashion-MNIST sample for a
digit model, the MNIST sample's first 3,000 for a clothes model. Every image is 28 x 28, so the model
input is pixels / 255, as the service's decode_image gives it for a 28 x 28 file. Runs through the LiteRT
runtime. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.datasets import SAMPLE_PATH, load_dataset, load_mnist_sample
from encoder_service.duplicate_distance import FASHION_SAMPLE, decoded, decoder_for, outside_sample
from encoder_service.model_dir import CARD_JSON, read_card, shipped_model, shipped_models
from encoder_service.novelty import CARD_KEY, MEASURES, PERCENTILES, Measurement, measure, model_input
from encoder_service.runtime import load_runtime

ROOT = Path(__file__).resolve().parents[1]
Images = tuple[np.ndarray, str]  # uint8 [N, 28, 28] and what they are


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def held_out_for(card: dict[str, Any]) -> tuple[Images, Images | None]:
    """(the held-out images and what they are, the in-domain check images and what they are, or None)
    of a model, by its card's dataset and split sizes (see the module's docstring).

    Raises ValueError when the card's split does not fit the dataset it names."""
    dataset_name = str(card.get("dataset", ""))
    train_size, validation_size = int(card.get("train_size", 0)), int(card.get("validation_size", 0))
    if dataset_name.startswith("fashion"):
        try:
            dataset = load_dataset("fashion_mnist")
        except Exception as error:  # offline and no Debian package: the shipped test sample
            logging.getLogger(__name__).warning("Fashion-MNIST unavailable (%s): using the sample", error)
            with np.load(FASHION_SAMPLE) as data:
                images = np.asarray(data["x"])
            what = f"{_relative(FASHION_SAMPLE)}: {len(images)} Fashion-MNIST test images (never trained on)"
            return (images, what), None
        source = dataset.source
        check: Images | None
        with np.load(FASHION_SAMPLE) as data:
            check = (
                np.asarray(data["x"]),
                f"{_relative(FASHION_SAMPLE)}: Fashion-MNIST test images (never trained on)",
            )
    elif dataset_name == "mnist-sample":
        dataset = load_mnist_sample()
        source = _relative(SAMPLE_PATH)
        start = len(dataset.x_train)
        check = (
            dataset.x_test,
            f"{source} images {start}-{start + len(dataset.x_test) - 1}: the query split (never trained on)",
        )
    else:
        dataset = load_dataset(dataset_name)
        source = dataset.source or dataset_name
        check = (dataset.x_test, f"{source}: the test split") if dataset.has_test else None
    if validation_size < 1 or train_size + validation_size != len(dataset.x_train):
        raise ValueError(
            f"the card's train_size {train_size} + validation_size {validation_size} do not split the "
            f"{len(dataset.x_train)} training images of {dataset_name!r}"
        )
    held = dataset.x_train[train_size:]
    what = (
        f"{source} training images {train_size}-{train_size + validation_size - 1}: the model's validation "
        "split, held out from its training"
    )
    return (held, what), check


def measure_model(model_dir: Path) -> Measurement:
    card = read_card(model_dir)
    (held, what), check = held_out_for(card)
    runtime = load_runtime(model_dir)
    outside = outside_sample(str(card.get("dataset", "")), runtime.preprocess)
    outside_inputs = None
    if outside is not None:  # gray 28x28 images, as the model's preprocessing makes them its input
        decode = decoder_for(runtime.preprocess, runtime.input_shape)
        images = model_input(outside[0]) if runtime.preprocess == "digits" else decoded(outside[0], decode)
        outside_inputs = (images, outside[1])
    return measure(
        runtime.reconstruct,
        model_input(held),
        data=what,
        test=(model_input(check[0]), check[1]) if check else None,
        outside=outside_inputs,
    )


def write_card(model_dir: Path, entry: dict[str, Any]) -> None:
    """Sets the card's `novelty`, keeping every other key and its order (and the file's format)."""
    path = model_dir / CARD_JSON
    card = json.loads(path.read_text())
    card[CARD_KEY] = entry
    path.write_text(json.dumps(card, indent=2) + "\n")


def report(name: str, m: Measurement, seconds: float) -> str:
    """The figures, as Markdown."""
    entry = m.card_entry()
    heads = " | ".join(f"p{p:g}" for p in PERCENTILES)
    lines = [
        f"## {name}",
        "",
        f"held out: {entry['data']} ({entry['count']} images); {seconds:.1f} s.",
        "",
        f"| held out | {heads} | scale |",
        "| --- " * (len(PERCENTILES) + 2) + "|",
    ]
    for measure_name in MEASURES:
        cells = " | ".join(f"{v:.4g}" for v in entry["measures"][measure_name].values())
        lines.append(f"| {measure_name} | {cells} | {entry['scale'][measure_name]:.6g} |")
    cells = " | ".join(f"{v:.4g}" for v in entry["error"].values())
    lines += [
        f"| error (the larger, in scales) | {cells} | threshold {entry['threshold']:.6g} |",
        "",
        "| images | count | median novelty | novelty > 1 | AUROC against the check |",
        "| --- " * 5 + "|",
        f"| held out | {entry['count']} | {np.median(m.novelty):.3g} | {entry['held_out_above_1']:.2%} | |",
    ]
    for kind in ("test", "outside"):
        if kind in entry:
            check = entry[kind]
            auroc = f"{check['auroc_against_test']:.4f}" if "auroc_against_test" in check else ""
            what = "check (in domain)" if kind == "test" else "out of domain"
            lines.append(
                f"| {what}: {check['data']} | {check['count']} | {check['median']:.3g} | "
                f"{check['above_1']:.2%} | {auroc} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.novelty", description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", help="a shipped model's name (default: default)")
    which.add_argument("--all", action="store_true", help="every shipped model")
    parser.add_argument("--write", action="store_true", help=f"record `{CARD_KEY}` in each card.json")
    args = parser.parse_args(argv)
    try:
        names = shipped_models() if args.all else [args.model]
        dirs = [shipped_model(name) for name in names]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, model_dir in zip(names, dirs, strict=True):
        started = time.perf_counter()
        try:
            measurement = measure_model(model_dir)
        except ValueError as error:
            print(f"error: {name}: {error}", file=sys.stderr)
            return 1
        print(report(name, measurement, time.perf_counter() - started), end="\n\n", flush=True)
        if args.write:
            write_card(model_dir, measurement.card_entry())
            print(f"wrote {model_dir / CARD_JSON}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
