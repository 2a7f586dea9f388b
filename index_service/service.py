"""The index service assembled: a store loaded from the data dir, its servicer, a gRPC server."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgsearch.serving import GrpcServer, ServerSettings, add_server_flags, env_or, server_settings
from imgsearch.v1 import index_pb2, index_pb2_grpc
from index_service.servicer import IndexServicer
from index_service.snapshot import SnapshotError, read_snapshot, write_snapshot
from index_service.store import VectorStore

log = logging.getLogger("index_service")

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class IndexConfig:
    server: ServerSettings
    data_dir: Path
    max_k: int
    max_batch: int


def parse_config(argv: Sequence[str] | None = None) -> IndexConfig:
    """Returns the configuration from flags, each defaulting to an env var."""
    parser = argparse.ArgumentParser(
        prog="python -m index_service", description="The imgsearch index service (FAISS exact L2 over gRPC)."
    )
    add_server_flags(parser, env_prefix="IMGSEARCH_INDEX", default_port=DEFAULT_PORT)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=env_or("IMGSEARCH_DATA_DIR", "index-data"),
        help="where the index is kept across restarts (env IMGSEARCH_DATA_DIR, default ./index-data)",
    )
    parser.add_argument(
        "--max-k",
        type=int,
        default=env_or("IMGSEARCH_MAX_K", 1000),
        help="largest k a search may ask for (env IMGSEARCH_MAX_K, default 1000)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=env_or("IMGSEARCH_INDEX_MAX_BATCH", 10000),
        help="most ids or queries in one call (env IMGSEARCH_INDEX_MAX_BATCH, default 10000)",
    )
    args = parser.parse_args(argv)
    if args.max_k < 1 or args.max_batch < 1:
        parser.error("--max-k and --max-batch must be at least 1")
    return IndexConfig(server_settings(args), args.data_dir, args.max_k, args.max_batch)


class IndexService:
    """Loads the newest snapshot at start, serves, and writes a snapshot when stopped."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        started = time.monotonic()
        try:
            state = read_snapshot(config.data_dir)
        except (SnapshotError, OSError) as error:
            raise SystemExit(f"index_service: cannot load the index: {error}") from error
        self.store = VectorStore(state, max_k=config.max_k)
        stats = self.store.stats()
        log.info(
            "loaded %d vectors of dim %d (model %r) from %s in %.3f s",
            stats.count,
            stats.dim,
            stats.model_version,
            config.data_dir,
            time.monotonic() - started,
        )
        servicer = IndexServicer(self.store, config.max_batch)
        self.server = GrpcServer(
            config.server,
            [index_pb2.DESCRIPTOR.services_by_name["Index"].full_name],
            lambda server: index_pb2_grpc.add_IndexServicer_to_server(servicer, server),
        )

    def start(self) -> int:
        return self.server.start()

    def snapshot(self) -> None:
        started = time.monotonic()
        path = write_snapshot(self.store.state(), self.config.data_dir)
        log.info(
            "snapshot of %d vectors written to %s in %.3f s",
            self.store.stats().count,
            path,
            time.monotonic() - started,
        )

    def stop(self, grace_s: float | None = None) -> None:
        """Drains in-flight calls, then snapshots, so every acknowledged write is in the snapshot."""
        self.server.stop(grace_s)
        self.snapshot()
