"""The JSON API under /api/: search by upload or by id, items, thumbnails, stats, health, config.

Every route goes through the client's Python API (`ImageSearch`, its `encoder` and `index`); a failed
call becomes an HTTP error in web/app.py (web/errors.py says which).

No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and those built in
`build_router` (the limits from the settings) must be evaluated where they are defined."""

from typing import Annotated
from urllib.parse import quote

import grpc
from fastapi import APIRouter, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field

from imgsearch import security
from imgsearch.client import BadImage, EncoderClient, ImageSearch, IndexClient, Match, ServiceError
from web import media
from web.errors import http_error
from web.limits import too_large_message
from web.settings import Settings

DEFAULT_K = 10
HEALTH_TIMEOUT_S = 2.0
THUMBNAIL_CACHE = "max-age=300"  # a stored item's image rarely changes; the ETag catches it when it does
GUARDED_THUMBNAIL_CACHE = "private, max-age=300"  # behind a read token: the browser may keep it, no proxy


class Error(BaseModel):
    detail: str = Field(description="what went wrong, in one line")
    service: str | None = Field(default=None, description="the service that failed, when one did")
    request_id: str | None = Field(
        default=None,
        description="when a service failed: the request's id (also in the X-Request-Id header), for the logs",
    )


METADATA = (
    "the item's metadata as stored, less `source` (the image's path on the machine that indexed it) unless "
    "the gateway runs with --show-source"
)


class Result(BaseModel):
    id: str
    distance: float = Field(description="Euclidean distance to the query, smallest first")
    metadata: dict[str, str] = Field(description=METADATA)
    thumbnail_url: str | None = Field(description="the stored image, downscaled; null when none is served")


class ModelView(BaseModel):
    """An image as the model sees it: PNG data URLs of 28x28 grayscale images."""

    input: str | None = Field(description="the preprocessed image, the model's input")
    reconstruction: str | None = Field(description="the autoencoder's reconstruction from the embedding")
    note: str | None = Field(default=None, description="why there is no view, when there is none")


class UploadSearch(BaseModel):
    k: int
    query: ModelView
    results: list[Result]


class IdQuery(BaseModel):
    id: str


class IdSearch(BaseModel):
    k: int
    query: IdQuery
    results: list[Result]


class Item(BaseModel):
    id: str
    metadata: dict[str, str] = Field(description=METADATA)
    thumbnail_url: str | None
    view: ModelView


class Stats(BaseModel):
    count: int
    dim: int
    model_version: str
    bytes_used: int


class ServiceHealth(BaseModel):
    address: str
    ok: bool
    detail: str


class Health(BaseModel):
    ok: bool
    encoder: ServiceHealth
    index: ServiceHealth


class Config(BaseModel):
    max_upload_bytes: int
    max_k: int
    default_k: int
    thumbnails: bool = Field(description="whether a media root is configured")
    indexing: bool = Field(description="whether POST /api/items is open (with the token)")


class Added(BaseModel):
    id: str
    count: int = Field(description="items in the index after the upsert")


def _errors(*codes: int) -> dict[int | str, dict[str, object]]:
    return {code: {"model": Error} for code in codes}


def thumbnail_url(settings: Settings, item_id: str, metadata: dict[str, str]) -> str | None:
    if settings.media_root is None or not metadata.get(media.SOURCE_KEY):
        return None
    return f"/api/thumbnail?id={quote(item_id, safe='')}"


def shown(settings: Settings, metadata: dict[str, str]) -> dict[str, str]:
    """The metadata a reply may hold: `source` is a path on the indexing machine (user names, folder
    layout), which the page never needs, since thumbnails go by id; only --show-source returns it."""
    if settings.show_source:
        return metadata
    return {key: value for key, value in metadata.items() if key != media.SOURCE_KEY}


def results(settings: Settings, matches: list[Match]) -> list[Result]:
    return [
        Result(
            id=m.id,
            distance=m.distance,
            metadata=shown(settings, m.metadata),
            thumbnail_url=thumbnail_url(settings, m.id, m.metadata),
        )
        for m in matches
    ]


def model_view(search: ImageSearch, image: bytes) -> ModelView:
    """The image's preprocessed input and reconstruction from the encoder (Reconstruct); a note instead
    when the encoder cannot give them (a model without a decoder, an older encoder, a bad stored file)."""
    try:
        [view] = search.encoder.reconstruct([image])
    except BadImage as error:
        _, message = http_error(error)
        return ModelView(input=None, reconstruction=None, note=message)
    except ServiceError as error:
        return ModelView(input=None, reconstruction=None, note=str(error))
    return ModelView(
        input=media.png_data_url(view.input), reconstruction=media.png_data_url(view.output), note=None
    )


def read_upload(file: UploadFile, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, too_large_message(limit))
    if not data:
        raise HTTPException(400, "the upload is empty: send an image file")
    return data


def service_health(client: EncoderClient | IndexClient, timeout_s: float) -> ServiceHealth:
    """The service's gRPC health (grpc.health.v1, which needs no token), over the client's own channel."""
    name, address = client.service, client.address
    try:
        reply = health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s
        )
    except grpc.RpcError as error:
        text = str(ServiceError(name, address, error.code(), error.details() or ""))
        return ServiceHealth(address=address, ok=False, detail=text)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
    return ServiceHealth(
        address=address, ok=ok, detail="serving" if ok else f"the {name} service at {address} is {status}"
    )


def health(search: ImageSearch, timeout_s: float) -> Health:
    encoder = service_health(search.encoder, timeout_s)
    index = service_health(search.index, timeout_s)
    return Health(ok=encoder.ok and index.ok, encoder=encoder, index=index)


def build_router(settings: Settings, search: ImageSearch) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["api"])
    health_timeout_s = min(HEALTH_TIMEOUT_S, settings.timeout_s)
    default_k = min(DEFAULT_K, settings.max_k)
    K = Annotated[int, Query(ge=1, le=settings.max_k, description="results wanted")]
    FormK = Annotated[int, Form(ge=1, le=settings.max_k, description="results wanted")]
    ItemId = Annotated[str, Query(min_length=1, description="a stored id (ids may hold any character)")]
    thumbnail_cache = GUARDED_THUMBNAIL_CACHE if settings.read_token else THUMBNAIL_CACHE

    def stored(item_id: str) -> tuple[str, dict[str, str]]:
        items, _ = search.index.get([item_id])
        if not items:
            raise HTTPException(404, f"no item with id {item_id!r}")
        return items[0].id, items[0].metadata

    @router.post(
        "/search",
        response_model=UploadSearch,
        summary="Search by an uploaded image",
        responses=_errors(400, 413, 503),
    )
    def search_upload(
        file: Annotated[UploadFile, File(description="an image: PNG, JPEG, BMP, GIF, WebP or TIFF")],
        k: FormK = default_k,
    ) -> UploadSearch:
        image = read_upload(file, settings.max_upload_bytes)
        [matches] = search.search([image], k)  # a bad image fails here: 400 with the encoder's reason
        return UploadSearch(k=k, query=model_view(search, image), results=results(settings, matches))

    @router.get(
        "/search",
        response_model=IdSearch,
        summary="More like a stored item (SearchById; the item itself is left out)",
        responses=_errors(404, 503),
    )
    def search_by_id(id: ItemId, k: K = default_k) -> IdSearch:
        [matches] = search.search_by_id([id], k)
        return IdSearch(k=k, query=IdQuery(id=id), results=results(settings, matches))

    @router.get(
        "/items",
        response_model=Item,
        summary="A stored item, with its image as the model sees it",
        responses=_errors(404, 503),
    )
    def get_item(id: ItemId) -> Item:
        item_id, metadata = stored(id)
        try:
            image = media.read_source(settings.media_root, metadata.get(media.SOURCE_KEY))
        except media.NoImage as missing:
            view = ModelView(input=None, reconstruction=None, note=str(missing))
        else:
            view = model_view(search, image)
        return Item(
            id=item_id,
            metadata=shown(settings, metadata),
            thumbnail_url=thumbnail_url(settings, item_id, metadata),
            view=view,
        )

    @router.post(
        "/items",
        response_model=Added,
        status_code=201,
        summary="Add an uploaded image to the index (only with --allow-indexing and the token)",
        responses=_errors(400, 401, 403, 413, 503),
    )
    def add_item(
        file: Annotated[UploadFile, File(description="the image to embed and store")],
        id: Annotated[str, Form(min_length=1, description="the id to store it under")],
        label: Annotated[str, Form(description="the metadata `label`")] = "",
        authorization: Annotated[str | None, Header(description="Bearer TOKEN")] = None,
    ) -> Added:
        if not settings.allow_indexing or settings.token is None:
            raise HTTPException(
                403, "this gateway is read-only (start it with --allow-indexing to add images)"
            )
        problem = security.BearerTokenInterceptor(settings.token.value).check(
            [(security.AUTH_KEY, authorization or "")]
        )
        if problem is not None:
            raise HTTPException(
                401, f"{problem}: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"}
            )
        image = read_upload(file, settings.max_upload_bytes)
        count = search.add([id], [image], [{"label": label}] if label else [{}])
        return Added(id=id, count=count)

    @router.get(
        "/thumbnail",
        summary="A stored item's image, downscaled (PNG)",
        responses={200: {"content": {"image/png": {}}}, **_errors(404, 503)},
        response_class=Response,
    )
    def get_thumbnail(
        request: Request,
        id: ItemId,
        size: Annotated[int, Query(ge=media.THUMBNAIL_SIZES[0], le=media.THUMBNAIL_SIZES[1])] = (
            media.DEFAULT_THUMBNAIL_SIZE
        ),
    ) -> Response:
        _, metadata = stored(id)
        path = media.resolve_source(settings.media_root, metadata.get(media.SOURCE_KEY))
        data, etag = media.thumbnail(path, size)
        headers = {"ETag": etag, "Cache-Control": thumbnail_cache}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/png", headers=headers)

    @router.get("/stats", response_model=Stats, summary="The collection: count, dim, model version")
    def stats() -> Stats:
        found = search.index.stats()
        return Stats(
            count=found.count, dim=found.dim, model_version=found.model_version, bytes_used=found.bytes_used
        )

    @router.get(
        "/health",
        response_model=Health,
        summary="Both services' gRPC health; 503 when either is not serving",
        responses={503: {"model": Health}},
    )
    def get_health(response: Response) -> Health:
        found = health(search, health_timeout_s)
        if not found.ok:
            response.status_code = 503
        return found

    @router.get("/config", response_model=Config, summary="What the page needs to know of this gateway")
    def config() -> Config:
        return Config(
            max_upload_bytes=settings.max_upload_bytes,
            max_k=settings.max_k,
            default_k=default_k,
            thumbnails=settings.media_root is not None,
            indexing=settings.allow_indexing,
        )

    return router
