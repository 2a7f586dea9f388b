"""The JSON API under /api/: search by upload or by id, items, thumbnails, stats, collections, labels,
health, config.

The data routes take a `collection` (a collection or an alias of the index service; empty or left out: the
gateway's --collection) and answer with the collection that answered, an alias resolved. An image is
embedded, and shown as the model sees it, by the model that fills that collection.

Both searches take a metadata filter (`label`, `filter`: web/labels.py) and a `max_distance`, and say when
nothing is close to the query, and when the query looks unlike the model's training data (its novelty,
and each result's from its metadata: web/nearness.py); /api/labels lists a collection's labels for a
picker.

`router` is module-level and shared by every app; each route reaches its app's settings and client
through the dependencies in web/deps.py. Every route goes through the client's Python API (`ImageSearch`,
its `encoder` and `index`); a failed call becomes an HTTP error in web/app.py (web/errors.py says which).

One limit differs per app and so is no part of a signature: k's bound, --max-k, and its default.
`limited_k` enforces them and `document_limits` writes them into the app's OpenAPI document, as a bound in
the signature would have. No `from __future__ import annotations`: FastAPI reads the annotations."""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import grpc
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field

from imgsearch.client import (
    BadImage,
    EncoderClient,
    ImageSearch,
    IndexClient,
    Match,
    ModelNotServed,
    ServiceError,
    Target,
)
from imgsearch.filters import Condition
from web import labels as label_filter
from web import media, nearness
from web.deps import CardsDep, LabelsDep, MediaRoot, SearchDep, SettingsDep, require_indexing_token
from web.errors import http_error
from web.limits import too_large_message
from web.settings import Settings

DEFAULT_K = 10
HEALTH_TIMEOUT_S = 2.0
THUMBNAIL_CACHE = "max-age=300"  # a stored item's image rarely changes; the ETag catches it when it does
GUARDED_THUMBNAIL_CACHE = "private, max-age=300"  # behind a read token: the browser may keep it, no proxy
K_NOT_SENT = 0  # k's default in the signatures, read as "the gateway's default"; a 0 sent fails ge=1
# A collection's name is at most 64 characters, which the index checks with the rest of its rules; one past
# this the gateway refuses itself (422), without asking the index.
MAX_COLLECTION_CHARS = 256
COLLECTION_HELP = (
    "a collection or an alias of the index service; empty or left out: the gateway's default (--collection)"
)
ANSWERED = "the collection that answered (an alias resolved)"
MODEL = "the encoder model that fills the collection; empty: the encoder's default"
LABEL_HELP = (
    "keep only items whose metadata `label` is one of these: repeat the parameter for each label (a value "
    "is taken whole, commas and all; an empty one is ignored); ANDed with `filter`"
)
FILTER_HELP = (
    "a metadata condition in the CLI's --filter syntax: KEY=VALUE (the key is VALUE; the same key twice: "
    "any of the values), KEY!=VALUE (the key is not VALUE, or missing), KEY^=PREFIX (the key starts with "
    "PREFIX); repeatable, ANDed; 400 naming one that cannot be read or that the index refuses"
)
MAX_DISTANCE_HELP = "leave out results farther than this from the query (a number, 0 or more)"
FILTERED = "the filter applied, its conditions ANDed (`label` as one any_of on `label`); empty: none"
NOTHING_CLOSE = (
    "whether even the nearest result is farther than nothing_close_distance: the query is likely unlike "
    "anything stored"
)
NOTICE = "when nothing_close: a line saying so, for the page; else null"
NOVELTY = (
    "how unlike the model's training data the query looks: its reconstruction error over the 99th "
    "percentile of held-out training images' (above 1: unlike it); null when the model gives none"
)
NOVEL = "whether novelty is above 1: the query looks unlike what the model was trained on"
NOVELTY_NOTICE = "when novel: a line saying so, for the page; else null"
RESULT_NOVELTY = (
    "the item's novelty by the model that indexed it (its metadata `novelty`); above 1: unlike the "
    "model's training data; null when it has none"
)
DUPLICATE = "the model's duplicate distance (its card's `duplicate_distance`); null when the card has none"
NOTHING_CLOSE_DISTANCE = (
    f"duplicate_distance times the card's `nothing_close_factor` ({nearness.DEFAULT_NOTHING_CLOSE_FACTOR:g} "
    "when it has none); null when the card has no duplicate distance"
)


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
    novelty: float | None = Field(default=None, description=RESULT_NOVELTY)


class ModelView(BaseModel):
    """An image as the model sees it: PNG data URLs at the model's input size (grayscale for a digits
    model, 28x28; RGB for a colour `photo` model, its input shape's height and width)."""

    input: str | None = Field(
        description="the preprocessed image, the model's input: a PNG data URL at the model's input size, "
        "grayscale or RGB as the model takes it"
    )
    reconstruction: str | None = Field(
        description="the autoencoder's reconstruction from the embedding: a PNG data URL of the input's size "
        "and colour"
    )
    note: str | None = Field(default=None, description="why there is no view, when there is none")


class FilterCondition(BaseModel):
    key: str
    op: str = Field(description="equals, not_equals, any_of, none_of, prefix or exists")
    values: list[str]


class SearchReply(BaseModel):
    """What both searches answer besides their query: the results and how they were chosen."""

    k: int
    collection: str = Field(description=ANSWERED)
    model: str = Field(description=MODEL)
    results: list[Result]
    filter: list[FilterCondition] = Field(description=FILTERED)
    max_distance: float | None = Field(description="as sent; null: none")
    nothing_close: bool = Field(description=NOTHING_CLOSE)
    notice: str | None = Field(description=NOTICE)
    duplicate_distance: float | None = Field(description=DUPLICATE)
    nothing_close_distance: float | None = Field(description=NOTHING_CLOSE_DISTANCE)
    novelty: float | None = Field(default=None, description=NOVELTY)
    novel: bool = Field(default=False, description=NOVEL)
    novelty_notice: str | None = Field(default=None, description=NOVELTY_NOTICE)


class UploadSearch(SearchReply):
    query: ModelView


class IdQuery(BaseModel):
    id: str


class IdSearch(SearchReply):
    query: IdQuery


class Item(BaseModel):
    id: str
    collection: str = Field(description="the collection it is stored in (an alias resolved)")
    metadata: dict[str, str] = Field(description=METADATA)
    thumbnail_url: str | None
    view: ModelView


class Stats(BaseModel):
    collection: str = Field(description=ANSWERED)
    model_name: str = Field(description=MODEL)
    count: int
    dim: int
    model_version: str
    bytes_used: int


class CollectionEntry(BaseModel):
    name: str
    count: int
    dim: int = Field(description="0 until the first vector is stored")
    model_name: str = Field(description=MODEL)
    model_version: str
    bytes_used: int
    aliases: list[str] = Field(description="the aliases pointing at it")


class Collections(BaseModel):
    default: str = Field(description="the gateway's default (--collection): a collection or an alias")
    collections: list[CollectionEntry] = Field(description="every collection, by name")
    aliases: dict[str, str] = Field(description="every alias and the collection it points at, by alias")


class Labels(BaseModel):
    collection: str = Field(description=ANSWERED)
    key: str = Field(description="the metadata key the labels are of, which the `label` filter tests")
    labels: list[str] = Field(
        description=f"the distinct labels of the sample, its {label_filter.SHOWN_LABELS} most frequent at "
        "most, in natural order (2 before 10)"
    )
    distinct: int = Field(description="distinct labels in the sample: more than listed when some were cut")
    sampled: int = Field(
        description=f"the items read: the collection's first {label_filter.SAMPLE_ITEMS:,} at most"
    )
    count: int = Field(description="the collection's items")
    complete: bool = Field(description="whether the sample read every item (then no label is missing)")


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


K = Annotated[int, Query(ge=1, description="results wanted")]
FormK = Annotated[int, Form(ge=1, description="results wanted")]
ItemId = Annotated[str, Query(min_length=1, description="a stored id (ids may hold any character)")]
ThumbnailSize = Annotated[int, Query(ge=media.THUMBNAIL_SIZES[0], le=media.THUMBNAIL_SIZES[1])]
CollectionName = Annotated[str, Query(max_length=MAX_COLLECTION_CHARS, description=COLLECTION_HELP)]
FormCollection = Annotated[str, Form(max_length=MAX_COLLECTION_CHARS, description=COLLECTION_HELP)]
LabelValues = Annotated[list[str] | None, Query(description=LABEL_HELP)]
FormLabelValues = Annotated[list[str] | None, Form(description=LABEL_HELP)]
FilterTexts = Annotated[list[str] | None, Query(description=FILTER_HELP)]
FormFilterTexts = Annotated[list[str] | None, Form(description=FILTER_HELP)]
MaxDistance = Annotated[float | None, Query(ge=0, allow_inf_nan=False, description=MAX_DISTANCE_HELP)]
FormMaxDistance = Annotated[float | None, Form(ge=0, allow_inf_nan=False, description=MAX_DISTANCE_HELP)]

router = APIRouter(prefix="/api", tags=["api"])


def default_k(settings: Settings) -> int:
    return min(DEFAULT_K, settings.max_k)


def health_timeout_s(settings: Settings) -> float:
    """The health checks' deadline: short, so that /healthz answers before a prober gives up on it."""
    return min(HEALTH_TIMEOUT_S, settings.timeout_s)


def limited_k(k: int, settings: Settings, where: str) -> int:
    """k as sent, if within --max-k, or the gateway's default when not sent. Out of bounds, the error a
    bound in the signature would have raised (pydantic's, at `where`: "query" or "body")."""
    if k == K_NOT_SENT:
        return default_k(settings)
    if k > settings.max_k:
        message = f"Input should be less than or equal to {settings.max_k}"
        raise RequestValidationError(
            [{"type": "less_than_equal", "loc": (where, "k"), "msg": message, "input": k}]
        )
    return k


def document_limits(openapi: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The app's OpenAPI document with its k bound and default, as pydantic writes them from a bound in the
    signature: `maximum` after `type`, in the number type of `minimum` (a float in a form)."""

    def limited(schema: dict[str, Any]) -> dict[str, Any]:
        maximum = type(schema["minimum"])(settings.max_k)
        return {"type": schema["type"], "maximum": maximum, **schema, "default": default_k(settings)}

    search = openapi["paths"][f"{router.prefix}/search"]
    for parameter in search["get"]["parameters"]:
        if parameter["name"] == "k":
            parameter["schema"] = limited(parameter["schema"])
    form = search["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    fields = openapi["components"]["schemas"][form.rsplit("/", 1)[-1]]["properties"]
    fields["k"] = limited(fields["k"])
    return openapi


def collection_of(settings: Settings, collection: str) -> str:
    """The collection (or alias) a request names: the gateway's default when it names none."""
    return collection or settings.collection


T = TypeVar("T")


def in_collection(search: ImageSearch, name: str, call: Callable[[Target], T]) -> T:
    """Runs a call on the collection the name stands for and with its model, found by one Stats call: once
    more if that collection went away meanwhile (an alias moved, then its old collection dropped), as
    `ImageSearch.search` does. An unknown or bad name fails here: the index's NOT_FOUND, INVALID_ARGUMENT."""
    target = search.target(name)
    try:
        return call(target)
    except ServiceError as error:
        if error.service != "index" or error.code != grpc.StatusCode.NOT_FOUND:
            raise
        return call(search.target(name))


def thumbnail_url(settings: Settings, item_id: str, metadata: dict[str, str], collection: str) -> str | None:
    """The item's thumbnail; it names the collection (as resolved) unless that is the gateway's default."""
    if settings.media_root is None or not metadata.get(media.SOURCE_KEY):
        return None
    url = f"/api/thumbnail?id={quote(item_id, safe='')}"
    if collection != settings.collection:
        url += f"&collection={quote(collection, safe='')}"
    return url


def thumbnail_cache(settings: Settings) -> str:
    """Cache-Control of a thumbnail: behind a read token, no shared cache may keep it."""
    return GUARDED_THUMBNAIL_CACHE if settings.read_token else THUMBNAIL_CACHE


def shown(settings: Settings, metadata: dict[str, str]) -> dict[str, str]:
    """The metadata a reply may hold: `source` is a path on the indexing machine (user names, folder
    layout), which the page never needs, since thumbnails go by id; only --show-source returns it."""
    if settings.show_source:
        return metadata
    return {key: value for key, value in metadata.items() if key != media.SOURCE_KEY}


def results(settings: Settings, matches: list[Match], collection: str) -> list[Result]:
    return [
        Result(
            id=m.id,
            distance=m.distance,
            metadata=shown(settings, m.metadata),
            thumbnail_url=thumbnail_url(settings, m.id, m.metadata, collection),
            novelty=nearness.stored_novelty(m.metadata),
        )
        for m in matches
    ]


def novelty_of(
    cards: nearness.ModelCards, search: ImageSearch, model: str, novelty: float | None, what: str
) -> dict[str, Any]:
    """A search reply's novelty fields for a query of this novelty (the card only read when it is novel)."""
    notice = None
    if novelty is not None and novelty > nearness.NOVEL_ABOVE:
        notice = nearness.unlike_training(novelty, model, cards.card(search.encoder, model), what)
    return {"novelty": novelty, "novel": notice is not None, "novelty_notice": notice}


def no_view(note: str) -> ModelView:
    return ModelView(input=None, reconstruction=None, note=note)


def model_view(search: ImageSearch, image: bytes, target: Target) -> ModelView:
    """The image's preprocessed input and reconstruction by the model that fills the target collection
    (Reconstruct); a note instead when the encoder cannot give them (a model it does not serve or without
    a decoder, an older encoder, a bad stored file, pixels of a shape no PNG here shows). Grayscale for a
    digits model, RGB for a colour one, at the model's input size."""
    try:
        [view] = search.encoder.reconstruct([image], model=target.model)
    except BadImage as error:
        return no_view(http_error(error)[1])
    except ModelNotServed as error:
        return no_view(model_not_served(target, error))
    except ServiceError as error:
        return no_view(str(error))
    try:
        return ModelView(
            input=media.png_data_url(view.input), reconstruction=media.png_data_url(view.output), note=None
        )
    except ValueError as error:  # an encoder's pixels neither grayscale nor RGB
        return no_view(f"the encoder's view of the image cannot be shown: {error}")


def model_not_served(target: Target, error: ModelNotServed) -> str:
    return (
        f"the collection {target.collection!r} is filled by the model {error.model!r}, which the encoder "
        f"does not serve ({error.details})"
    )


def stored_view(
    search: ImageSearch, root: Path | None, metadata: dict[str, str], target: Target
) -> ModelView:
    """The model's view of a stored item's image, read from the media root; a note when there is none."""
    try:
        image = media.read_source(root, metadata.get(media.SOURCE_KEY))
    except media.NoImage as missing:
        return no_view(str(missing))
    return model_view(search, image, target)


def stored(search: ImageSearch, item_id: str, collection: str) -> tuple[str, dict[str, str]]:
    """The stored item's id and metadata; 404 when the collection has no such item (or does not exist)."""
    items, _ = search.index.get([item_id], collection=collection)
    if not items:
        raise HTTPException(404, f"no item with id {item_id!r}")
    return items[0].id, items[0].metadata


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


def nearness_of(
    cards: nearness.ModelCards,
    search: ImageSearch,
    model: str,
    conditions: list[Condition],
    max_distance: float | None,
    matches: list[Match],
) -> dict[str, Any]:
    """A search reply's fields beside its results: the filter as applied, and whether nothing is close by
    the card of the model that fills the collection (web/nearness.py)."""
    closeness = cards.closeness(search.encoder, model)
    notice = nearness.nothing_close(closeness, matches, filtered=bool(conditions))
    return {
        "filter": [FilterCondition(key=c.key, op=c.op, values=list(c.values)) for c in conditions],
        "max_distance": max_distance,
        "nothing_close": notice is not None,
        "notice": notice,
        "duplicate_distance": closeness.duplicate_distance if closeness else None,
        "nothing_close_distance": closeness.limit if closeness else None,
    }


def health(search: ImageSearch, timeout_s: float) -> Health:
    encoder = service_health(search.encoder, timeout_s)
    index = service_health(search.index, timeout_s)
    return Health(ok=encoder.ok and index.ok, encoder=encoder, index=index)


@router.post(
    "/search",
    response_model=UploadSearch,
    summary="Search by an uploaded image, embedded by the model that fills the collection",
    responses=_errors(400, 404, 413, 502, 503),
)
def search_upload(
    file: Annotated[UploadFile, File(description="an image: PNG, JPEG, BMP, GIF, WebP or TIFF")],
    settings: SettingsDep,
    search: SearchDep,
    cards: CardsDep,
    k: FormK = K_NOT_SENT,
    collection: FormCollection = "",
    label: FormLabelValues = None,
    filter: FormFilterTexts = None,
    max_distance: FormMaxDistance = None,
) -> UploadSearch:
    """The k stored images nearest the upload, among those the filter keeps (`label`, repeatable: any of
    those labels; `filter`, repeatable: the CLI's KEY=VALUE, KEY!=VALUE, KEY^=PREFIX), none farther than
    `max_distance`. A filter that cannot be read, or that the index refuses, is a 400 naming it.

    `nothing_close` (with a `notice`) says when even the nearest result is farther than the model's
    duplicate distance times its factor, both from the model's card; without a duplicate distance in the
    card, it is never set."""
    k = limited_k(k, settings, "body")
    conditions = label_filter.search_filter(label, filter)
    image = read_upload(file, settings.max_upload_bytes)

    def run(target: Target) -> tuple[Target, list[Match], float | None]:
        embedding = search.embed([image], target)  # a bad image fails here: 400 with the encoder's reason
        [matches] = search.index.search(
            embedding.vectors,
            k,
            embedding.model_version,
            collection=target.collection,
            filter=conditions,
            max_distance=max_distance,
        )
        return target, matches, embedding.novelty[0] if embedding.novelty else None

    target, matches, novelty = in_collection(search, collection_of(settings, collection), run)
    return UploadSearch(
        k=k,
        collection=target.collection,
        model=target.model,
        query=model_view(search, image, target),
        results=results(settings, matches, target.collection),
        **nearness_of(cards, search, target.model, conditions, max_distance, matches),
        **novelty_of(cards, search, target.model, novelty, "The image"),
    )


@router.get(
    "/search",
    response_model=IdSearch,
    summary="More like a stored item (SearchById; the item itself is left out)",
    responses=_errors(400, 404, 503),
)
def search_by_id(
    id: ItemId,
    settings: SettingsDep,
    search: SearchDep,
    cards: CardsDep,
    k: K = K_NOT_SENT,
    collection: CollectionName = "",
    label: LabelValues = None,
    filter: FilterTexts = None,
    max_distance: MaxDistance = None,
) -> IdSearch:
    """The k stored items nearest the stored item `id` (itself left out), filtered and bounded as the
    search by upload is (`label`, `filter`, `max_distance`), with the same `nothing_close`."""
    k = limited_k(k, settings, "query")
    conditions = label_filter.search_filter(label, filter)
    target = search.target(collection_of(settings, collection))  # for the name that answered
    [matches] = search.search_by_id(
        [id], k, collection=target.collection, filter=conditions, max_distance=max_distance
    )
    found, _ = search.index.get([id], collection=target.collection)  # the query's stored novelty
    novelty = nearness.stored_novelty(found[0].metadata) if found else None
    return IdSearch(
        k=k,
        collection=target.collection,
        model=target.model,
        query=IdQuery(id=id),
        results=results(settings, matches, target.collection),
        **nearness_of(cards, search, target.model, conditions, max_distance, matches),
        **novelty_of(cards, search, target.model, novelty, f"The item {id!r}"),
    )


@router.get(
    "/items",
    response_model=Item,
    summary="A stored item, with its image as the model sees it",
    responses=_errors(400, 404, 503),
)
def get_item(
    id: ItemId,
    settings: SettingsDep,
    root: MediaRoot,
    search: SearchDep,
    collection: CollectionName = "",
) -> Item:
    target = search.target(collection_of(settings, collection))
    item_id, metadata = stored(search, id, target.collection)
    return Item(
        id=item_id,
        collection=target.collection,
        metadata=shown(settings, metadata),
        thumbnail_url=thumbnail_url(settings, item_id, metadata, target.collection),
        view=stored_view(search, root, metadata, target),
    )


@router.post(
    "/items",
    response_model=Added,
    status_code=201,
    summary="Add an uploaded image to a collection (only with --allow-indexing and the token)",
    responses=_errors(400, 401, 403, 404, 413, 502, 503),
    dependencies=[Depends(require_indexing_token)],
)
def add_item(
    file: Annotated[UploadFile, File(description="the image to embed and store")],
    id: Annotated[str, Form(min_length=1, description="the id to store it under")],
    settings: SettingsDep,
    search: SearchDep,
    label: Annotated[str, Form(description="the metadata `label`")] = "",
    collection: FormCollection = "",
) -> Added:
    image = read_upload(file, settings.max_upload_bytes)
    metadata = [{"label": label}] if label else [{}]
    count = search.add([id], [image], metadata, collection=collection_of(settings, collection))
    return Added(id=id, count=count)


@router.get(
    "/thumbnail",
    summary="A stored item's image, downscaled (PNG)",
    responses={200: {"content": {"image/png": {}}}, **_errors(400, 404, 503)},
    response_class=Response,
)
def get_thumbnail(
    request: Request,
    id: ItemId,
    settings: SettingsDep,
    root: MediaRoot,
    search: SearchDep,
    size: ThumbnailSize = media.DEFAULT_THUMBNAIL_SIZE,
    collection: CollectionName = "",
) -> Response:
    _, metadata = stored(search, id, collection_of(settings, collection))
    data, etag = media.thumbnail(media.resolve_source(root, metadata.get(media.SOURCE_KEY)), size)
    headers = {"ETag": etag, "Cache-Control": thumbnail_cache(settings)}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png", headers=headers)


@router.get(
    "/stats",
    response_model=Stats,
    summary="A collection: count, dim, model and model version",
    responses=_errors(400, 404, 503),
)
def stats(settings: SettingsDep, search: SearchDep, collection: CollectionName = "") -> Stats:
    name = collection_of(settings, collection)
    found = search.index.stats(collection=name)
    return Stats(
        collection=found.collection or name,
        model_name=found.model_name,
        count=found.count,
        dim=found.dim,
        model_version=found.model_version,
        bytes_used=found.bytes_used,
    )


@router.get(
    "/collections",
    response_model=Collections,
    summary="The index service's collections, with their models and aliases, and the gateway's default",
    responses=_errors(503),
)
def collections(settings: SettingsDep, search: SearchDep) -> Collections:
    found = search.index.list_collections()  # one call: the aliases as each collection lists them
    aliases = {alias: c.name for c in found for alias in c.aliases}
    return Collections(
        default=settings.collection,
        collections=[CollectionEntry.model_validate(c, from_attributes=True) for c in found],
        aliases=dict(sorted(aliases.items())),
    )


@router.get(
    "/labels",
    response_model=Labels,
    summary="The labels a collection holds, from a sample of its first items: for a label picker",
    responses=_errors(400, 404, 503),
)
def get_labels(
    settings: SettingsDep, search: SearchDep, cache: LabelsDep, collection: CollectionName = ""
) -> Labels:
    """The distinct metadata `label` values among the collection's first 10,000 items (one Scan, cut short
    there), the 100 most frequent at most; each collection's are kept for a minute, so a page load costs
    one Stats call. `complete` says whether the sample covered the whole collection: when it did not, a
    label may be missing from the list and can still be searched for by name."""
    name = collection_of(settings, collection)
    found = search.index.stats(collection=name)
    answered = found.collection or name
    sample = cache.labels(search.index, answered) if found.count else label_filter.LabelSample([], 0, 0, 0)
    return Labels(
        collection=answered,
        key=label_filter.LABEL_KEY,
        labels=sample.labels,
        distinct=sample.distinct,
        sampled=sample.sampled,
        count=found.count,
        complete=sample.complete and sample.sampled >= found.count,
    )


@router.get(
    "/health",
    response_model=Health,
    summary="Both services' gRPC health; 503 when either is not serving",
    responses={503: {"model": Health}},
)
def get_health(response: Response, settings: SettingsDep, search: SearchDep) -> Health:
    found = health(search, health_timeout_s(settings))
    if not found.ok:
        response.status_code = 503
    return found


@router.get("/config", response_model=Config, summary="What the page needs to know of this gateway")
def config(settings: SettingsDep) -> Config:
    return Config(
        max_upload_bytes=settings.max_upload_bytes,
        max_k=settings.max_k,
        default_k=default_k(settings),
        thumbnails=settings.media_root is not None,
        indexing=settings.allow_indexing,
    )
