"""`python -m index_service`: run the index service until SIGTERM or SIGINT."""

from __future__ import annotations

import logging

from imgsearch_server.serving import configure_logging, describe, run_until_signal
from index_service.service import IndexService, parse_config

log = logging.getLogger("index_service")


def main() -> None:
    config = parse_config()
    configure_logging(config.server.log_format, config.server.log_level)
    log.info("index_service starting with %s", describe(config))
    service = IndexService(config)
    service.start_snapshots()  # FAISS only; a Milvus backend keeps its own data
    run_until_signal(service.server, "index_service", on_stopped=service.close)


if __name__ == "__main__":
    main()
