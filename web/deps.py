"""What the gateway's routes need, as FastAPI dependencies: the settings, the client, the metrics and the
caches (the collections' labels, the models' cards) that `create_app` (web/app.py) keeps in `app.state`
once per app, and the indexing token's check.

The routes are module-level, shared by every app in the process (the tests run several side by side), so
they reach their app's state through the request instead of closing over it.

The getters are `async def` only so that FastAPI calls them on the event loop instead of a worker thread
each: they never wait. No `from __future__ import annotations`: FastAPI reads these annotations."""

from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from imgsearch import security
from imgsearch.client import ImageSearch
from imgsearch_server import auth
from web.labels import LabelCache
from web.metrics import GatewayMetrics
from web.nearness import ModelCards
from web.settings import Settings

READ_ONLY = "this gateway is read-only (start it with --allow-indexing to add images)"


async def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def image_search(request: Request) -> ImageSearch:
    search: ImageSearch = request.app.state.search
    return search


async def gateway_metrics(request: Request) -> GatewayMetrics:
    metrics: GatewayMetrics = request.app.state.metrics
    return metrics


async def label_cache(request: Request) -> LabelCache:
    labels: LabelCache = request.app.state.labels
    return labels


async def model_cards(request: Request) -> ModelCards:
    cards: ModelCards = request.app.state.cards
    return cards


SettingsDep = Annotated[Settings, Depends(app_settings)]
SearchDep = Annotated[ImageSearch, Depends(image_search)]
MetricsDep = Annotated[GatewayMetrics, Depends(gateway_metrics)]
LabelsDep = Annotated[LabelCache, Depends(label_cache)]
CardsDep = Annotated[ModelCards, Depends(model_cards)]


async def media_root(settings: SettingsDep) -> Path | None:
    """The folder thumbnails and item views may read from; None: the gateway serves no images."""
    return settings.media_root


MediaRoot = Annotated[Path | None, Depends(media_root)]


async def require_indexing_token(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(description="Bearer TOKEN")] = None,
) -> None:
    """A write to the index needs --allow-indexing (403 without) and the services' full token, which the
    gateway holds, as `Authorization: Bearer TOKEN` (401 without). Checked before the upload is looked at:
    who may not write learns nothing of what their form lacks."""
    if not settings.allow_indexing or settings.token is None:
        raise HTTPException(403, READ_ONLY)
    problem = auth.BearerTokenInterceptor(settings.token.value).check(
        [(security.AUTH_KEY, authorization or "")]
    )
    if problem is not None:
        raise HTTPException(
            401, f"{problem}: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"}
        )
