"""`make eval` (`imgsearch eval --suite`): retrieval quality through the real services, beside the baselines.

For each dataset (the MNIST sample: index = its first 8,000 digits, queries = its last 2,000;
Fashion-MNIST: index = train, queries = test), every embedding is measured the way users get it:
- `raw`: the 784 preprocessed pixels, and `pca`: those projected on 128 principal components fitted on
  the index split only; computed here, then stored and searched in a real index service;
- each shipped model trained on that dataset's index split (the tutorial's, and the default recipe):
  the images go as PNG files through a real encoder service, the vectors into a real index service.
For the models the same figures are also computed in process (LiteRT + FAISS, the fast path training
uses) and the two must agree to the fourth decimal. The MNIST queries are also sent perturbed (other
stroke widths, blur, off-centre, a large drawing on a white canvas) to measure robustness to digits
from other sources.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

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
    """One dataset and the shipped models trained on its index split: (row label, model directory name)."""

    dataset: str
    title: str
    models: tuple[tuple[str, str], ...]


SUITES = (
    Suite("mnist-sample", "MNIST sample (8,000 / 2,000)", (("tutorial", "tutorial"), ("default", "default"))),
    Suite(
        "fashion_mnist",
        "Fashion-MNIST (60,000 / 10,000)",
        (("tutorial", "fashion-tutorial"), ("default", "fashion")),
    ),
)


@dataclass(frozen=True)
class Split:
    """uint8 [N, 28, 28] images (0 = background, 255 = ink) with their class names."""

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
    """The images as PNG files, perturbed."""
    change = PERTURBATIONS[perturbation]
    return [_png(change(Image.fromarray(image))) for image in x]


def preprocess(pngs: Sequence[bytes]) -> np.ndarray:
    """float32 [N, 28, 28] as the encoder service sees them (decode, polarity, fit)."""
    from encoder_service.preprocess import decode_image

    return np.stack([decode_image(data) for data in pngs]).astype(np.float32)


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
    """The model's vectors of each float32 [N, 28, 28] batch, in this process (the serving runtime, loaded
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


def evaluate_suite(
    suite: Suite,
    models_dir: Path,
    work: Path,
    limit: int = 0,
    log: Callable[[str], None] = print,
) -> list[Row]:
    split = load_split(suite.dataset, limit)
    index_labels, query_labels = split.names(split.y_index), split.names(split.y_query)
    perturbations = list(PERTURBATIONS) if suite.dataset.startswith("mnist") else ["original"]
    log(f"{suite.dataset}: encoding {len(split.x_index)} index and {len(split.x_query)} query images as PNGs")
    index_pngs = encode_queries(split.x_index, "original")
    query_pngs = {name: encode_queries(split.x_query, name) for name in perturbations}
    index_inputs = preprocess(index_pngs)
    query_inputs = {name: preprocess(pngs) for name, pngs in query_pngs.items()}

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
        log(f"  {name:<10} P@1 {quality['original'].p_at_1:.4f}  P@10 {quality['original'].p_at_k:.4f}")
        return Row(suite.dataset, name, dim, version, quality)

    rows = [
        measure("raw", 784, "", raw_pixels(index_inputs), {q: raw_pixels(v) for q, v in query_inputs.items()})
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
        index_vectors, query_vectors = in_process_vectors(model_dir, index_inputs, query_inputs["original"])
        fast = retrieval_quality(
            query_labels, nearest_labels(index_vectors, index_labels, query_vectors, K), K
        )
        served = row.quality["original"]
        row.in_process_max_diff = max(
            abs(served.p_at_1 - fast.p_at_1),
            abs(served.p_at_k - fast.p_at_k),
            abs(served.map_at_k - fast.map_at_k),
        )
        card = json.loads((model_dir / CARD_JSON).read_text()).get("retrieval") or None
        if card and not limit:
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
        "query split never overlap, and every model was trained on the index split only.",
        "",
        "| data | embedding | dim | model version | P@1 | P@10 | mAP@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    titles = {suite.dataset: suite.title for suite in SUITES}
    for row in rows:
        q = row.quality["original"]
        lines.append(
            f"| {titles.get(row.dataset, row.dataset)} | {row.embedding} | {row.dim} | "
            f"{row.model_version or '-'} | {q.p_at_1:.4f} | {q.p_at_k:.4f} | {q.map_at_k:.4f} |"
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
    """P@10 per embedding, one group per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row.dataset for row in rows))
    embeddings = list(dict.fromkeys(row.embedding for row in rows))
    titles = {suite.dataset: suite.title for suite in SUITES}
    figure, axes = plt.subplots(figsize=(8, 3.6), dpi=100)
    width = 0.8 / len(embeddings)
    for n, embedding in enumerate(embeddings):
        values = [
            next(
                (r.quality["original"].p_at_k for r in rows if r.dataset == d and r.embedding == embedding), 0
            )
            for d in datasets
        ]
        bars = axes.bar(np.arange(len(datasets)) + (n - (len(embeddings) - 1) / 2) * width, values, width)
        bars.set_label(embedding)
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axes.set_xticks(np.arange(len(datasets)), [titles.get(d, d) for d in datasets])
    axes.set_ylim(0.5, 1.08)
    axes.set_ylabel("P@10 (label agreement)")
    axes.set_title("Retrieval quality through the services (make eval)")
    axes.legend(loc="upper right", fontsize=8, ncols=len(embeddings))
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
