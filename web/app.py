"""The gateway as an ASGI app: `create_app(settings)` puts the page, the API, /metrics and /healthz together
with the error handling, the upload limit, the read token (web/readtoken.py, when one is set), the metrics
middleware, the request log and request ids (web/requestlog.py) and the security headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsearch.client import ImageSearch, ServiceError
from web import api, media
from web.connections import BodyDeadline
from web.errors import http_error
from web.limits import BodyLimit
from web.metrics import GatewayMetrics, MetricsMiddleware
from web.readtoken import ReadTokenGate
from web.requestlog import RequestLog, request_id_of
from web.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields beside the file

# No inline script or style, nothing from elsewhere: a stored id or label that got into the DOM as markup
# still could not run. data: and blob: for the model's views and the local preview of an upload.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response (an ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{where}: {problem.get('msg', 'invalid')}" if where else str(problem.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(settings: Settings, search: ImageSearch | None = None) -> FastAPI:
    """The gateway for these settings. `search` (closed with the app) defaults to one made from them."""
    if search is None:
        search = ImageSearch(
            settings.encoder,
            settings.index,
            settings.timeout_s,
            tls_ca=settings.tls_ca,
            token=settings.token.value if settings.token else None,
        )
    client = search

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(
        title="imgsearch web gateway",
        summary="Similar-image search over the encoder and index services",
        version="0.1.0",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: the page must work offline
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.search = search
    metrics = GatewayMetrics()
    app.state.metrics = metrics

    @app.exception_handler(ServiceError)
    async def service_failed(request: Request, error: ServiceError) -> JSONResponse:
        status, message = http_error(error)
        body = {"detail": message, "service": error.service, "request_id": request_id_of(request.scope)}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(media.NoImage)
    async def no_image(_request: Request, error: media.NoImage) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(error)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_failed(_request: Request, error: StarletteHTTPException) -> Response:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    app.include_router(api.build_router(settings, search))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.api_route("/healthz", methods=["GET", "HEAD"], include_in_schema=False)
    def healthz() -> JSONResponse:
        found = api.health(client, min(api.HEALTH_TIMEOUT_S, settings.timeout_s))
        return JSONResponse(found.model_dump(), status_code=200 if found.ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    app.add_middleware(
        BodyLimit,
        max_body_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        limit=settings.max_upload_bytes,
    )
    if settings.read_token is not None:
        # Before the body limit: a request without the token is refused before its body is read. The
        # indexing token reads too, so POST /api/items needs only the one header.
        tokens = [settings.read_token.value]
        if settings.allow_indexing and settings.token is not None:
            tokens.append(settings.token.value)
        app.add_middleware(ReadTokenGate, tokens=tokens)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # it times everything
    app.add_middleware(RequestLog)  # outermost of ours: the request id, and a log line for every answer
    return app
