"""`python -m index_service`: run the index service until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import sys

from imgsearch_server.memory import limit_arenas
from imgsearch_server.serving import configure_logging, describe, run_until_signal
from index_service.service import open_service, parse_config

log = logging.getLogger("index_service")


def main() -> None:
    limit_arenas()  # before any server thread: each thread's arena would keep its own freed buffers
    config = parse_config()
    configure_logging(config.server.log_format, config.server.log_level)
    log.info("index_service starting with %s", describe(config))
    # Until run_until_signal takes over: SIGTERM ends a standby at once (in a container it is pid 1,
    # which the kernel would not stop for an unhandled SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = open_service(config)
    service.start_snapshots()  # FAISS only; a Milvus backend keeps its own data
    run_until_signal(service.server, "index_service", on_stopped=service.close)


if __name__ == "__main__":
    main()
