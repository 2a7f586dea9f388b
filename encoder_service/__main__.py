"""`python -m encoder_service`: run the encoder service until SIGTERM or SIGINT."""

from __future__ import annotations

import logging

from encoder_service.preprocess import quiet_pillow_warnings
from encoder_service.service import EncoderService, parse_config
from imgsearch_server.serving import configure_logging, describe, run_until_signal

log = logging.getLogger("encoder_service")


def main() -> None:
    config = parse_config()
    configure_logging(config.server.log_format, config.server.log_level)
    quiet_pillow_warnings()
    log.info("encoder_service starting with %s", describe(config))
    service = EncoderService(config)
    run_until_signal(service.server, "encoder_service")


if __name__ == "__main__":
    main()
