"""`imgsearch reindex`: fill a new collection (in the same index service, or in another) with the items of
another, embedded again by the model the new collection is filled by.

A collection holds the vectors of one model version, so changing models means embedding every image again.
`imgsearch index` keeps each image's path in the metadata key `source`, so the images can be found
again: the source index is scanned (ids and metadata; a point-in-time view, read before any embedding so
the source's server is not held for the whole run), and its items go through `index_images`, the batching,
pipelining and patient retries of `imgsearch index`, into the target under their old ids with their old
metadata. Upserts are by id, so a reindex that stopped half way can simply be run again.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsearch.addresses import same_service
from imgsearch.client import ImageSearch, IndexClient
from imgsearch.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IN_FLIGHT,
    DEFAULT_PATIENCE_S,
    ImageFile,
    index_images,
    patiently,
)
from imgsearch.words import plural

SOURCE_KEY = "source"  # the metadata key `imgsearch index` stores each image's path under


class ReindexRefused(Exception):
    """The target cannot take this reindex (it is the source, or holds another model's vectors); nothing
    was written."""


@dataclass(frozen=True, eq=False)
class StoredImage(ImageFile):
    """An item of the source index as an ImageFile, so the ingest can take it: the id and metadata are
    kept exactly as they were, not derived from the path."""

    stored: Mapping[str, str] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.stored)


@dataclass
class ReindexPlan:
    """What the scan of the source found: the items to embed again, and those that cannot be."""

    model_version: str  # the encoder's, which the target will hold
    total: int = 0  # items in the source when the scan began
    images: list[StoredImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why)


@dataclass
class ReindexReport:
    total: int  # items in the source when the scan began
    reindexed: int
    skipped: list[tuple[str, str]]  # (id, why), items with no usable source
    count: int  # items in the target afterwards
    model_version: str  # the target's afterwards


def plan_reindex(
    source: IndexClient,
    target: ImageSearch,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_wait: Callable[[str], None] | None = None,
) -> ReindexPlan:
    """Checks that the target may take the items of the source and scans the source. The target is pinned
    to its collection (an alias resolved) and that collection's model.

    Raises ReindexRefused when the target is the source collection itself, or already holds vectors of a
    model version other than its model's (an empty target is fine, and so is one holding that version: a
    reindex run again)."""
    source_collection = patiently(source.stats, patience_s, on_wait).collection
    pinned = patiently(target.pin, patience_s, on_wait)
    if same_service(source.address, target.index.address) and source_collection == pinned.collection:
        raise ReindexRefused(
            f"the target {target.index.address}, collection {pinned.collection!r}, is the collection being "
            f"reindexed (--index {source.address}); give --to-collection a new collection (imgsearch "
            "collections create NEW --model MODEL), or --to the address of another index service"
        )
    info = patiently(target.encoder.info, patience_s, on_wait)
    version = model_version(info, pinned.model)
    held = patiently(target.index.stats, patience_s, on_wait)
    if held.count and held.model_version != version:
        raise ReindexRefused(
            f"the target collection {pinned.collection!r} at {target.index.address} holds "
            f"{plural(held.count, 'vector')} of model version {held.model_version!r}, not the encoder's "
            f"{version!r} (model {pinned.model or 'default'!r}); reindex into a new, empty collection"
        )
    return patiently(lambda: _scan(source, version), patience_s, on_wait)


def model_version(info: Mapping[str, Any], model: str) -> str:
    """The version of the encoder's model of that name ("" for its default), from its Info; ValueError
    naming the models served when it serves none of that name."""
    for served in info.get("models") or ():
        if served["name"] == model or (not model and served["default"]):
            return str(served["model_version"])
    if not model or not info.get("models"):  # an encoder of one model, from before several were served
        return str(info["model_version"])
    names = ", ".join(served["name"] for served in info["models"])
    raise ValueError(f"the encoder serves no model {model!r} (it serves: {names}; --models)")


def _scan(source: IndexClient, version: str) -> ReindexPlan:
    """The whole scan, so that a retry after the source went away starts it over."""
    plan = ReindexPlan(version)
    for page in source.scan():
        plan.total = page.total
        for item_id, metadata in zip(page.ids, page.metadata, strict=True):
            path = metadata.get(SOURCE_KEY, "")
            if not path:
                plan.skipped.append((item_id, f"no `{SOURCE_KEY}` path in its metadata"))
                continue
            plan.images.append(StoredImage(item_id, Path(path), metadata.get("label", ""), metadata))
    return plan


def run_reindex(
    plan: ReindexPlan,
    target: ImageSearch,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_wait: Callable[[str], None] | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> ReindexReport:
    """Embeds the plan's images with the target's encoder and upserts them into the target's index.

    Files that cannot be read or that the encoder refuses are reported by id, with the path and why."""
    ingest = index_images(target, plan.images, batch_size, on_batch, patience_s, on_wait, in_flight)
    ids_of: defaultdict[str, deque[str]] = defaultdict(deque)  # the ingest reports paths; users know ids
    for image in plan.images:
        ids_of[str(image.path)].append(image.id)
    skipped = list(plan.skipped)
    for path, reason in ingest.skipped:
        ids = ids_of.get(path)
        skipped.append((ids.popleft() if ids else path, f"{reason} ({path})"))
    version = plan.model_version
    if ingest.indexed:
        version = patiently(target.index.stats, patience_s, on_wait).model_version
    return ReindexReport(plan.total, ingest.indexed, skipped, ingest.count, version)
