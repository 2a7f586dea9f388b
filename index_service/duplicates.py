"""Near-duplicate groups: a batched range search over a set of vectors, its links joined into connected
components. Both backends give it their items' ids and vectors (FAISS from memory, Milvus as read out)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import faiss
import numpy as np

from imgsearch_server.pools import run_on_every_core
from index_service.store import Check, StoreError

CHUNK_DISTANCES = 1 << 25  # distances per range-search chunk: tens of ms, then `check` runs
DEFAULT_MAX_PAIRS = 5_000_000
_CORES = len(os.sched_getaffinity(0))


class TooManyPairs(StoreError):
    """The distance links more pairs than the limit: the answer would be unbounded."""


Group = tuple[list[str], float]  # ids (sorted), the largest distance among its linked pairs


def duplicate_groups(
    ids: Sequence[str],
    vectors: np.ndarray,
    max_distance: float,
    *,
    check: Check | None = None,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> tuple[list[Group], int]:
    """The groups of two or more items linked by distances of at most max_distance (inclusive), largest
    group first, and the number of linked pairs.

    FAISS's range search finds the candidates in float32 (|x|^2 + |y|^2 - 2xy, which can be off by a
    little for near-equal vectors), with a radius a little wider than asked; each candidate's distance is
    then computed exactly (float64) and kept when it is at most max_distance."""
    count = len(ids)
    if count < 2:
        return [], 0
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    widened = float(max_distance) * (1 + 1e-4) + 1e-3
    radius = widened * widened
    firsts: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    distances: list[np.ndarray] = []
    pairs = 0
    run_on_every_core()  # OpenMP's team, started here, inherits this thread's cores
    faiss.omp_set_num_threads(_CORES)
    chunk = max(64, CHUNK_DISTANCES // count)
    for start in range(0, count, chunk):
        if start and check is not None:
            check()
        stop = min(start + chunk, count)
        lims, _, found = index.range_search(vectors[start:stop], radius)
        query = np.repeat(np.arange(start, stop), np.diff(lims).astype(np.int64))
        later = found > query  # each pair once, and not an item with itself
        first, second = query[later], found[later].astype(np.int64)
        exact = np.sqrt(((vectors[first].astype(np.float64) - vectors[second]) ** 2).sum(axis=1))
        close = exact <= max_distance
        pairs += int(close.sum())
        if pairs > max_pairs:
            raise TooManyPairs(
                f"max_distance {max_distance:g} links more than {max_pairs} pairs of items; give a smaller "
                "one (or a filter)"
            )
        firsts.append(first[close])
        seconds.append(second[close])
        distances.append(exact[close])
    if not pairs:
        return [], 0
    first = np.concatenate(firsts)
    second = np.concatenate(seconds)
    linked = np.concatenate(distances)
    roots = _components(count, first, second)
    groups: dict[int, list[int]] = {}
    for item in np.unique(np.concatenate([first, second])).tolist():
        groups.setdefault(int(roots[item]), []).append(item)
    widest: dict[int, float] = {}
    for root, distance in zip(roots[first].tolist(), linked.tolist(), strict=True):
        widest[root] = max(widest.get(root, 0.0), distance)
    result = [(sorted(ids[i] for i in members), widest[root]) for root, members in groups.items()]
    result.sort(key=lambda group: (-len(group[0]), group[0][0]))
    return result, pairs


def _components(count: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Each item's component representative (union-find with path halving)."""
    parent = list(range(count))

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        root_a, root_b = find(a), find(b)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return np.array([find(item) for item in range(count)], dtype=np.int64)
