"""`python -m web` / `imgsearch web`: the gateway on uvicorn, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imgsearch_server.serving import configure_logging
from web.settings import Settings, parse_settings

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

log = logging.getLogger("web")
# Libraries that log every chunk they parse at DEBUG (PNG chunks, multipart parts): kept at INFO, so that
# --log-level debug shows the gateway's own lines, one per request.
CHATTY = ("PIL", "python_multipart", "multipart")


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How the gateway runs on uvicorn (uvicorn.run's and uvicorn.Config's keywords): its own logging and
    request log, no Server header, no proxy headers trusted, and the connection limits of
    web/connections.py: the request head and idle keep-alive connections timed, at most
    --max-connections connections or requests at once."""
    from web.connections import ConnectionTimeouts, timed_protocol

    timeouts = ConnectionTimeouts(
        keep_alive_s=settings.keep_alive_timeout_s,
        header_s=settings.header_timeout_s,
        body_s=settings.body_timeout_s,
    )
    return {
        "host": settings.host,
        "port": settings.port,
        "http": timed_protocol(timeouts),
        "timeout_keep_alive": math.ceil(settings.keep_alive_timeout_s),  # the protocol keeps the exact value
        "limit_concurrency": settings.max_connections,
        "lifespan": "on",
        "log_level": settings.log_level,
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
    }


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The uvicorn.Config `main` runs the app on, for a uvicorn.Server of one's own (the tests)."""
    import uvicorn

    return uvicorn.Config(app, **uvicorn_options(settings))


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
    uvicorn.run(app, **uvicorn_options(settings))
    return 0


def imgsearch_web(argv: Sequence[str] | None = None) -> int:
    """`imgsearch web ...`: the gateway under the CLI's name."""
    return main(argv, prog="imgsearch web")


if __name__ == "__main__":
    sys.exit(main())
