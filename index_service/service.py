"""The index service assembled: a store (FAISS from the data dir, or a Milvus collection), its servicer,
a gRPC server."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgsearch.flags import Flag
from imgsearch.v1 import index_pb2
from imgsearch_server.handlers import add_servicer
from imgsearch_server.serving import GrpcServer, ServerSettings, server_settings, service_parser
from index_service import metrics
from index_service.durable import DataDirError, DataDirLocked, DurableStore
from index_service.servicer import IndexServicer
from index_service.store import Collections, StorageUnavailable

if TYPE_CHECKING:
    from index_service.milvus_store import MilvusCollections

log = logging.getLogger("index_service")

DEFAULT_PORT = 50052
BACKENDS = ("faiss", "milvus")
# What a read-only token may call.
READ_METHODS = ("Search", "SearchById", "Get", "Stats", "Scan", "ListCollections", "ListAliases")


@dataclass(frozen=True)
class IndexConfig:
    server: ServerSettings
    data_dir: Path
    max_k: int
    max_batch: int
    snapshot_every_ops: int
    snapshot_every_s: float
    backend: str = "faiss"
    milvus_uri: str = ""
    milvus_collection: str = "imgsearch"
    milvus_timeout_s: float = 10.0
    max_results: int = 100_000
    when_locked: str = "exit"
    max_collections: int = 1000
    max_duplicate_pairs: int = 5_000_000


INDEX_FLAGS = [
    Flag(
        "--backend",
        "where the vectors live: faiss (in this process, kept in --data-dir) or milvus (a Milvus "
        "collection; the service then keeps no state and scales by replicas)",
        "IMGSEARCH_INDEX_BACKEND",
        "faiss",
        choices=BACKENDS,
    ),
    Flag(
        "--milvus-uri",
        "with --backend milvus: a Milvus server (http://host:19530) or a Milvus Lite file in this "
        "process (./milvus.db)",
        "IMGSEARCH_MILVUS_URI",
        "",
    ),
    Flag(
        "--milvus-collection",
        "with --backend milvus: the prefix of its Milvus collections and aliases; the collection `default` "
        "is the Milvus collection of this name (as before collections), every other collection or alias "
        "NAME is PREFIX__NAME",
        "IMGSEARCH_MILVUS_COLLECTION",
        "imgsearch",
    ),
    Flag(
        "--milvus-timeout-s",
        "with --backend milvus: how long one Milvus call may take, retries included, before the "
        "request fails with UNAVAILABLE",
        "IMGSEARCH_MILVUS_TIMEOUT_S",
        10.0,
        float,
        shown_default="10",
    ),
    Flag(
        "--data-dir",
        "with --backend faiss: where the index is kept across restarts",
        "IMGSEARCH_DATA_DIR",
        Path("index-data"),
        Path,
        shown_default="./index-data",
    ),
    Flag(
        "--when-locked",
        "with --backend faiss, when another index process holds --data-dir (a second replica over "
        "one volume): exit with the reason, or wait, not listening, and serve once that process stops "
        "(a standby; what docker-compose.yml sets, so a second FAISS replica refuses without a restart loop)",
        "IMGSEARCH_INDEX_WHEN_LOCKED",
        "exit",
        choices=("exit", "wait"),
    ),
    Flag("--max-k", "largest k a search may ask for", "IMGSEARCH_MAX_K", 1000, int),
    Flag("--max-batch", "most ids or queries in one call", "IMGSEARCH_INDEX_MAX_BATCH", 10000, int),
    Flag(
        "--max-results",
        "most results one search may ask for, queries x k, refused before any work past it; a reply "
        "that could not fit in --max-message-bytes is refused too",
        "IMGSEARCH_INDEX_MAX_RESULTS",
        100_000,
        int,
    ),
    Flag(
        "--max-collections",
        "most collections one index holds, and most aliases: a CreateCollection or a new alias past it is "
        "refused with RESOURCE_EXHAUSTED",
        "IMGSEARCH_INDEX_MAX_COLLECTIONS",
        1000,
        int,
    ),
    Flag(
        "--max-duplicate-pairs",
        "most linked pairs one Duplicates call may find; a max_distance that links more is refused with "
        "RESOURCE_EXHAUSTED, as its answer would be unbounded",
        "IMGSEARCH_INDEX_MAX_DUPLICATE_PAIRS",
        5_000_000,
        int,
    ),
    Flag(
        "--snapshot-every-ops",
        "snapshot after this many logged writes",
        "IMGSEARCH_SNAPSHOT_EVERY_OPS",
        10000,
        int,
    ),
    Flag(
        "--snapshot-every-s",
        "snapshot this often when there were writes",
        "IMGSEARCH_SNAPSHOT_EVERY_S",
        300.0,
        float,
        shown_default="300",
    ),
]


def parse_config(argv: Sequence[str] | None = None) -> IndexConfig:
    """Returns the configuration from flags, each defaulting to an env var."""
    parser = service_parser(
        "python -m index_service",
        "The imgsearch index service (exact L2 k-NN over gRPC: FAISS in process, or Milvus).",
        env_prefix="IMGSEARCH_INDEX",
        default_port=DEFAULT_PORT,
        own=INDEX_FLAGS,
    )
    args = parser.parse_args(argv)
    if min(
        args.max_k, args.max_batch, args.max_results, args.max_collections, args.snapshot_every_ops
    ) < 1 or (args.snapshot_every_s <= 0):
        parser.error(
            "--max-k, --max-batch, --max-results, --max-collections, --max-duplicate-pairs, "
            "--snapshot-every-ops and --snapshot-every-s must be positive"
        )
    if args.milvus_timeout_s <= 0:
        parser.error("--milvus-timeout-s must be positive")
    if args.backend == "milvus" and not args.milvus_uri:
        parser.error("--backend milvus needs --milvus-uri (or IMGSEARCH_MILVUS_URI)")
    return IndexConfig(
        server_settings(args),
        args.data_dir,
        args.max_k,
        args.max_batch,
        args.snapshot_every_ops,
        args.snapshot_every_s,
        args.backend,
        args.milvus_uri,
        args.milvus_collection,
        args.milvus_timeout_s,
        args.max_results,
        args.when_locked,
        args.max_collections,
        args.max_duplicate_pairs,
    )


def open_service(config: IndexConfig, poll_s: float = 2.0) -> IndexService:
    """The service over its data dir. When another index process holds the dir: exits with the reason
    (--when-locked exit), or says so once and waits, listening on nothing, until the dir is free."""
    waiting = False
    while True:
        try:
            service = IndexService(config)
        except DataDirLocked as error:
            if config.when_locked == "exit":
                raise SystemExit(f"index_service: {error}") from error
            if not waiting:
                log.error(
                    "index_service: refusing to serve: %s. Waiting as a standby, listening on nothing: "
                    "this process serves once that one stops.",
                    error,
                )
                waiting = True
            time.sleep(poll_s)
            continue
        if waiting:
            log.info("index_service: the data dir is free now: serving")
        return service


class IndexService:
    """FAISS: recovers the data dir at start, serves, and on stop drains calls, snapshots and unlocks.
    Milvus: connects, serves, and on stop drains calls and closes the connection (no state here)."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        self.durable: DurableStore | None = None
        self.milvus: MilvusCollections | None = None
        if config.backend == "milvus":
            from index_service.milvus_store import (
                MilvusCollections,
            )  # pymilvus is imported only when asked for

            try:
                self.milvus = MilvusCollections(
                    config.milvus_uri,
                    config.milvus_collection,
                    max_k=config.max_k,
                    timeout_s=config.milvus_timeout_s,
                )
            except (ValueError, StorageUnavailable) as error:
                raise SystemExit(f"index_service: {error}") from error
            self.collections: Collections = self.milvus
        else:
            try:
                self.durable = DurableStore(
                    config.data_dir,
                    max_k=config.max_k,
                    snapshot_every_ops=config.snapshot_every_ops,
                    snapshot_every_s=config.snapshot_every_s,
                )
            except DataDirLocked:
                raise  # the caller chooses: exit, or wait as a standby (--when-locked)
            except (DataDirError, OSError) as error:
                raise SystemExit(f"index_service: {error}") from error
            self.collections = self.durable.catalog
        servicer = IndexServicer(
            self.collections,
            config.max_batch,
            config.server.max_message_bytes,
            config.max_results,
            config.max_collections,
            config.max_duplicate_pairs,
        )
        service = index_pb2.DESCRIPTOR.services_by_name["Index"]
        try:
            self.server = GrpcServer(
                config.server,
                [service.full_name],
                lambda server: add_servicer(server, servicer, service),
                read_methods=[f"/{service.full_name}/{name}" for name in READ_METHODS],
            )
        except BaseException:
            self._release(snapshot=False)
            raise
        # The vectors and bytes stored are read from the store at each scrape (for Milvus a remote call).
        upsert = f"/{service.full_name}/Upsert"
        metrics.watch_index(self.server.metrics, upsert, self.collections.total, config.backend)

    def start(self) -> int:
        try:
            port = self.server.start()
        except BaseException:
            self._release(snapshot=False)
            raise
        self.start_snapshots()
        return port

    def start_snapshots(self) -> None:
        """FAISS: starts the periodic snapshots. Milvus keeps its own data: nothing to do."""
        if self.durable is not None:
            self.durable.start_snapshots()

    def snapshot(self) -> None:
        """FAISS: a snapshot now. Milvus: nothing (it keeps its own data)."""
        if self.durable is not None:
            self.durable.snapshot()

    def close(self) -> None:
        """After the server stopped: FAISS: a last snapshot, then the data dir is released. Milvus: the
        connection is closed (and a Milvus Lite file's server stopped once no store uses it)."""
        self._release(snapshot=True)

    def _release(self, snapshot: bool) -> None:
        if self.durable is not None:
            self.durable.close(snapshot=snapshot)
        if self.milvus is not None:
            self.milvus.close()

    def stop(self, grace_s: float | None = None) -> None:
        """Drains in-flight calls, then snapshots and releases the data dir (or closes the connection)."""
        self.server.stop(grace_s)
        self.close()
