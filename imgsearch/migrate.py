"""`imgsearch migrate`: copy a whole collection from one index service to another, without re-embedding.

How to move a collection between backends (FAISS to Milvus: a second index service started with
`--backend milvus`) or between machines. The source is read with `Index.Scan` with vectors, a
point-in-time view: the server copies its items when the scan begins and streams the copy, so writes that
land on the source while the migration runs are not copied (stop writers first, or copy them again
afterwards). Each page is upserted into the target under the same ids, with the same metadata, vectors and
model version. Upserts are by id, so a migration run twice stores each item once; each upsert is retried
patiently while the target is unreachable, and a scan cut short (the source restarted, a connection closed
by --max-connection-age-s) is begun again, skipping the ids already copied.

The target is checked first: it must be another service than the source, must not hold vectors of another
model version or dim, and must be empty unless the caller says otherwise (`into_nonempty`). Afterwards the
target's count is compared with the items copied (when it was empty before).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from imgsearch.addresses import same_service
from imgsearch.client import IndexClient, IndexStats, ScanPage, ServiceError
from imgsearch.ingest import DEFAULT_PATIENCE_S, patiently
from imgsearch.words import plural

DEFAULT_PAGE_SIZE = 10_000  # items per scan page and per upsert: the index's default --max-batch
MAX_FRUITLESS_RESTARTS = 3  # scans cut short in a row that copied nothing new, before giving up
_BATCH_LIMIT = "(--max-batch)"  # in the index service's refusal of a call over its --max-batch


class MigrateRefused(Exception):
    """The target cannot take this migration (it is the source, holds another model's vectors or dim, or
    is not empty); nothing was written. Also raised when the target refuses a page part-way through."""


@dataclass
class MigrateReport:
    source: str
    target: str
    total: int  # items in the source when the (last) scan began
    migrated: int  # distinct ids upserted into the target
    model_version: str
    dim: int
    target_before: int  # items in the target before the migration
    count: int  # items in the target afterwards
    seconds: float
    restarts: int = 0  # scans begun again after the source went away mid-stream

    @property
    def mismatch(self) -> str:
        """Why the target does not hold what was copied, or "" when it does (or cannot be told: a target
        that held items before may share ids with the source)."""
        if self.target_before or self.count == self.migrated:
            return ""
        expected = f"{plural(self.migrated, 'item')} {'was' if self.migrated == 1 else 'were'} copied"
        if not self.restarts:
            expected += " (the source's count when the scan began)"
        return (
            f"the target at {self.target} holds {plural(self.count, 'item')}, but {expected}; was it written "
            "to, or deleted from, during the migration?"
        )

    def summary(self) -> str:
        if not self.migrated and not self.total:
            return f"nothing to migrate: the index at {self.source} is empty; {self.target} is unchanged"
        return (
            f"migrated {plural(self.migrated, 'item')} (model {self.model_version or '-'}, dim {self.dim}) "
            f"from {self.source} to {self.target} in {self.seconds:.1f} s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "total": self.total,
            "migrated": self.migrated,
            "model_version": self.model_version,
            "dim": self.dim,
            "target_before": self.target_before,
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.migrated / self.seconds, 1) if self.seconds > 0 else None,
            "restarts": self.restarts,
            "verified": not self.mismatch,
        }


def check_target(
    source: IndexClient,
    target: IndexClient,
    into_nonempty: bool = False,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_wait: Callable[[str], None] | None = None,
) -> tuple[IndexStats, IndexStats]:
    """Returns the stats of (source, target) once the target is found fit to take the source's items.

    Raises MigrateRefused when the target is the source itself, holds vectors of another model version or
    dim than the source's, or holds anything at all without `into_nonempty`. An empty source passes."""
    held = patiently(source.stats, patience_s, on_wait)
    there = patiently(target.stats, patience_s, on_wait)
    if same_service(source.address, target.address) and held.collection == there.collection:
        raise MigrateRefused(
            f"the target {target.address}, collection {there.collection!r}, is the collection being migrated "
            f"(--index {source.address}); give --to the address of another index service, or "
            "--to-collection another collection"
        )
    if not held.count or not there.count:
        return held, there
    if there.model_version != held.model_version or there.dim != held.dim:
        raise MigrateRefused(
            f"the target index at {target.address} holds {plural(there.count, 'vector')} of model version "
            f"{there.model_version or '-'!r}, dim {there.dim}; the source's are model version "
            f"{held.model_version or '-'!r}, dim {held.dim}: migrate into an empty index service"
        )
    if not into_nonempty:
        raise MigrateRefused(
            f"the target index at {target.address} already holds {plural(there.count, 'item')} (model "
            f"version {there.model_version or '-'!r}); migrate into an empty index service, or pass "
            "--into-nonempty to add to them (items with the same id are replaced; running a migration "
            "again is harmless)"
        )
    return held, there


def migrate(
    source: IndexClient,
    target: IndexClient,
    page_size: int = DEFAULT_PAGE_SIZE,
    into_nonempty: bool = False,
    patience_s: float = DEFAULT_PATIENCE_S,
    on_start: Callable[[int], None] | None = None,
    on_page: Callable[[int], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    checked: tuple[IndexStats, IndexStats] | None = None,
) -> MigrateReport:
    """Copies every item of the source index into the target: same ids, metadata, vectors, model version.

    The source is scanned with vectors in pages of `page_size` (a point-in-time view: writes made to the
    source after the scan began are not copied) and each page is upserted into the target, in pieces of
    at most page_size items, fewer where the target's --max-batch is lower. Upserts are retried while the
    target is unreachable, for up to patience_s each; a scan cut short is begun again once the source
    answers, and the ids already copied are not sent again. on_start(total) is called when a scan begins
    (again after a restart), on_page(items) after each page. `checked`: what check_target returned, when
    the caller has called it already. Raises MigrateRefused (see check_target), and ServiceError for what
    patience does not cure."""
    if page_size < 1:
        raise ValueError(f"the page size must be positive, got {page_size}")
    began = time.monotonic()
    held, there = checked or check_target(source, target, into_nonempty, patience_s, on_wait)
    report = MigrateReport(
        source.address, target.address, 0, 0, held.model_version, held.dim, there.count, there.count, 0.0
    )
    copied: set[str] = set()
    batch = [page_size]  # the upsert size, lowered when the target's --max-batch is lower
    fruitless = 0
    while True:
        before = len(copied)
        try:
            with closing(_ahead(_pages(source, page_size, on_wait))) as pages:
                for number, page in enumerate(pages):
                    if not number:
                        report.total, report.model_version = page.total, page.model_version
                        if on_start is not None:
                            on_start(page.total)
                    _copy_page(target, page, copied, batch, report, patience_s, on_wait)
                    if on_page is not None:
                        on_page(len(page.ids))
            break
        except _ScanCut as cut:
            fruitless = 0 if len(copied) > before else fruitless + 1
            if fruitless > MAX_FRUITLESS_RESTARTS:
                raise cut.error from None
            report.restarts += 1
            if on_wait is not None:
                on_wait(f"{cut.error}; the scan is begun again ({plural(len(copied), 'item')} copied so far)")
            patiently(source.stats, patience_s, on_wait)  # wait for the source to answer again
    if copied or report.total:
        report.count = patiently(target.stats, patience_s, on_wait).count
    report.seconds = time.monotonic() - began
    return report


class _ScanCut(Exception):
    """The source's scan stream failed part-way with UNAVAILABLE (wraps the ServiceError)."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


def _pages(
    source: IndexClient, page_size: int, on_wait: Callable[[str], None] | None
) -> Generator[ScanPage, None, None]:
    """The source's scan with vectors. A page size over the source's --max-batch falls back to the
    server's default (1000, or its --max-batch when lower); UNAVAILABLE part-way becomes _ScanCut."""
    size = page_size
    while True:
        pages = source.scan(size, with_vectors=True)
        try:
            try:
                page = next(pages, None)
            except ServiceError as error:
                if _over_limit(error) and size:
                    if on_wait is not None:
                        on_wait(f"{error}; scanning in the source's default page size instead")
                    size = 0
                    continue
                raise
            while page is not None:
                yield page
                page = next(pages, None)
            return
        except ServiceError as error:
            if error.code == grpc.StatusCode.UNAVAILABLE:
                raise _ScanCut(error) from None
            raise
        finally:
            # Cancels the call when the copy stops early, so the source frees its copy at once.
            getattr(pages, "close", lambda: None)()


def _ahead(pages: Generator[ScanPage, None, None]) -> Generator[ScanPage, None, None]:
    """The pages, each next one read in a thread while the caller copies the last, so that the scan and
    the upserts overlap (a fifth faster here). Closing it waits for the read under way, then closes pages."""
    with ThreadPoolExecutor(1, thread_name_prefix="imgsearch-scan") as pool:
        coming = pool.submit(next, pages, None)
        try:
            while (page := coming.result()) is not None:
                coming = pool.submit(next, pages, None)
                yield page
        finally:
            wait([coming])
            pages.close()


def _copy_page(
    target: IndexClient,
    page: ScanPage,
    copied: set[str],
    batch: list[int],
    report: MigrateReport,
    patience_s: float,
    on_wait: Callable[[str], None] | None,
) -> None:
    """Upserts the page's items not yet copied, in pieces of batch[0]; halves batch[0] while the target
    refuses a piece as over its --max-batch."""
    assert page.vectors is not None
    rows = [n for n, item_id in enumerate(page.ids) if item_id not in copied]
    if len(rows) < len(page.ids):
        ids = [page.ids[n] for n in rows]
        vectors, metadata = page.vectors[rows], [page.metadata[n] for n in rows]
    else:
        ids, vectors, metadata = page.ids, page.vectors, page.metadata
    start = 0
    while start < len(ids):
        stop = start + batch[0]
        upsert = partial(target.upsert, ids[start:stop], vectors[start:stop], metadata[start:stop])
        try:
            patiently(partial(upsert, page.model_version), patience_s, on_wait)
        except ServiceError as error:
            if _over_limit(error) and batch[0] > 1:
                batch[0] = max(1, batch[0] // 2)
                continue
            raise _refused(error, target, page, len(copied)) from None
        copied.update(ids[start:stop])
        report.migrated = len(copied)
        report.dim = vectors.shape[1]
        start = stop


def _over_limit(error: ServiceError) -> bool:
    """Whether the index service refused a call as over its --max-batch."""
    return error.code == grpc.StatusCode.INVALID_ARGUMENT and _BATCH_LIMIT in error.details


def _refused(error: ServiceError, target: IndexClient, page: ScanPage, copied: int) -> Exception:
    """A target that refuses the vectors themselves (written to by someone else meanwhile) gets a clear
    MigrateRefused; any other failure is returned as it is."""
    if error.code == grpc.StatusCode.FAILED_PRECONDITION or (
        error.code == grpc.StatusCode.INVALID_ARGUMENT and "dim" in error.details
    ):
        assert page.vectors is not None
        return MigrateRefused(
            f"the target index at {target.address} refused vectors of model version "
            f"{page.model_version or '-'!r}, dim {page.vectors.shape[1]} ({error.details.split(';')[0]}) "
            f"after {plural(copied, 'item')} {'was' if copied == 1 else 'were'} copied; migrate into an "
            "empty index service"
        )
    return error
