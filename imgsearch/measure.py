"""Retrieval quality of a collection through the services: a labelled query folder embedded by the
collection's model and searched in it. What `imgsearch eval` prints and `aliases set --if-better` weighs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from imgsearch.client import ImageSearch, IndexClient, Match
from imgsearch.evaluate import Quality, retrieval_quality
from imgsearch.ingest import ImageFile, embed_files

RESULTS_PER_CALL = 100_000  # the index's default --max-results: queries x k in one search


def search_in_batches(
    index: IndexClient,
    vectors: np.ndarray,
    k: int,
    version: str,
    batch_size: int,
    collection: str | None = None,
) -> list[list[Match]]:
    """The matches of every query, asked for in calls of up to `batch_size` queries, fewer where k is
    large, so that each call stays within the index's default results budget (--max-results)."""
    per_call = max(1, min(batch_size, RESULTS_PER_CALL // max(k, 1)))
    results: list[list[Match]] = []
    for start in range(0, len(vectors), per_call):
        results += index.search(vectors[start : start + per_call], k, version, collection=collection)
    return results


@dataclass
class Measured:
    collection: str  # the collection measured (an alias resolved)
    model: str  # the model that embedded the queries ("" for the encoder's default)
    quality: Quality
    queries: list[ImageFile]  # those embedded
    results: list[list[Match]]
    labels: list[list[str]]  # each result's label
    skipped: list[tuple[str, str]]  # queries the encoder could not use, with why


def measure(
    search: ImageSearch,
    files: Sequence[ImageFile],
    k: int,
    batch_size: int,
    collection: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Measured:
    """P@1, P@k and mAP@k of one collection for labelled queries, each embedded by its model. ValueError
    when no query could be used."""
    target = search.target(collection)
    encoder_model = search.encoder.model
    search.encoder.model = target.model
    try:
        kept, vectors, version, skipped = embed_files(search.encoder, files, batch_size, on_batch=on_batch)
    finally:
        search.encoder.model = encoder_model
    if not kept:
        raise ValueError("no usable query images")
    results = search_in_batches(search.index, vectors, k, version, batch_size, target.collection)
    labels = [[m.metadata.get("label", "") for m in row] for row in results]
    quality = retrieval_quality([f.label for f in kept], labels, k)
    return Measured(target.collection, target.model, quality, kept, results, labels, skipped)
