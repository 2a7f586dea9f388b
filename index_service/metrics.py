"""The index's own metrics, added to its server's registry (imgsearch_server/metrics.py has the request
metrics every server keeps): vectors per Upsert call, and the vectors and bytes stored, read at scrape
time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from imgsearch_server.metrics import BATCH_BUCKETS, ServerMetrics

log = logging.getLogger("imgsearch.metrics")  # the shared metrics' logger, as before the split

# The names as scraped (histograms as _bucket/_sum/_count, info with _info).
INDEX_VECTORS_PER_BATCH = "imgsearch_index_vectors_per_batch"
INDEX_VECTORS = "imgsearch_index_vectors"
INDEX_BYTES = "imgsearch_index_bytes"
INDEX_INFO = "imgsearch_index_info"
EXPORTED = (INDEX_VECTORS_PER_BATCH, INDEX_VECTORS, INDEX_BYTES, INDEX_INFO)


class _Stats(Protocol):
    @property
    def count(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def model_version(self) -> str: ...
    @property
    def bytes_used(self) -> int: ...


class IndexStatsCollector(Collector):
    """The index's size, read from the store at each scrape: cheap for FAISS (a read lock); for Milvus a
    remote call, fine at scrape intervals. When the store cannot answer, the scrape leaves them out."""

    def __init__(self, stats: Callable[[], _Stats], backend: str) -> None:
        self._stats = stats
        self._backend = backend

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not call the store

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._stats()
        except Exception as error:
            log.warning("metrics: cannot read the index's stats: %s", error)
            return []
        return [
            GaugeMetricFamily(INDEX_VECTORS, "vectors stored", value=stats.count),
            GaugeMetricFamily(
                INDEX_BYTES, "bytes the stored vectors, ids and metadata take", value=stats.bytes_used
            ),
            InfoMetricFamily(
                "imgsearch_index",
                "the index's backend, and the dim and model version of what it holds",
                value={"model_version": stats.model_version, "backend": self._backend, "dim": str(stats.dim)},
            ),
        ]


def watch_index(metrics: ServerMetrics, upsert_path: str, stats: Callable[[], _Stats], backend: str) -> None:
    """Vectors per Upsert call (OK calls only), and the vectors and bytes stored, read at scrape time."""
    per_batch = Histogram(
        "imgsearch_index_vectors_per_batch",
        "vectors in each Upsert call that succeeded",
        buckets=BATCH_BUCKETS,
        registry=metrics.registry,
    )
    metrics.on_ok(upsert_path, lambda request, _reply: per_batch.observe(len(request.ids)))
    metrics.registry.register(IndexStatsCollector(stats, backend))
