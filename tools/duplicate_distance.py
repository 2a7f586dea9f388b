"""Measures each shipped model's near-duplicate distance D and its nothing-close factor, and with --write
records them in the model's card.json (`duplicate_distance`, `nothing_close_factor` and
`duplicate_distance_measurement`; nothing else in the card changes).

    python -m tools.duplicate_distance                  # the default model: print the figures
    python -m tools.duplicate_distance --all --write    # every shipped model, into its card

A digit model is measured on the MNIST sample (encoder_service/data/mnist-10k.npz, 10,000 images), a
Fashion-MNIST model on the Fashion-MNIST sample (fashion-3k.npz, 3,000), through the LiteRT runtime and
the service's decoding for the model's card (decode_image for a digits model); the other sample is the
out-of-domain set of the nothing-close measurement. The method and the rule are in
encoder_service/duplicate_distance.py. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.datasets import ICONS_PATH
from encoder_service.duplicate_distance import (
    COPY_SAMPLE,
    FASHION_SAMPLE,
    MNIST_SAMPLE,
    Measurement,
    decoder_for,
    measure,
    outside_sample,
)
from encoder_service.model_dir import CARD_JSON, read_card, shipped_model, shipped_models
from encoder_service.runtime import load_runtime

ROOT = Path(__file__).resolve().parents[1]
CARD_KEYS = ("duplicate_distance", "nothing_close_factor", "duplicate_distance_measurement")


def sample_for(card: dict[str, Any]) -> Path:
    """The shipped sample a model is measured on: the colour icons for a model trained on them,
    Fashion-MNIST's for a model trained on it, else MNIST's."""
    dataset = str(card.get("dataset", ""))
    if dataset == "icons":
        return ICONS_PATH
    return FASHION_SAMPLE if dataset.startswith("fashion") else MNIST_SAMPLE


def load_sample(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a shipped sample: all of them (the icons' index split, then its query split)."""
    with np.load(path) as data:
        if "x_test" in data.files:
            return np.concatenate([data["x"], data["x_test"]]), np.concatenate([data["y"], data["y_test"]])
        return np.asarray(data["x"]), np.asarray(data["y"])


def measure_model(model_dir: Path, copies: int = COPY_SAMPLE, seed: int = 0) -> tuple[Measurement, str, str]:
    """(the measurement, the sample's path, the outside sample's path) of a model directory."""
    card = read_card(model_dir)
    sample = sample_for(card)
    images, labels = load_sample(sample)
    runtime = load_runtime(model_dir)
    outside = outside_sample(str(card.get("dataset", "")), runtime.preprocess)
    measurement = measure(
        runtime.embed,
        images,
        labels,
        outside=outside[0] if outside else None,
        copies=copies,
        seed=seed,
        decode=decoder_for(runtime.preprocess, runtime.input_shape),  # decode_image for a digits model
    )
    return measurement, str(sample.relative_to(ROOT)), outside[1] if outside else ""


def write_card(model_dir: Path, entries: dict[str, Any]) -> None:
    """Sets the keys in card.json, keeping every other key and its order (and the file's format)."""
    path = model_dir / CARD_JSON
    card = json.loads(path.read_text())
    card.update(entries)
    path.write_text(json.dumps(card, indent=2) + "\n")


def report(name: str, m: Measurement, sample: str, seconds: float) -> str:
    """The figures, as a few Markdown tables."""
    d = m.duplicate_distance
    lines = [
        f"## {name}: D = {d:g}, nothing_close_factor = {m.nothing_close_factor:g} "
        f"(nothing close past {m.nothing_close_distance:.4g})",
        "",
        f"{sample}: {m.pool} images, {m.copied} of them copied each of {len(m.copy_distances)} ways; "
        f"{len(m.query_nearest)} queries searched among the first {m.pool - len(m.query_nearest)}; "
        f"{seconds:.1f} s.",
        "",
        "| copies | p50 | p90 | p99 | max | within D | caught |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, distances in m.copy_distances.items():
        p50, p90, p99, top = np.percentile(distances, [50, 90, 99, 100])
        caught = "yes" if kind in m.caught else "no"
        lines.append(
            f"| {kind} | {p50:.4f} | {p90:.4f} | {p99:.4f} | {top:.4f} | {m.within(kind):.1%} | {caught} |"
        )
    lines += ["", "| nearest other image | p0.1 | p1 | p5 | p10 | p50 | within D |", "| --- " * 7 + "|"]
    rows = [("distinct", m.nearest_distinct)]
    if m.nearest_same_class is not None:
        rows.append(("same class", m.nearest_same_class))
    for what, distances in rows:
        cells = " | ".join(f"{v:.4f}" for v in np.percentile(distances, [0.1, 1, 5, 10, 50]))
        lines.append(f"| {what} | {cells} | {np.mean(distances <= d):.2%} |")
    lines += [
        "",
        "| nearest index image of | p1 | p10 | p50 | p90 | p99 | max | past nothing close |",
        "| --- " * 8 + "|",
    ]
    nearest = [("in-domain queries", m.query_nearest)]
    if m.outside_nearest is not None:
        nearest.append(("out-of-domain images", m.outside_nearest))
    for what, distances in nearest:
        cells = " | ".join(f"{v:.4f}" for v in np.percentile(distances, [1, 10, 50, 90, 99, 100]))
        lines.append(f"| {what} | {cells} | {np.mean(distances > m.nothing_close_distance):.1%} |")
    rates = m.rates()
    if "query_nearest_same_class_past_nothing_close" in rates:
        lines += [
            "",
            f"In-domain queries' nearest image is of their class {rates['query_nearest_same_class']:.1%} of "
            f"the time; past nothing close, {rates['query_nearest_same_class_past_nothing_close']:.0%}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.duplicate_distance", description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", help="a shipped model's name (default: default)")
    which.add_argument("--all", action="store_true", help="every shipped model")
    parser.add_argument("--write", action="store_true", help="record the figures in each card.json")
    parser.add_argument(
        "--copies", type=int, default=COPY_SAMPLE, help="images copied (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        names = shipped_models() if args.all else [args.model]
        dirs = [shipped_model(name) for name in names]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, model_dir in zip(names, dirs, strict=True):
        started = time.perf_counter()
        measurement, sample, outside = measure_model(model_dir, args.copies, args.seed)
        print(report(name, measurement, sample, time.perf_counter() - started), end="\n\n", flush=True)
        if args.write:
            write_card(model_dir, measurement.card_entries(sample, outside))
            print(f"wrote {model_dir / CARD_JSON}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
