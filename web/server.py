"""`python -m web` / `imgsearch web`: the gateway on uvicorn, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from imgsearch.serving import configure_logging
from web.settings import parse_settings

log = logging.getLogger("web")
# Libraries that log every chunk they parse at DEBUG (PNG chunks, multipart parts): kept at INFO, so that
# --log-level debug shows the gateway's own lines, one per request.
CHATTY = ("PIL", "python_multipart", "multipart")


def main(argv: Sequence[str] | None = None, prog: str = "python -m web") -> int:
    settings = parse_settings(argv, prog)
    try:
        import uvicorn

        from web.app import create_app
    except ImportError as error:  # FastAPI and uvicorn come with the [web] extra only
        print(f"{prog}: {error}; the gateway needs pip install 'imgsearch[web]'", file=sys.stderr)
        return 2

    # The services' handler and formats (text, or JSON with the request log's fields as keys) for every
    # logger, uvicorn's included: no log_config of uvicorn's own, and no access log, which the request log
    # (web/requestlog.py, logger web.requests, DEBUG) replaces.
    configure_logging(settings.log_format, settings.log_level.upper())
    for name in CHATTY:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    app = create_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("imgsearch web gateway on http://%s:%d: %s", host, settings.port, settings.summary())
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
