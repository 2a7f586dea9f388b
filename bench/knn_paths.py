"""One filtered query on one thread through each of ParallelKnn's paths, by selectivity: where the row list
(`knn_L2sqr_by_idx`) stops paying and every distance with a mask starts (parallel_knn.SUBSET_FRACTION).

    python -m bench.knn_paths --n 1000000 --repeat 15

Not a section of `make bench`: it picks a threshold, it does not measure the service. Prints ms (median of
`--repeat` calls, the paths interleaved), standard-normal 128-d rows, random masks, k = 10."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import faiss
import numpy as np

from index_service import parallel_knn

SELECTIVITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.9)
K = 10


def call_s(call: Callable[[np.ndarray], object], query: np.ndarray) -> float:
    started = time.perf_counter()
    call(query[None])
    return time.perf_counter() - started


def row_list(rows: np.ndarray, subset: np.ndarray, query: np.ndarray) -> object:
    return parallel_knn._subset_shard(query, rows, subset, K)


def dense(rows: np.ndarray, unselected: np.ndarray, query: np.ndarray) -> object:
    return parallel_knn._dense_shard(query, rows, unselected, 0, len(rows), K)


def bitmap(rows: np.ndarray, bits: np.ndarray, query: np.ndarray) -> object:
    return parallel_knn._bitmap_shard(query, rows, bits, 0, len(rows), K)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows (default 100,000)")
    parser.add_argument("--repeat", type=int, default=41, help="calls of each path (default 41)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((args.n, 128), dtype=np.float32)
    queries = rng.standard_normal((64, 128), dtype=np.float32)
    for share in SELECTIVITIES:
        mask = rng.random(args.n) < share
        unselected, bits = ~mask, parallel_knn._bitmap(mask)
        subset = np.flatnonzero(mask).astype(np.int64)
        paths: dict[str, Callable[[np.ndarray], object]] = {
            "row list": partial(row_list, rows, subset),
            "dense": partial(dense, rows, unselected),
            "bitmap": partial(bitmap, rows, bits),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for n in range(args.repeat):
            for name, path in paths.items():
                times[name].append(call_s(path, queries[n % len(queries)]))
        print(f"{share:4.0%}  " + "  ".join(f"{name} {np.median(t) * 1e3:.2f}" for name, t in times.items()))
    unfiltered = [
        call_s(lambda q: parallel_knn._knn_shard(q, rows, 0, args.n, K), queries[n % len(queries)])
        for n in range(args.repeat)
    ]
    print(f"unfiltered {np.median(unfiltered) * 1e3:.2f}")


if __name__ == "__main__":
    main()
