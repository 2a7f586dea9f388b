"""`make eval` (`imgsearch eval --suite`): retrieval quality through the real services, beside the baselines.

For each dataset (the MNIST sample: index = its first 8,000 digits, queries = its last 2,000;
Fashion-MNIST: index = train, queries = test; the Oxygen icons, colour 32x32: index = its index split of
1,026, queries = its query split of 257), every embedding is measured the way users get it:
- `raw`: the preprocessed pixels (784 for the 28x28 gray sets through the digits preprocessing, 3,072
  for the icons through the photo preprocessing at 32x32x3), and `pca`: those projected on 128
  principal components fitted on the index split only; computed here, then stored and searched in a
  real index service;
- each shipped model trained on that dataset's index split (the tutorial's, and the default recipe; for
  the icons the colour models trained with labels, `icons`, and without, `icons-ssl`), and for the icons
  also the digits `default` model (what a user gets sending icons to the default encoder): the images go
  as PNG files through a real encoder service, the vectors into a real index service.
For the models the same figures are also computed in process (LiteRT + FAISS, the fast path training
uses; each model's inputs decoded with its own card's preprocessing) and the two must agree to the
fourth decimal. The MNIST queries are also sent perturbed (other stroke widths, blur, off-centre, a
large drawing on a white canvas) to measure robustness to digits from other sources. Beside P@10 the
report gives the mean over classes of the per-class P@10 and the chance level of both (random results),
which matter for an imbalanced set (the icons).

Writes EVAL.md (the tables), eval.json (every figure) and quality.png (a bar chart) to --output.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from encoder_service.duplicate_distance import Decode, decoder_for
from encoder_service.model_dir import CARD_JSON
from imgsearch.client import EncoderClient, IndexClient
from imgsearch.evaluate import Quality, nearest_labels, retrieval_quality
from tools.local import ServiceProcess, free_port

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "encoder_service" / "models"
DEFAULT_OUTPUT = REPO / "docs" / "eval"
K = 10
BATCH = 500  # images or vectors per call: well inside both services' limits (and nearest_labels' batch)


@dataclass(frozen=True)
class Suite:
    """One dataset and the shipped models measured on it: (row label, model directory name). `preprocess`
    and `input_shape` say how its PNGs become the `raw` and `pca` baselines' pixels (as the encoder
    service decodes them for a model with that card); `perturb`: also send the queries perturbed (the
    digits' robustness section)."""

    dataset: str
    title: str
    models: tuple[tuple[str, str], ...]
    preprocess: str = "digits"
    input_shape: tuple[int, int, int] = (28, 28, 1)
    perturb: bool = False


SUITES = (
    Suite(
        "mnist-sample",
        "MNIST sample (8,000 / 2,000)",
        (("tutorial", "tutorial"), ("default", "default")),
        perturb=True,
    ),
    Suite(
        "fashion_mnist",
        "Fashion-MNIST (60,000 / 10,000)",
        (("tutorial", "fashion-tutorial"), ("default", "fashion")),
    ),
    Suite(
        "icons",
        "Oxygen icons, colour (1,026 / 257)",
        (("default", "default"), ("icons", "icons"), ("icons-ssl", "icons-ssl")),
        preprocess="photo",
        input_shape=(32, 32, 3),
    ),
)


@dataclass(frozen=True)
class Split:
    """uint8 [N, H, W] gray images (0 = background, 255 = ink) or [N, H, W, 3] RGB ones, with their class
    names."""

    x_index: np.ndarray
    y_index: np.ndarray
    x_query: np.ndarray
    y_query: np.ndarray
    class_names: tuple[str, ...]

    def names(self, labels: np.ndarray) -> list[str]:
        return [self.class_names[int(v)] if self.class_names else str(int(v)) for v in labels]


def load_split(dataset: str, limit: int = 0) -> Split:
    """The dataset's train split as the index and its test split as the queries (disjoint by
    construction); `limit` > 0 keeps the first `limit` of each (for quick checks)."""
    from encoder_service.datasets import load_dataset

    data = load_dataset(dataset)
    if not data.has_test:
        raise ValueError(f"dataset {dataset!r} has no test split to query with")
    cut = slice(None, limit or None)
    return Split(
        data.x_train[cut], data.y_train[cut], data.x_test[cut], data.y_test[cut], tuple(data.class_names)
    )


# --- query perturbations: digits as other sources draw them -----------------------------------------


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _thin(image: Image.Image) -> Image.Image:
    """Strokes about half a pixel thinner: erode at 4x the size, then back to 28x28."""
    big = image.resize((112, 112), Image.Resampling.BICUBIC).filter(ImageFilter.MinFilter(5))
    return big.resize((28, 28), Image.Resampling.BOX)


def _off_centre(image: Image.Image) -> Image.Image:
    """The digit moved 3 px right and 3 px down in its 28x28 field (a crop not centred by mass)."""
    return image.transform((28, 28), Image.Transform.AFFINE, (1, 0, -3, 0, 1, -3), fillcolor=0)


def _canvas(image: Image.Image) -> Image.Image:
    """As a drawing canvas sends it: 280x280, dark ink on white, a thick pen, placed off-centre."""
    big = image.resize((200, 200), Image.Resampling.BICUBIC).filter(ImageFilter.MaxFilter(9))
    canvas = Image.new("L", (280, 280), 0)
    canvas.paste(big, (20, 60))
    return Image.eval(canvas, lambda v: 255 - v)


PERTURBATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "original": lambda image: image,
    "thick strokes": lambda image: image.filter(ImageFilter.MaxFilter(3)),
    "thin strokes": _thin,
    "blur": lambda image: image.filter(ImageFilter.GaussianBlur(1.0)),
    "off-centre": _off_centre,
    "canvas 280x280": _canvas,
}


def encode_queries(x: np.ndarray, perturbation: str) -> list[bytes]:
    """The images (uint8 [N, H, W] gray or [N, H, W, 3] RGB) as PNG files, perturbed (the perturbations
    are the digits': gray 28x28 only)."""
    change = PERTURBATIONS[perturbation]
    return [_png(change(Image.fromarray(image))) for image in x]


def preprocess(pngs: Sequence[bytes], decode: Decode | None = None) -> np.ndarray:
    """The PNGs as the encoder service sees them for a model: `decode` from `decoder_for(card preprocess,
    input shape)`; by default the digits preprocessing, float32 [N, 28, 28] (decode, polarity, fit); the
    photo one makes [N, H, W, C]."""
    if decode is None:
        from encoder_service.preprocess import decode_image

        decode = decode_image
    return np.stack([decode(data) for data in pngs]).astype(np.float32)


def model_preprocessing(model_dir: Path) -> tuple[str, tuple[int, int, int]]:
    """The model card's `preprocess` and `input_shape`, with the runtime's defaults (digits, 28x28x1)."""
    card = json.loads((model_dir / CARD_JSON).read_text())
    height, width, channels = (int(v) for v in card.get("input_shape", (28, 28, 1)))
    return str(card.get("preprocess", "digits")), (height, width, channels)


# --- embeddings ----------------------------------------------------------------------------------------


class Pca:
    """Projection on the leading principal components of the index split's pixels."""

    def __init__(self, x: np.ndarray, dims: int = 128) -> None:
        flat = x.reshape(len(x), -1).astype(np.float64)
        self.mean = flat.mean(axis=0)
        covariance = np.cov(flat - self.mean, rowvar=False)
        values, vectors = np.linalg.eigh(covariance)
        self.components = vectors[:, np.argsort(values)[::-1][:dims]]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1).astype(np.float64)
        return ((flat - self.mean) @ self.components).astype(np.float32)


def raw_pixels(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32)


@contextmanager
def service(module: str, args: Sequence[str], log_dir: Path) -> Iterator[ServiceProcess]:
    """A real service process on a free port, stopped on the way out."""
    process = ServiceProcess(module, free_port(), args, log_dir / f"{module}-{time.monotonic_ns()}.log")
    try:
        process.start()
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def embed_through(encoder: EncoderClient, pngs: Sequence[bytes]) -> tuple[np.ndarray, str]:
    """Vectors from the encoder service, in batches; returns them with the model version."""
    parts, version = [], ""
    for start in range(0, len(pngs), BATCH):
        embedding = encoder.embed(pngs[start : start + BATCH])
        parts.append(embedding.vectors)
        version = embedding.model_version
    return np.concatenate(parts), version


def search_through(
    index: IndexClient,
    vectors: np.ndarray,
    labels: Sequence[str],
    queries: dict[str, np.ndarray],
    version: str,
) -> dict[str, list[list[str]]]:
    """Stores `vectors` in a fresh index service and returns, per query set, each query's result labels."""
    for start in range(0, len(vectors), BATCH):
        stop = start + BATCH
        index.upsert(
            [str(n) for n in range(start, min(stop, len(vectors)))],
            vectors[start:stop],
            [{"label": label} for label in labels[start:stop]],
            version,
        )
    results: dict[str, list[list[str]]] = {}
    for name, query in queries.items():
        rows: list[list[str]] = []
        for start in range(0, len(query), BATCH):
            matches = index.search(query[start : start + BATCH], K, version)
            rows += [[m.metadata["label"] for m in row] for row in matches]
        results[name] = rows
    return results


def in_process_vectors(model_dir: Path, *inputs: np.ndarray) -> list[np.ndarray]:
    """The model's vectors of each float32 batch ([N, 28, 28] or [N, H, W, C], as its preprocessing
    makes them), in this process (the serving runtime, loaded
    once), in the service's batches."""
    from encoder_service.runtime import load_runtime

    runtime = load_runtime(model_dir, "litert")
    return [
        np.concatenate([runtime.embed(x[start : start + BATCH]) for start in range(0, len(x), BATCH)])
        for x in inputs
    ]


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One embedding on one dataset: its figures per query set (the original queries, perturbations)."""

    dataset: str
    embedding: str
    dim: int
    model_version: str
    quality: dict[str, Quality]
    in_process_max_diff: float | None = None  # largest |service - in process| over P@1, P@10, mAP@10
    card_figures: dict[str, float] | None = None  # what training wrote into the model's card
    # Random results' expected figures on this dataset's splits: P@10 (the sum over classes of the query
    # share times the index share) and the mean per-class P@10 (the mean of the index shares).
    chance: dict[str, float] | None = None


def mean_per_class(quality: Quality) -> float:
    """The mean over the query classes of their P@k (each class weighs the same, however many queries)."""
    values = [c.p_at_k for c in quality.per_class.values()]
    return sum(values) / len(values) if values else 0.0


def chance_levels(index_labels: Sequence[str], query_labels: Sequence[str]) -> dict[str, float]:
    """What random results score, expected: P@k = sum over classes of query share x index share; the mean
    per-class P@k = the mean, over the query classes, of their index shares."""
    index_counts, query_counts = Counter(index_labels), Counter(query_labels)
    shares = {c: index_counts[c] / len(index_labels) for c in query_counts}
    return {
        "p_at_k": sum(shares[c] * n / len(query_labels) for c, n in query_counts.items()),
        "mean_per_class_p_at_k": sum(shares.values()) / len(shares) if shares else 0.0,
    }


def evaluate_suite(
    suite: Suite,
    models_dir: Path,
    work: Path,
    limit: int = 0,
    log: Callable[[str], None] = print,
) -> list[Row]:
    missing = [model for _, model in suite.models if not (models_dir / model / CARD_JSON).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{suite.dataset}: no model {', '.join(missing)} in {models_dir} (no {CARD_JSON}): "
            "`make models` trains every shipped model"
        )
    split = load_split(suite.dataset, limit)
    index_labels, query_labels = split.names(split.y_index), split.names(split.y_query)
    chance = chance_levels(index_labels, query_labels)
    perturbations = list(PERTURBATIONS) if suite.perturb else ["original"]
    log(f"{suite.dataset}: encoding {len(split.x_index)} index and {len(split.x_query)} query images as PNGs")
    index_pngs = encode_queries(split.x_index, "original")
    query_pngs = {name: encode_queries(split.x_query, name) for name in perturbations}
    # The decoded PNGs per (preprocessing, input shape): the baselines' and each model's own.
    decoded: dict[tuple[str, tuple[int, int, int]], tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def inputs_for(
        preprocessing: str, shape: tuple[int, int, int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        key = (preprocessing, shape if preprocessing != "digits" else (28, 28, 1))
        if key not in decoded:
            decode = decoder_for(*key)
            decoded[key] = (
                preprocess(index_pngs, decode),
                {name: preprocess(pngs, decode) for name, pngs in query_pngs.items()},
            )
        return decoded[key]

    index_inputs, query_inputs = inputs_for(suite.preprocess, suite.input_shape)

    def measure(
        name: str, dim: int, version: str, vectors: np.ndarray, queries: dict[str, np.ndarray]
    ) -> Row:
        with (
            tempfile.TemporaryDirectory(dir=work) as data_dir,
            service("index_service", ["--data-dir", data_dir], work) as index_service,
            closing(IndexClient(index_service.address, timeout_s=600)) as index,
        ):
            results = search_through(index, vectors, index_labels, queries, version)
        quality = {q: retrieval_quality(query_labels, rows, K) for q, rows in results.items()}
        original = quality["original"]
        log(
            f"  {name:<10} P@1 {original.p_at_1:.4f}  P@10 {original.p_at_k:.4f}  "
            f"mAP@10 {original.map_at_k:.4f}  mean per-class P@10 {mean_per_class(original):.4f}"
        )
        return Row(suite.dataset, name, dim, version, quality, chance=chance)

    log(
        f"  {'chance':<10} P@10 {chance['p_at_k']:.4f}  "
        f"mean per-class P@10 {chance['mean_per_class_p_at_k']:.4f}"
    )
    raw_index = raw_pixels(index_inputs)
    rows = [
        measure("raw", raw_index.shape[1], "", raw_index, {q: raw_pixels(v) for q, v in query_inputs.items()})
    ]
    pca = Pca(index_inputs)
    rows.append(measure("pca", 128, "", pca(index_inputs), {q: pca(v) for q, v in query_inputs.items()}))
    for label, model in suite.models:
        model_dir = models_dir / model
        with (
            service("encoder_service", ["--model-dir", str(model_dir)], work) as encoder_service,
            closing(EncoderClient(encoder_service.address, timeout_s=600)) as encoder,
        ):
            vectors, version = embed_through(encoder, index_pngs)
            queries = {q: embed_through(encoder, pngs)[0] for q, pngs in query_pngs.items()}
        row = measure(label, vectors.shape[1], version, vectors, queries)
        model_index, model_queries = inputs_for(*model_preprocessing(model_dir))
        index_vectors, query_vectors = in_process_vectors(model_dir, model_index, model_queries["original"])
        fast = retrieval_quality(
            query_labels, nearest_labels(index_vectors, index_labels, query_vectors, K), K
        )
        served = row.quality["original"]
        row.in_process_max_diff = max(
            abs(served.p_at_1 - fast.p_at_1),
            abs(served.p_at_k - fast.p_at_k),
            abs(served.map_at_k - fast.map_at_k),
        )
        card_json = json.loads((model_dir / CARD_JSON).read_text())
        card = card_json.get("retrieval") or None
        # Training's figures are of its own dataset: only comparable on that dataset, unreduced.
        if card and not limit and card_json.get("dataset") == suite.dataset:
            row.card_figures = {key: card[key] for key in ("p_at_1", "p_at_k", "map_at_k")}
        rows.append(row)
    return rows


# --- the report ----------------------------------------------------------------------------------------


def markdown(rows: list[Row], seconds: float, command: str) -> str:
    lines = [
        "# Retrieval quality",
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d} in {seconds:.0f} s "
        f"({platform.machine()}, Python {platform.python_version()}). Every figure is measured through "
        "real services: images as PNG files through the encoder service, vectors stored and searched "
        f"in an index service (exact L2, k = {K}); labels agree = relevant. The index split and the "
        "query split never overlap, and every model saw no images but its own dataset's index split "
        "(the icons' `default` row is the digits model, trained on the MNIST sample: what the default "
        "encoder makes of icons). Each model's images are decoded with its card's preprocessing, and "
        "`raw` is the pixels the dataset's own preprocessing makes (digits: 28x28 gray; the icons: "
        "photo, 32x32x3). The mean per-class P@10 weighs every class the same, which an imbalanced "
        "set needs: a ranking that favours its large classes raises the P@10 and not it.",
        "",
        "| data | embedding | dim | model version | P@1 | P@10 | mAP@10 | mean per-class P@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    titles = {suite.dataset: suite.title for suite in SUITES}
    for row in rows:
        q = row.quality["original"]
        lines.append(
            f"| {titles.get(row.dataset, row.dataset)} | {row.embedding} | {row.dim} | "
            f"{row.model_version or '-'} | {q.p_at_1:.4f} | {q.p_at_k:.4f} | {q.map_at_k:.4f} | "
            f"{mean_per_class(q):.4f} |"
        )
    chances = {row.dataset: row.chance for row in rows if row.chance}
    if chances:
        lines += [
            "",
            "Chance (random results, expected): P@10 is the sum over classes of the query share times "
            "the index share, the mean per-class P@10 the mean of the index shares.",
            "",
            "| data | chance P@10 | chance mean per-class P@10 |",
            "|---|---|---|",
        ]
        for dataset, chance in chances.items():
            lines.append(
                f"| {titles.get(dataset, dataset)} | {chance['p_at_k']:.4f} | "
                f"{chance['mean_per_class_p_at_k']:.4f} |"
            )
    perturbed = [row for row in rows if len(row.quality) > 1]
    if perturbed:
        names = list(perturbed[0].quality)
        lines += [
            "",
            "## Robustness: the MNIST queries drawn differently (P@10)",
            "",
            "Each query digit sent as a PNG after a change, through the same preprocessing "
            "(`docs/PREPROCESSING.md`): strokes 1 px thicker, about 0.5 px thinner, a Gaussian blur "
            "(radius 1), moved 3 px off-centre in its 28x28 field, and drawn large (280x280, a thick "
            "dark pen on white, off-centre) as a drawing canvas sends it.",
            "",
            "| embedding | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for row in perturbed:
            lines.append(
                f"| {row.embedding} | " + " | ".join(f"{row.quality[n].p_at_k:.4f}" for n in names) + " |"
            )
    for dataset in dict.fromkeys(row.dataset for row in rows):
        subset = [row for row in rows if row.dataset == dataset]
        classes = list(subset[0].quality["original"].per_class)
        lines += [
            "",
            f"## Per class: {titles.get(dataset, dataset)} (P@10)",
            "",
            "| class | queries | " + " | ".join(row.embedding for row in subset) + " |",
            "|---|---|" + "---|" * len(subset),
        ]
        for name in classes:
            cells = [f"{row.quality['original'].per_class[name].p_at_k:.4f}" for row in subset]
            count = subset[0].quality["original"].per_class[name].queries
            lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
        means = [f"**{mean_per_class(row.quality['original']):.4f}**" for row in subset]
        lines.append(f"| **mean over classes** | {len(classes)} classes | " + " | ".join(means) + " |")
    checked = [row for row in rows if row.in_process_max_diff is not None]
    if checked:
        worst = max(row.in_process_max_diff or 0.0 for row in checked)
        lines += [
            "",
            "## The in-process fast path",
            "",
            f"For each model, the same figures computed in process (LiteRT + FAISS, no services) differ from "
            f"the services' by at most {worst:.6f} (required: under 0.0001). Training writes the figures of "
            "its own fast path (Keras + FAISS, rounded to 4 decimals) into each model's card:",
            "",
            "| data | model | version | card P@1 | card P@10 | card mAP@10 | services P@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in checked:
            card = row.card_figures or {}
            figures = " | ".join(
                f"{card[key]:.4f}" if key in card else "-" for key in ("p_at_1", "p_at_k", "map_at_k")
            )
            title = titles.get(row.dataset, row.dataset)
            served = row.quality["original"].p_at_k
            lines.append(f"| {title} | {row.embedding} | {row.model_version} | {figures} | {served:.4f} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[Row], path: Path) -> None:
    """P@10 per embedding, one group per dataset (its own rows only, a colour per embedding name), and a
    dashed line at each dataset's chance P@10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row.dataset for row in rows))
    embeddings = list(dict.fromkeys(row.embedding for row in rows))
    colours = {name: plt.get_cmap("tab10")(n % 10) for n, name in enumerate(embeddings)}
    titles = {suite.dataset: suite.title for suite in SUITES}
    widest = max(sum(1 for r in rows if r.dataset == d) for d in datasets)
    figure, axes = plt.subplots(figsize=(max(8.0, 3.0 * len(datasets)), 3.8), dpi=100)
    width = 0.8 / widest
    labelled: set[str] = set()
    for centre, dataset in enumerate(datasets):
        subset = [r for r in rows if r.dataset == dataset]
        for n, row in enumerate(subset):
            bars = axes.bar(
                [centre + (n - (len(subset) - 1) / 2) * width],
                [row.quality["original"].p_at_k],
                width,
                color=colours[row.embedding],
                label=row.embedding if row.embedding not in labelled else None,
            )
            labelled.add(row.embedding)
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        chance = subset[0].chance
        if chance:
            half = len(subset) * width / 2
            axes.hlines(chance["p_at_k"], centre - half, centre + half, colors="0.3", linestyles="dashed")
    axes.plot([], [], color="0.3", linestyle="dashed", label="chance")
    axes.set_xticks(np.arange(len(datasets)), [titles.get(d, d) for d in datasets], fontsize=8)
    lowest = min(
        [r.quality["original"].p_at_k for r in rows] + [r.chance["p_at_k"] for r in rows if r.chance]
    )
    axes.set_ylim(0.5 if lowest > 0.55 else 0.0, 1.12)
    axes.set_ylabel("P@10 (label agreement)")
    axes.set_title("Retrieval quality through the services (make eval)")
    axes.legend(loc="upper right", fontsize=7, ncols=len(embeddings) + 1)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def as_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [
        {
            **{key: value for key, value in asdict(row).items() if key != "quality"},
            "quality": {
                name: {
                    **{k: v for k, v in asdict(q).items() if k != "per_class"},
                    "mean_per_class_p_at_k": mean_per_class(q),
                    "per_class": {c: asdict(cq) for c, cq in q.per_class.items()},
                }
                for name, q in row.quality.items()
            },
        }
        for row in rows
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imgsearch eval --suite", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--datasets",
        default=",".join(suite.dataset for suite in SUITES),
        help="comma list (default: every suite: " + ", ".join(suite.dataset for suite in SUITES) + ")",
    )
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the models are")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the report")
    parser.add_argument(
        "--limit", type=int, default=0, help="at most this many index and query images (quick runs)"
    )
    args = parser.parse_args(argv)
    chosen = [suite for suite in SUITES if suite.dataset in args.datasets.split(",")]
    if not chosen:
        parser.error(f"no known dataset in {args.datasets!r}")
    started = time.monotonic()
    args.output.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="imgsearch-eval-") as work:
        for suite in chosen:
            rows += evaluate_suite(suite, args.models_dir, Path(work), args.limit)
    seconds = time.monotonic() - started
    command = " ".join(["imgsearch eval --suite", *(sys.argv[1:] if argv is None else argv)]).strip()
    (args.output / "EVAL.md").write_text(markdown(rows, seconds, command))
    (args.output / "eval.json").write_text(json.dumps(as_json(rows), indent=1) + "\n")
    bar_chart(rows, args.output / "quality.png")
    disagree = [row for row in rows if (row.in_process_max_diff or 0.0) >= 1e-4]
    print(f"wrote {args.output}/EVAL.md, eval.json and quality.png in {seconds:.0f} s")
    if disagree:
        print(
            f"error: the in-process figures disagree with the services' for {[r.embedding for r in disagree]}"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
