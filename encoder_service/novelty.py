"""Novelty: how far an image is from what the model learned, read from its reconstruction error.

    threshold = Threshold.from_card(card)                     # None: the card records no novelty
    scores = threshold.novelty(inputs, reconstructions)       # float32 [N]; above 1: unlike the training data
    card["novelty"] = measure(runtime.reconstruct, held_out, data="...").card_entry()

The reconstruction error of an image compares the model's input x (the preprocessed image, float32
[28, 28] in [0, 1]) with r, the decoder's output from x's embedding (r = decoder(encoder(x)), what
`Runtime.reconstruct` gives). Two measures, each the mean over the image's pixels of:

- `bce`: the binary cross-entropy -[x log r + (1 - x) log(1 - r)] (r clipped to [1e-7, 1 - 1e-7]), the
  reconstruction loss every shipped model was trained with;
- `balanced_mse`: the squared error (x - r)^2, its mean over the ink pixels (x > INK) and its mean over
  the background pixels averaged, so a thin stroke weighs as much as the background around it (a part
  with no pixels counts 0).

The image's reconstruction error is the larger of the two, each in units of its median on held-out
images of the training distribution (images the model did not train on): `error = max(bce / median(bce),
balanced_mse / median(balanced_mse))`. Its novelty is that error over the 99th percentile of the held-out
images' errors, `novelty = error / p99(error)`: above 1, the image is reconstructed worse than 99% of
the held-out images, so it looks unlike the training data (1% of the held-out images score above 1).

Why two measures (python -m tools.novelty measures them on the shipped models): a digit model's
reconstruction of a piece of clothing is bad in cross-entropy, which punishes the grey textures a digit
model never learned (Fashion-MNIST against the MNIST queries: AUROC 0.99 for bce, 0.90 for the plain
mean squared error); a clothes model learned grey textures, so its cross-entropy on a digit is *lower*
than on its own data (AUROC 0.30), but it smears a digit's thin strokes, which balanced_mse sees (0.998).
The larger of the two keeps both.

What it cannot see: an image the decoder redraws well. A blank image (nothing but background) scores
about 0 with every model; the clothes models redraw a noise patch, a flat grey square or a photo as a
blob after the preprocessing has fitted it into 20 x 20 pixels, and score them below 1.

numpy only: the encoder service imports it; training and tools/novelty.py measure with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

CARD_KEY = "novelty"
MEASURES = ("bce", "balanced_mse")
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
THRESHOLD_PERCENTILE = 99.0
INK = 0.1  # a pixel is ink above this (as the preprocessing finds the ink's box: 10% of the maximum)
EPSILON = 1e-7  # r is clipped to [EPSILON, 1 - EPSILON] for the logarithms
DEFINITION = (
    "per image, between the model's input x in [0, 1] and r = decoder(encoder(x)): bce, the mean binary "
    f"cross-entropy -[x log r + (1-x) log(1-r)] (r clipped to [{EPSILON:g}, 1-{EPSILON:g}]); balanced_mse, "
    f"the mean squared error over the ink pixels (x > {INK:g}) and over the others, averaged. error = the "
    "larger of each measure over its median on the held-out images (`scale`); novelty = error over its "
    f"p{THRESHOLD_PERCENTILE:g} on the held-out images (`threshold`): above 1, unlike the training data"
)

Reconstruct = Callable[[np.ndarray], np.ndarray]  # float32 [N, 28, 28] in [0, 1] -> the same shape


def model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] images (0 background, 255 ink) as the model's input, float32 in [0, 1]: what the
    service's raw-pixel path and `decode_image` of a 28 x 28 file give, bit for bit."""
    return np.asarray(images, np.uint8).astype(np.float32) / np.float32(255.0)


def errors(inputs: np.ndarray, reconstructions: np.ndarray) -> dict[str, np.ndarray]:
    """Each measure (MEASURES) of each image: float64 [N] arrays. Takes float [N, H, W] (or [N, H, W, 1])
    inputs in [0, 1] and their reconstructions, of one shape. Computed in float32 (sums pairwise)."""
    x = np.asarray(inputs, np.float32)
    r = np.asarray(reconstructions, np.float32)
    if x.shape != r.shape:
        raise ValueError(f"inputs {x.shape} and reconstructions {r.shape} differ in shape")
    count = len(x)
    x = x.reshape(count, -1)
    r = np.clip(r.reshape(count, -1), np.float32(EPSILON), np.float32(1.0 - EPSILON))
    bce = -(x * np.log(r) + (1.0 - x) * np.log1p(-r)).mean(axis=1, dtype=np.float64)
    squared = np.square(x - r)
    ink = x > INK
    inked = np.count_nonzero(ink, axis=1)
    total = squared.sum(axis=1, dtype=np.float64)
    on_ink = (squared * ink).sum(axis=1, dtype=np.float64)
    background = x.shape[1] - inked
    balanced = (on_ink / np.maximum(inked, 1) + (total - on_ink) / np.maximum(background, 1)) / 2.0
    return {"bce": bce, "balanced_mse": balanced}


@dataclass(frozen=True)
class Threshold:
    """What novelty divides by (the card's `novelty.scale` and `novelty.threshold`): each measure's
    median on the held-out images, and the 99th percentile of their error in those units."""

    scale: Mapping[str, float]
    threshold: float

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> Threshold | None:
        """The card's; None when the card records none, or one whose numbers are not all positive."""
        entry = card.get(CARD_KEY)
        if not isinstance(entry, Mapping):
            return None
        scale = entry.get("scale")
        if not isinstance(scale, Mapping) or not all(_positive(scale.get(name)) for name in MEASURES):
            return None
        threshold = entry.get("threshold")
        if not _positive(threshold):
            return None
        return cls({name: float(scale[name]) for name in MEASURES}, float(threshold))

    def error(self, measured: Mapping[str, np.ndarray]) -> np.ndarray:
        """The reconstruction error of measured images (errors()): the larger of each measure over its
        scale. float64 [N]."""
        ratios = [np.asarray(measured[name], np.float64) / self.scale[name] for name in MEASURES]
        return np.max(ratios, axis=0)

    def scores(self, measured: Mapping[str, np.ndarray]) -> np.ndarray:
        """The novelty of measured images (errors()): their error over the threshold, float32 [N]."""
        return (self.error(measured) / self.threshold).astype(np.float32)

    def novelty(self, inputs: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
        """The novelty of each image: float32 [N]; above 1, unlike the training data."""
        return self.scores(errors(inputs, reconstructions))


def _positive(value: object) -> TypeGuard[float]:
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value > 0
    )


def reconstruction_errors(
    reconstruct: Reconstruct, images: np.ndarray, chunk: int = 1024
) -> dict[str, np.ndarray]:
    """errors() of float32 [N, 28, 28] model inputs reconstructed by `reconstruct`, a chunk at a time."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in MEASURES}
    for start in range(0, len(images), chunk):
        x = np.asarray(images[start : start + chunk], np.float32)
        for name, values in errors(x, reconstruct(x)).items():
            parts[name].append(values)
    return {name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The probability that an outside image scores above an inside one (ties count half): the area
    under the ROC curve of telling them apart by the score."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(inside) or not len(outside):
        raise ValueError("need scores of both kinds")
    values = np.concatenate([inside, outside])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]  # ties: their mean rank
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:
            ranks[order[start : start + count]] = start + (count + 1) / 2
    above = ranks[len(inside) :].sum() - len(outside) * (len(outside) + 1) / 2
    return float(above / (len(inside) * len(outside)))


@dataclass
class Measurement:
    """What `measure` found: each measure's errors on the held-out images, the threshold, and the
    novelty of the held-out images and of any other set measured with it (`checks`)."""

    data: str
    held_out: dict[str, np.ndarray]
    threshold: Threshold
    checks: dict[str, tuple[str, np.ndarray]]  # kind ("test", "outside") -> (what data, novelty)

    @property
    def novelty(self) -> np.ndarray:
        return self.threshold.scores(self.held_out)

    def card_entry(self) -> dict[str, Any]:
        """The card's `novelty`: the definition, the data and count, each measure's percentiles, the
        threshold (each measure's p99), the held-out images' novelty, and the checks'."""
        novelty = self.novelty
        entry: dict[str, Any] = {
            "definition": DEFINITION,
            "data": self.data,
            "count": len(novelty),
            "measures": {name: _percentiles(self.held_out[name]) for name in MEASURES},
            "scale": dict(self.threshold.scale),
            "error": _percentiles(self.threshold.error(self.held_out)),
            "threshold": self.threshold.threshold,
            "held_out_above_1": round(float(np.mean(novelty > 1)), 4),
        }
        inside = self.checks.get("test")
        for kind, (data, scores) in self.checks.items():
            check: dict[str, Any] = {"data": data, "count": len(scores)}
            check["above_1"] = round(float(np.mean(scores > 1)), 4)
            check["median"] = _significant(float(np.median(scores)), 4)
            if kind == "outside" and inside is not None:
                check["auroc_against_test"] = round(auroc(inside[1], scores), 4)
            entry[kind] = check
        return entry


def measure(
    reconstruct: Reconstruct,
    held_out: np.ndarray,
    *,
    data: str,
    test: tuple[np.ndarray, str] | None = None,
    outside: tuple[np.ndarray, str] | None = None,
) -> Measurement:
    """The novelty threshold of a model (its `reconstruct`) from float32 [N, 28, 28] held-out model inputs
    (`data` says what they are), with the novelty of in-domain `test` images and of `outside` images of
    another domain, when given (each (images, what they are)), as checks."""
    if len(held_out) < 100:
        raise ValueError(f"need at least 100 held-out images for a 99th percentile, got {len(held_out)}")
    measured = reconstruction_errors(reconstruct, held_out)
    # rounded as the card keeps them, so that a card read back scores the same
    scale = {name: _significant(float(np.median(measured[name])), 6) for name in MEASURES}
    error = Threshold(scale, 1.0).error(measured)
    threshold = Threshold(scale, _significant(float(np.percentile(error, THRESHOLD_PERCENTILE)), 6))
    checks = {}
    for kind, given in (("test", test), ("outside", outside)):
        if given is not None and len(given[0]):
            checks[kind] = (given[1], threshold.scores(reconstruction_errors(reconstruct, given[0])))
    return Measurement(data, measured, threshold, checks)


def _significant(value: float, digits: int) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{p:g}": _significant(float(np.percentile(values, p)), 4) for p in PERCENTILES}
