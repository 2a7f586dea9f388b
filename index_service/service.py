"""The index service assembled: a store loaded from the data dir, its servicer, a gRPC server."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgsearch.handlers import add_servicer
from imgsearch.serving import GrpcServer, ServerSettings, add_server_flags, env_or, server_settings
from imgsearch.v1 import index_pb2
from index_service.durable import DataDirError, DurableStore
from index_service.servicer import IndexServicer

log = logging.getLogger("index_service")

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class IndexConfig:
    server: ServerSettings
    data_dir: Path
    max_k: int
    max_batch: int
    snapshot_every_ops: int
    snapshot_every_s: float


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
    parser.add_argument(
        "--snapshot-every-ops",
        type=int,
        default=env_or("IMGSEARCH_SNAPSHOT_EVERY_OPS", 10000),
        help="snapshot after this many logged writes (env IMGSEARCH_SNAPSHOT_EVERY_OPS, default 10000)",
    )
    parser.add_argument(
        "--snapshot-every-s",
        type=float,
        default=env_or("IMGSEARCH_SNAPSHOT_EVERY_S", 300.0),
        help="snapshot this often when there were writes (env IMGSEARCH_SNAPSHOT_EVERY_S, default 300)",
    )
    args = parser.parse_args(argv)
    if min(args.max_k, args.max_batch, args.snapshot_every_ops) < 1 or args.snapshot_every_s <= 0:
        parser.error("--max-k, --max-batch, --snapshot-every-ops and --snapshot-every-s must be positive")
    return IndexConfig(
        server_settings(args),
        args.data_dir,
        args.max_k,
        args.max_batch,
        args.snapshot_every_ops,
        args.snapshot_every_s,
    )


class IndexService:
    """Recovers the data dir at start, serves, and on stop drains calls, snapshots and unlocks."""

    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        try:
            self.durable = DurableStore(
                config.data_dir,
                max_k=config.max_k,
                snapshot_every_ops=config.snapshot_every_ops,
                snapshot_every_s=config.snapshot_every_s,
            )
        except (DataDirError, OSError) as error:
            raise SystemExit(f"index_service: {error}") from error
        self.store = self.durable.store
        servicer = IndexServicer(self.store, config.max_batch, config.server.max_message_bytes)
        service = index_pb2.DESCRIPTOR.services_by_name["Index"]
        try:
            self.server = GrpcServer(
                config.server, [service.full_name], lambda server: add_servicer(server, servicer, service)
            )
        except BaseException:
            self.durable.close(snapshot=False)
            raise

    def start(self) -> int:
        try:
            port = self.server.start()
        except BaseException:
            self.durable.close(snapshot=False)
            raise
        self.durable.start_snapshots()
        return port

    def snapshot(self) -> None:
        self.durable.snapshot()

    def close(self) -> None:
        """After the server stopped: a last snapshot, then the data dir is released."""
        self.durable.close()

    def stop(self, grace_s: float | None = None) -> None:
        """Drains in-flight calls, then snapshots and releases the data dir."""
        self.server.stop(grace_s)
        self.close()
