"""The gateway as an ASGI app: `create_app(settings)` puts the page, the API, /metrics and /healthz together
with the error handling, the upload limit, the read token (web/readtoken.py, when one is set), the metrics
middleware, the request log and request ids (web/requestlog.py) and the security headers.

No `from __future__ import annotations`: FastAPI reads the annotations of the routes here (web/deps.py)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsearch.client import ImageSearch, ServiceError
from web import api, media
from web.asgi import HttpMiddleware
from web.connections import BodyDeadline
from web.deps import MetricsDep, SearchDep, SettingsDep
from web.errors import http_error
from web.labels import LabelCache
from web.limits import BodyLimit
from web.metrics import GatewayMetrics, MetricsMiddleware
from web.nearness import ModelCards
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


class SecurityHeaders(HttpMiddleware):
    """Adds SECURITY_HEADERS to every HTTP response (an ASGI middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:

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


async def service_failed(request: Request, error: ServiceError) -> JSONResponse:
    status, message = http_error(error)
    body = {"detail": message, "service": error.service, "request_id": request_id_of(request.scope)}
    return JSONResponse(body, status_code=status)


async def no_image(_request: Request, error: media.NoImage) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _validation_message(error)}, status_code=422)


async def http_failed(_request: Request, error: StarletteHTTPException) -> Response:
    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


# Every error as {"detail": ...}: FastAPI's own 422 body is a list of pydantic errors.
EXCEPTION_HANDLERS: dict[int | type[Exception], Any] = {
    ServiceError: service_failed,
    media.NoImage: no_image,
    RequestValidationError: invalid,
    StarletteHTTPException: http_failed,
}

# Beside the API, out of its OpenAPI document: the page, the probes' health and Prometheus' metrics.
site = APIRouter(include_in_schema=False)


@site.api_route("/", methods=["GET", "HEAD"])
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@site.api_route("/healthz", methods=["GET", "HEAD"])
def healthz(settings: SettingsDep, search: SearchDep) -> JSONResponse:
    found = api.health(search, api.health_timeout_s(settings))
    return JSONResponse(found.model_dump(), status_code=200 if found.ok else 503)


@site.get("/metrics")
def prometheus(metrics: MetricsDep) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


@asynccontextmanager
async def closing_search(app: FastAPI) -> AsyncIterator[None]:
    """The lifespan: the client's channels close with the app."""
    yield
    app.state.search.close()


class GatewayApp(FastAPI):
    """FastAPI, with the app's own k limits in its OpenAPI document (web/api.py: `document_limits`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = api.document_limits(super().openapi(), self.state.settings)
        return self.openapi_schema


def connect(settings: Settings) -> ImageSearch:
    """The client of both services, as the settings name them."""
    return ImageSearch(
        settings.encoder,
        settings.index,
        settings.timeout_s,
        tls_ca=settings.tls_ca,
        token=settings.token.value if settings.token else None,
        collection=settings.collection,
    )


def create_app(settings: Settings, search: ImageSearch | None = None) -> FastAPI:
    """The gateway for these settings. `search` (closed with the app) defaults to one made from them."""
    app = GatewayApp(
        title="imgsearch web gateway",
        summary="Similar-image search over the encoder and index services",
        version="0.1.0",
        openapi_url="/api/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load from a CDN: the page must work offline
        redoc_url=None,
        lifespan=closing_search,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    # What the routes reach through web/deps.py: set once, here.
    app.state.settings = settings
    app.state.search = connect(settings) if search is None else search
    app.state.metrics = GatewayMetrics()
    app.state.labels = LabelCache()
    app.state.cards = ModelCards()
    app.include_router(api.router)
    app.include_router(site)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_middleware(app, settings)
    return app


def add_middleware(app: FastAPI, settings: Settings) -> None:
    """The middlewares, innermost first: each one added wraps those before it."""
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
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # it times everything
    app.add_middleware(RequestLog)  # outermost of ours: the request id, and a log line for every answer
