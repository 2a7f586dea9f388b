"""The encoder's own metrics, added to its server's registry (imgsearch_server/metrics.py has the request
metrics every server keeps): images per Embed call and in all, and the models served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Histogram, Info

from imgsearch_server.metrics import BATCH_BUCKETS, ServerMetrics

# The names as scraped (counters with _total, histograms as _bucket/_sum/_count, info with _info).
ENCODER_IMAGES_PER_BATCH = "imgsearch_encoder_images_per_batch"
ENCODER_IMAGES = "imgsearch_encoder_images_total"
MODEL_INFO = "imgsearch_model_info"
EXPORTED = (ENCODER_IMAGES_PER_BATCH, ENCODER_IMAGES, MODEL_INFO)


def watch_encoder(
    metrics: ServerMetrics, embed_path: str, *, models: Mapping[str, str], runtime: str, replica: str
) -> None:
    """Images per Embed call and in all (OK calls only, every model together), and each model served
    (`models`: name -> model version) as one sample of an info metric."""
    per_batch = Histogram(
        "imgsearch_encoder_images_per_batch",
        "images in each Embed call that succeeded",
        buckets=BATCH_BUCKETS,
        registry=metrics.registry,
    )
    images = Counter("imgsearch_encoder_images", "images embedded", registry=metrics.registry)
    served = Info("imgsearch_model", "the models this encoder serves", ("model",), registry=metrics.registry)
    for name, model_version in models.items():
        served.labels(model=name).info(
            {"model_version": model_version, "runtime": runtime, "replica": replica}
        )

    def observe(request: Any, _reply: Any) -> None:
        count = len(request.images)
        per_batch.observe(count)
        images.inc(count)

    metrics.on_ok(embed_path, observe)
