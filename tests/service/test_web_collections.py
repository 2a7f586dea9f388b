"""The web gateway's collections over real HTTP, against both services in process (an encoder serving the
models `default` and `fashion`, a FAISS index with two collections and an alias): /api/collections, the
`collection` parameter of the searches, items, thumbnails and stats, each image embedded and shown by the
model that fills the collection, the collection that answered in every reply, and the errors of a bad or
unknown collection or of a model the encoder does not serve. Also --collection / IMGSEARCH_COLLECTION."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgsearch import security
from imgsearch.client import ImageSearch
from tests.support import (
    Gateway,
    address,
    index_folder,
    mnist_sample,
    png,
    request,
    start_encoder,
    start_index,
    upload_search,
    write_digits,
)
from web.settings import Settings, parse_settings

DIGITS = 30
CLOTHES = 6
ALIAS = "live"
UNSERVED = "hats"  # a collection for a model the encoder does not serve
UNSERVED_MODEL = "cats"


@dataclass
class Stack:
    url: str
    search: ImageSearch
    encoder: str
    index: str
    media: Path
    clothes: dict[str, Path]  # id -> image file


def garment(seed: int) -> np.ndarray:
    """A 28x28 grayscale picture of its own (a few filled shapes on black): distinct for each seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (28, 28), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        points = [tuple(int(v) for v in rng.integers(2, 26, 2)) for _ in range(4)]
        draw.polygon(points, fill=int(rng.integers(90, 256)))
    return np.asarray(image)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("web-collections")
    media = tmp / "media"
    write_digits(media / "digits", DIGITS)
    clothes = {}
    for n in range(CLOTHES):
        path = media / "clothes" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(garment(n)))
        clothes[f"clothes/{n}.png"] = path

    encoder, index = start_encoder("--models", "default,fashion"), start_index(tmp / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")  # the default collection, by the default model
        search.index.create_collection("clothes", "fashion")
        search.add(
            list(clothes),
            [path.read_bytes() for path in clothes.values()],
            [{"label": "garment", "source": str(path)} for path in clothes.values()],
            collection="clothes",
        )
        search.index.set_alias(ALIAS, "clothes")
        search.index.create_collection(UNSERVED, UNSERVED_MODEL)
        settings = Settings(encoder=address(encoder), index=address(index), media_root=media.resolve())
        with Gateway(settings) as gateway:
            yield Stack(gateway.url, search, address(encoder), address(index), media, clothes)
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


upload = upload_search


def decoded_view(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_collections_lists_each_with_its_model_and_aliases(stack: Stack) -> None:
    reply = request(stack.url + "/api/collections")
    assert reply.status == 200, reply.body
    found = reply.json()
    assert found["default"] == "default"
    assert found["aliases"] == {ALIAS: "clothes"}
    by_name = {c["name"]: c for c in found["collections"]}
    assert sorted(by_name) == ["clothes", "default", UNSERVED]
    clothes, default, unserved = by_name["clothes"], by_name["default"], by_name[UNSERVED]
    assert (clothes["model_name"], clothes["count"], clothes["aliases"]) == ("fashion", CLOTHES, [ALIAS])
    assert (default["model_name"], default["count"], default["aliases"]) == ("default", DIGITS, [])
    assert clothes["dim"] == default["dim"] == 128 and clothes["model_version"] != default["model_version"]
    assert (unserved["model_name"], unserved["count"], unserved["dim"]) == (UNSERVED_MODEL, 0, 0)
    assert request(stack.url + "/api/openapi.json").json()["paths"]["/api/collections"]["get"]


def test_a_search_in_clothes_embeds_and_shows_with_the_fashion_model(stack: Stack) -> None:
    item_id, path = next(iter(stack.clothes.items()))
    data = path.read_bytes()
    reply = upload(stack.url, data, "clothes")
    assert reply.status == 200, reply.body
    found = reply.json()
    assert (found["collection"], found["model"]) == ("clothes", "fashion")
    first = found["results"][0]
    assert first["id"] == item_id and first["distance"] == pytest.approx(0, abs=1e-3)
    assert {r["id"] for r in found["results"]} <= set(stack.clothes)
    assert first["thumbnail_url"] == f"/api/thumbnail?id={quote(item_id, safe='')}&collection=clothes"
    thumbnail = request(stack.url + first["thumbnail_url"])
    assert thumbnail.status == 200 and thumbnail.headers["content-type"] == "image/png"
    # The model input view is the fashion model's: its reconstruction, not the digits model's.
    fashion, default = (
        stack.search.encoder.reconstruct([data], model=model)[0] for model in ("fashion", "default")
    )
    shown = decoded_view(found["query"]["reconstruction"])
    assert np.array_equal(shown, fashion.output) and not np.array_equal(shown, default.output)
    assert np.array_equal(decoded_view(found["query"]["input"]), fashion.input)
    # The same image with no collection named: the default collection, by the digits model.
    digits = upload(stack.url, data).json()
    assert (digits["collection"], digits["model"]) == ("default", "default")
    assert not set(r["id"] for r in digits["results"]) & set(stack.clothes)
    assert "collection=" not in (digits["results"][0]["thumbnail_url"] or "")
    assert decoded_view(digits["query"]["reconstruction"]).tolist() == default.output.tolist()


def test_an_alias_is_a_collection_parameter_and_answers_as_its_collection(stack: Stack) -> None:
    item_id, path = list(stack.clothes.items())[1]
    found = upload(stack.url, path.read_bytes(), ALIAS).json()
    assert found["collection"] == "clothes" and found["model"] == "fashion"
    assert found["results"][0]["id"] == item_id
    assert found["results"][0]["distance"] == pytest.approx(0, abs=1e-3)

    by_id = request(f"{stack.url}/api/search?id={quote(item_id)}&k=3&collection={ALIAS}")
    assert by_id.status == 200, by_id.body
    assert by_id.json()["collection"] == "clothes"
    ids = [r["id"] for r in by_id.json()["results"]]
    assert len(ids) == 3 and item_id not in ids and set(ids) <= set(stack.clothes)

    item = request(f"{stack.url}/api/items?id={quote(item_id)}&collection={ALIAS}").json()
    assert item["id"] == item_id and item["collection"] == "clothes"
    fashion = stack.search.encoder.reconstruct([path.read_bytes()], model="fashion")[0]
    assert np.array_equal(decoded_view(item["view"]["reconstruction"]), fashion.output)

    stats = request(f"{stack.url}/api/stats?collection={ALIAS}").json()
    assert (stats["collection"], stats["model_name"], stats["count"]) == ("clothes", "fashion", CLOTHES)
    default = request(f"{stack.url}/api/stats").json()
    assert (default["collection"], default["count"]) == ("default", DIGITS)
    # An id of one collection is not found in another.
    assert request(f"{stack.url}/api/items?id={quote(item_id)}").status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/search?id=x&collection={}",
        "/api/items?id=x&collection={}",
        "/api/thumbnail?id=x&collection={}",
        "/api/stats?collection={}",
    ],
)
def test_an_unknown_collection_gets_404_naming_it(stack: Stack, path: str) -> None:
    reply = request(stack.url + path.format("nosuch"))
    assert reply.status == 404, reply.body
    body = reply.json()
    assert "'nosuch'" in body["detail"] and body["service"] == "index"
    assert reply.headers["content-type"] == "application/json"


def test_an_upload_to_an_unknown_or_bad_collection_gets_a_clear_4xx(stack: Stack) -> None:
    data = png(mnist_sample(1, 9000)[0][0])
    unknown = upload(stack.url, data, "nosuch")
    assert unknown.status == 404 and "no collection or alias is named 'nosuch'" in unknown.json()["detail"]
    for bad in ("Bad Name!", "<script>alert(1)</script>", "a\nb"):
        reply = upload(stack.url, data, bad)
        assert reply.status == 400, (bad, reply.body)
        assert "not valid" in reply.json()["detail"] and reply.json()["service"] == "index"
    bad_query = request(f"{stack.url}/api/search?id=x&collection={quote('../etc')}")
    assert bad_query.status == 400 and "not valid" in bad_query.json()["detail"]
    too_long = request(f"{stack.url}/api/stats?collection={'a' * 300}")
    assert too_long.status == 422 and "collection" in too_long.json()["detail"]
    assert upload(stack.url, data, "").json()["collection"] == "default", "empty: the gateway's default"


def test_a_collection_whose_model_is_not_served_names_the_model(stack: Stack) -> None:
    reply = upload(stack.url, png(mnist_sample(1, 9000)[0][0]), UNSERVED)
    assert reply.status == 502, reply.body
    body = reply.json()
    assert body["service"] == "encoder"
    assert f"'{UNSERVED_MODEL}'" in body["detail"] and f"'{UNSERVED}'" in body["detail"]
    assert "--models" in body["detail"]
    # What needs no encoder still answers: an empty collection has no such id.
    assert request(f"{stack.url}/api/search?id=x&collection={UNSERVED}").status == 404


def test_the_gateways_default_collection_is_a_setting(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_settings([]).collection == "default"
    monkeypatch.setenv("IMGSEARCH_COLLECTION", ALIAS)
    assert parse_settings([]).collection == ALIAS
    assert parse_settings(["--collection", "clothes"]).collection == "clothes", "the flag wins"
    assert "collection clothes" in parse_settings(["--collection", "clothes"]).summary()
    with pytest.raises(ValueError, match="--collection"):
        Settings(collection="")

    settings = Settings(
        encoder=stack.encoder, index=stack.index, media_root=stack.media.resolve(), collection=ALIAS
    )
    item_id, path = next(iter(stack.clothes.items()))
    with Gateway(settings) as gateway:
        assert request(gateway.url + "/api/collections").json()["default"] == ALIAS
        found = upload(gateway.url, path.read_bytes()).json()
        assert (found["collection"], found["model"]) == ("clothes", "fashion")
        assert found["results"][0]["id"] == item_id
        # The alias's collection is named in the thumbnail's URL: it stays right if the alias moves.
        assert found["results"][0]["thumbnail_url"].endswith("&collection=clothes")
        assert request(f"{gateway.url}/api/stats").json()["collection"] == "clothes"
        digits = upload(gateway.url, path.read_bytes(), "default").json()
        assert digits["collection"] == "default"
        assert digits["results"][0]["thumbnail_url"].endswith("&collection=default")


def test_the_collections_need_the_read_token_as_every_api_route(stack: Stack) -> None:
    token = "collections-r3ad"
    settings = Settings(encoder=stack.encoder, index=stack.index, read_token=security.Secret(token))
    with Gateway(settings) as gateway:
        refused = request(gateway.url + "/api/collections")
        assert refused.status == 401 and refused.json()["auth"] == "read-token"
        reply = request(gateway.url + "/api/collections", headers={"Authorization": f"Bearer {token}"})
        assert reply.status == 200 and reply.json()["aliases"] == {ALIAS: "clothes"}
