"""Retrieval quality by label agreement: P@1, P@k and mAP@k, overall and per class; and exact k-NN in
process (the fast path training uses; `make eval` measures through the services)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassQuality:
    queries: int
    p_at_1: float
    p_at_k: float
    map_at_k: float


@dataclass(frozen=True)
class Quality:
    queries: int
    k: int
    p_at_1: float
    p_at_k: float
    map_at_k: float
    per_class: dict[str, ClassQuality]


def average_precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """AP@k: the mean of P@i over the ranks i <= k that hold a relevant result (0 when none do)."""
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant[:k], start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def retrieval_quality(query_labels: Sequence[str], result_labels: Sequence[Sequence[str]], k: int) -> Quality:
    """Returns the figures for queries whose results carry labels; a result counts when its label matches.

    P@k divides by k even when fewer than k results came back."""
    if len(query_labels) != len(result_labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(result_labels)} result lists")
    rows: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for label, results in zip(query_labels, result_labels, strict=True):
        relevant = [r == label for r in results[:k]]
        rows[label].append(
            (
                float(bool(relevant[:1] and relevant[0])),
                sum(relevant) / k,
                average_precision_at_k(relevant, k),
            )
        )

    def mean(values: list[tuple[float, float, float]], column: int) -> float:
        return sum(v[column] for v in values) / len(values) if values else 0.0

    every = [row for values in rows.values() for row in values]
    return Quality(
        queries=len(every),
        k=k,
        p_at_1=mean(every, 0),
        p_at_k=mean(every, 1),
        map_at_k=mean(every, 2),
        per_class={
            label: ClassQuality(len(values), mean(values, 0), mean(values, 1), mean(values, 2))
            for label, values in sorted(rows.items())
        },
    )


# A query this close to a stored vector is that very image: the encoder gives an image the same vector.
SELF_MATCH_DISTANCE = 1e-5


def unmatched_labels(query_labels: Sequence[str], result_labels: Sequence[Sequence[str]]) -> list[str]:
    """The query labels that no result carries, sorted: their queries score 0 whatever was found, which
    most often means the index knows no such label (query subfolders named otherwise than the labels the
    index was built with), not that retrieval failed."""
    carried = {label for row in result_labels for label in row}
    return sorted(set(query_labels) - carried)


def self_matches(query_ids: Sequence[str], nearest: Sequence[tuple[str, float] | None]) -> int:
    """How many queries the index holds themselves: their nearest result (id, distance; None for none) has
    their id, or lies at distance ~0 (the same image, under any id). Such a query's P@1 is a self-match,
    not retrieval."""
    return sum(
        1
        for query_id, found in zip(query_ids, nearest, strict=True)
        if found is not None and (found[0] == query_id or found[1] <= SELF_MATCH_DISTANCE)
    )


def nearest_labels(
    vectors: np.ndarray, labels: Sequence[str], queries: np.ndarray, k: int, batch: int = 500
) -> list[list[str]]:
    """The labels of each query's k nearest vectors by exact L2 (FAISS IndexFlatL2, as the index service).

    Queries go in batches of `batch`, as `make eval` sends them to the index service: FAISS switches to
    a BLAS kernel from (queries x dim) >= 128,000, which can order near-ties differently, so the same
    batches keep the in-process figures equal to the service's."""
    import faiss

    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, np.float32))
    found: list[list[str]] = []
    for start in range(0, len(queries), batch):
        _, rows = index.search(np.ascontiguousarray(queries[start : start + batch], np.float32), k)
        found += [[labels[n] for n in row if n >= 0] for row in rows]
    return found
