"""What each part of the default recipe is worth: train variants, compare their retrieval figures.

    python -m encoder_service.ablation                       # the MNIST sample, about 15 minutes on 2 cores
    python -m encoder_service.ablation --dataset fashion_mnist --variants default,no-head

Each variant is the default recipe with one part changed, trained with `encoder_service.train` into
out/ablation/<dataset>/<variant>/; the figures are the in-process ones training writes into the card
(index = the training split, queries = the test split, exact L2, k = 10). Writes a Markdown table to
--output (default out/ablation/<dataset>.md) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from encoder_service import train
from encoder_service.model_dir import CARD_JSON, ENCODER_KERAS

# name -> (what it changes, the training flags)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the default recipe", []),
    "no-head": (
        "no class head: an autoencoder alone (unit embeddings, augmentation kept)",
        ["--class-weight", "0"],
    ),
    "no-augment": ("no augmentation", ["--augment", "none"]),
    "no-margin": ("the class head without its margin (plain cosine softmax)", ["--margin", "0"]),
    "early-stop": (
        "up to 40 epochs, stopped 3 epochs after the best validation loss",
        ["--epochs", "40", "--patience", "3"],
    ),
    "tutorial": ("the tutorial's model and recipe", ["--model", "tutorial"]),
    "tutorial-unit": ("the tutorial's model, its embeddings scaled to unit length (no retraining)", []),
}


def run_variant(dataset: str, name: str, out: Path) -> dict[str, object]:
    """Trains one variant (unless a previous run left its card) and returns its card."""
    output = out / name
    if not (output / CARD_JSON).is_file():
        flags = VARIANTS[name][1]
        if train.main(["--dataset", dataset, *flags, "--output", str(output)]) != 0:
            raise SystemExit(f"ablation: training variant {name!r} failed")
    card: dict[str, object] = json.loads((output / CARD_JSON).read_text())
    return card


def unit_length_figures(model_dir: Path, dataset: str) -> dict[str, float]:
    """The figures of a model's embeddings scaled to unit length after the fact (no retraining): what
    L2 normalisation alone is worth."""
    import keras
    import numpy as np

    from encoder_service.datasets import load_dataset
    from imgsearch.evaluate import nearest_labels, retrieval_quality

    data = load_dataset(dataset)
    encoder = keras.saving.load_model(model_dir / ENCODER_KERAS, compile=False)

    def unit(images: np.ndarray) -> np.ndarray:
        vectors = np.asarray(
            encoder.predict(images[..., None].astype(np.float32) / 255, batch_size=512, verbose=0)
        )
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    found = nearest_labels(unit(data.x_train), [str(v) for v in data.y_train], unit(data.x_test), 10)
    quality = retrieval_quality([str(v) for v in data.y_test], found, 10)
    return {"p_at_1": quality.p_at_1, "p_at_k": quality.p_at_k, "map_at_k": quality.map_at_k}


def table(dataset: str, cards: dict[str, dict[str, object]]) -> str:
    lines = [
        f"| variant ({dataset}) | what changes | epochs | seconds | P@1 | P@10 | mAP@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, card in cards.items():
        figures = card.get("retrieval") or {}
        assert isinstance(figures, dict)
        cells = " | ".join(f"{figures.get(key, 0):.4f}" for key in ("p_at_1", "p_at_k", "map_at_k"))
        lines.append(
            f"| {name} | {VARIANTS[name][0]} | {card['epochs']} | {card['training_seconds']:.0f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m encoder_service.ablation", description=__doc__)
    parser.add_argument("--dataset", default="mnist-sample")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list (default: all)")
    parser.add_argument("--work", type=Path, default=Path("out/ablation"), help="where the models go")
    parser.add_argument("--output", type=Path, help="the Markdown table (default <work>/<dataset>.md)")
    args = parser.parse_args(argv)
    names = [name for name in args.variants.split(",") if name and name != "tutorial-unit"]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out = args.work / args.dataset.replace("/", "_")
    cards = {name: run_variant(args.dataset, name, out) for name in names}
    if "tutorial" in cards:
        cards["tutorial-unit"] = {
            **cards["tutorial"],
            "retrieval": unit_length_figures(out / "tutorial", args.dataset),
        }
    text = table(args.dataset, cards)
    output = args.output or args.work / f"{args.dataset.replace('/', '_')}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
