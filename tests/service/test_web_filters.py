"""The web gateway's label filter, `filter`, `max_distance`, /api/labels and the "nothing close" notice, over
real HTTP against both services in process.

The encoder serves the default (digits) model three times over, from copies of its directory with cards of
their own: `default` with a `duplicate_distance` and a `nothing_close_factor`, `nofactor` with a duplicate
distance only (the gateway's default factor), `plain` with neither (no notice, ever). Each fills a
collection of sample digits, so the notice follows the card, whatever the shipped cards hold."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

import numpy as np
import pytest

from encoder_service.model_dir import CARD_JSON, shipped_model
from imgsearch.client import EncoderClient, ImageSearch, ServiceError
from imgsearch.filters import Condition
from tests.support import (
    Gateway,
    Reply,
    address,
    index_folder,
    mnist_sample,
    png,
    request,
    start_encoder,
    start_index,
    write_digits,
)
from web import labels, nearness
from web.settings import Settings

DIGITS = 60
OTHERS = 12  # digits in each of the collections of `nofactor` and `plain`
DUPLICATE = 0.1
FACTOR = 5.0  # `default`'s limit: 0.5; `nofactor`'s: 0.1 x DEFAULT_NOTHING_CLOSE_FACTOR
UNSTORED = 9000  # a sample digit not indexed
FLAT = png(np.zeros((28, 28), np.uint8))  # a blank image: unlike any digit
LONG_KEY = "k" * 300  # past the index's 256 bytes for a metadata key


@dataclass
class Stack:
    url: str
    search: ImageSearch
    media: Path


def model_copy(folder: Path, **card: object) -> Path:
    """The default model's directory, its files linked, its card with `card`'s keys set (None: removed)."""
    shipped = shipped_model("default")
    folder.mkdir(parents=True)
    for path in shipped.iterdir():
        if path.name != CARD_JSON:
            (folder / path.name).symlink_to(path)
    written = json.loads((shipped / CARD_JSON).read_text())
    for key, value in card.items():
        written.pop(key, None)
        if value is not None:
            written[key] = value
    (folder / CARD_JSON).write_text(json.dumps(written))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("web-filters")
    unset = {nearness.DUPLICATE_KEY: None, nearness.FACTOR_KEY: None}
    models = {
        "default": model_copy(tmp / "close", duplicate_distance=DUPLICATE, nothing_close_factor=FACTOR),
        "nofactor": model_copy(tmp / "nofactor", **{**unset, nearness.DUPLICATE_KEY: DUPLICATE}),
        "plain": model_copy(tmp / "plain", **unset),
    }
    media = tmp / "media"
    write_digits(media / "digits", DIGITS)
    write_digits(media / "others", OTHERS, start=DIGITS)
    encoder = start_encoder("--models", ",".join(f"{name}={path}" for name, path in models.items()))
    index = start_index(tmp / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        assert index_folder(search, media / "digits") == DIGITS
        for name in ("nofactor", "plain"):
            search.index.create_collection(name, name)
            with ImageSearch(address(encoder), address(index), 30, collection=name) as other:
                assert index_folder(other, media / "others") == OTHERS
        settings = Settings(encoder=address(encoder), index=address(index), media_root=media.resolve())
        with Gateway(settings) as gateway:
            yield Stack(gateway.url, search, media)
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


def upload(url: str, image: bytes, fields: Sequence[tuple[str, str]] = ()) -> Reply:
    """POST /api/search with the image and the form's fields, a name given more than once repeated."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields:
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    body.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    call = urllib.request.Request(
        f"{url}/api/search",
        data=body.getvalue(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(call, timeout=30) as reply:
            return Reply(reply.status, dict(reply.headers.items()), reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers.items()), error.read())


def by_id(url: str, item_id: str, params: Sequence[tuple[str, str]] = ()) -> Reply:
    return request(f"{url}/api/search?{urlencode([('id', item_id), *params])}")


def ok(reply: Reply) -> Any:
    assert reply.status == 200, reply.body
    return reply.json()


def unstored_digit() -> bytes:
    return png(mnist_sample(1, UNSTORED)[0][0])


def stored(stack: Stack, name: str) -> tuple[str, bytes]:
    """A stored digit's id and image."""
    path = next((stack.media / "digits").rglob(name))
    return path.relative_to(stack.media / "digits").as_posix(), path.read_bytes()


def test_a_label_filter_returns_only_those_labels_and_what_the_client_finds(stack: Stack) -> None:
    image = unstored_digit()
    found = ok(upload(stack.url, image, [("k", "10"), ("label", "3"), ("label", "5"), ("label", "")]))
    assert found["filter"] == [{"key": "label", "op": "any_of", "values": ["3", "5"]}]
    assert len(found["results"]) == 10
    assert {r["metadata"]["label"] for r in found["results"]} <= {"3", "5"}
    wanted = [Condition("label", "any_of", ("3", "5"))]
    [client] = stack.search.search([image], 10, filter=wanted)
    assert [r["id"] for r in found["results"]] == [m.id for m in client]
    unfiltered = ok(upload(stack.url, image, [("k", "10")]))
    assert unfiltered["filter"] == [] and unfiltered["max_distance"] is None
    assert {r["metadata"]["label"] for r in unfiltered["results"]} - {"3", "5"}, "the filter filtered"

    item_id = found["results"][0]["id"]
    more = ok(by_id(stack.url, item_id, [("k", "5"), ("label", "3"), ("label", "5")]))
    assert more["filter"] == found["filter"]
    [client] = stack.search.search_by_id([item_id], 5, filter=wanted)
    assert [r["id"] for r in more["results"]] == [m.id for m in client]
    assert item_id not in [r["id"] for r in more["results"]]
    assert {r["metadata"]["label"] for r in more["results"]} <= {"3", "5"}


def test_a_filter_in_the_cli_syntax_is_anded_with_the_labels(stack: Stack) -> None:
    image = unstored_digit()
    sevens = ok(upload(stack.url, image, [("k", "5"), ("filter", "label=7")]))
    assert sevens["filter"] == [{"key": "label", "op": "equals", "values": ["7"]}]
    assert sevens["results"] and {r["metadata"]["label"] for r in sevens["results"]} == {"7"}
    item_id = sevens["results"][0]["id"]
    not_seven = ok(by_id(stack.url, item_id, [("filter", "label!=7"), ("filter", "label^=")]))
    assert [c["op"] for c in not_seven["filter"]] == ["prefix", "not_equals"]
    assert not_seven["results"] and "7" not in {r["metadata"]["label"] for r in not_seven["results"]}
    nothing = ok(by_id(stack.url, item_id, [("label", "7"), ("filter", "label!=7")]))
    assert nothing["results"] == [] and not nothing["nothing_close"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nokey", "filter 'nokey': expected KEY=VALUE"),
        ("=7", "filter '=7': the key before '=' is empty"),
        (f"{LONG_KEY}=7", "filter condition 0 (key 'kkk"),  # the index refuses it, naming it
    ],
)
def test_a_bad_filter_is_a_400_naming_it(stack: Stack, text: str, says: str) -> None:
    for reply in (
        upload(stack.url, unstored_digit(), [("filter", text)]),
        by_id(stack.url, "3/00007.png", [("filter", text)]),
    ):
        assert reply.status == 400, reply.body
        assert says in reply.json()["detail"], reply.json()
    refused = by_id(stack.url, "3/00007.png", [("filter", f"{LONG_KEY}=7")]).json()
    assert refused["service"] == "index" and "keys must be 1 to 256 bytes" in refused["detail"]


def test_max_distance_leaves_out_the_farther_results(stack: Stack) -> None:
    image = unstored_digit()
    everything = ok(upload(stack.url, image, [("k", "10")]))["results"]
    bound = everything[3]["distance"]
    near = ok(upload(stack.url, image, [("k", "10"), ("max_distance", f"{bound!r}")]))
    assert near["max_distance"] == pytest.approx(bound)
    assert 1 <= len(near["results"]) <= 4 and all(r["distance"] <= bound for r in near["results"])
    [client] = stack.search.search([image], 10, max_distance=bound)
    assert [r["id"] for r in near["results"]] == [m.id for m in client]
    none = ok(by_id(stack.url, everything[0]["id"], [("max_distance", "0")]))
    assert none["results"] == [] and none["max_distance"] == 0 and not none["nothing_close"]
    for bad in ("-1", "nan", "inf", "far"):
        assert upload(stack.url, image, [("max_distance", bad)]).status == 422, bad
        reply = by_id(stack.url, everything[0]["id"], [("max_distance", bad)])
        assert reply.status == 422 and "max_distance" in reply.json()["detail"], bad


def test_nothing_close_for_a_blank_image_and_not_for_a_stored_digit(stack: Stack) -> None:
    flat = ok(upload(stack.url, FLAT, [("k", "3")]))
    assert flat["duplicate_distance"] == pytest.approx(DUPLICATE)
    assert flat["nothing_close_distance"] == pytest.approx(DUPLICATE * FACTOR)
    nearest = flat["results"][0]["distance"]
    assert nearest > DUPLICATE * FACTOR, "a blank image is expected far from every digit"
    assert flat["nothing_close"] is True
    assert flat["notice"] == (
        f"Nothing close: the nearest result is at {nearest:.3g}, past 5 x the model's duplicate distance "
        "0.1; the query may be unlike anything stored"
    )
    filtered = ok(upload(stack.url, FLAT, [("label", "1")]))
    assert filtered["nothing_close"] and "nearest result among the items that match the filter" in (
        filtered["notice"] or ""
    )

    item_id, image = stored(stack, "*.png")
    itself = ok(upload(stack.url, image, [("k", "3")]))
    assert itself["results"][0]["id"] == item_id
    assert itself["results"][0]["distance"] == pytest.approx(0, abs=1e-3)
    assert itself["nothing_close"] is False and itself["notice"] is None
    assert itself["duplicate_distance"] == pytest.approx(DUPLICATE)

    more = ok(by_id(stack.url, item_id, [("k", "3")]))  # the same rule, on the nearest other item
    assert more["nothing_close"] is (more["results"][0]["distance"] > DUPLICATE * FACTOR)
    assert (more["notice"] is None) is (not more["nothing_close"])


def test_a_card_without_a_factor_gets_the_default_and_one_without_a_duplicate_distance_no_notice(
    stack: Stack,
) -> None:
    default_limit = DUPLICATE * nearness.DEFAULT_NOTHING_CLOSE_FACTOR
    nofactor = ok(upload(stack.url, FLAT, [("collection", "nofactor")]))
    assert (nofactor["collection"], nofactor["model"]) == ("nofactor", "nofactor")
    assert nofactor["nothing_close_distance"] == pytest.approx(default_limit)
    assert nofactor["nothing_close"] and "past 3 x the model's duplicate distance 0.1" in nofactor["notice"]

    plain = ok(upload(stack.url, FLAT, [("collection", "plain")]))
    assert plain["model"] == "plain" and plain["results"]
    assert plain["results"][0]["distance"] > default_limit
    assert plain["nothing_close"] is False and plain["notice"] is None
    assert plain["duplicate_distance"] is None and plain["nothing_close_distance"] is None
    first = plain["results"][0]["id"]
    assert not ok(by_id(stack.url, first, [("collection", "plain")]))["nothing_close"]


def test_labels_lists_a_collections_labels_from_a_sample_kept_a_while(stack: Stack) -> None:
    found = ok(request(f"{stack.url}/api/labels"))
    expected = sorted({str(label) for label in mnist_sample(DIGITS)[1]}, key=int)
    assert found == {
        "collection": "default",
        "key": "label",
        "labels": expected,
        "distinct": len(expected),
        "sampled": DIGITS,
        "count": DIGITS,
        "complete": True,
    }
    others = ok(request(f"{stack.url}/api/labels?collection=plain"))
    assert (others["collection"], others["sampled"], others["count"]) == ("plain", OTHERS, OTHERS)
    assert request(f"{stack.url}/api/labels?collection=nosuch").status == 404
    assert request(f"{stack.url}/api/labels?collection=Bad%20Name").status == 400

    # Kept for a while: an item added meanwhile is counted (Stats) but its label not yet listed.
    stack.search.index.create_collection("grows")
    with ImageSearch(
        stack.search.encoder.address, stack.search.index.address, 30, collection="grows"
    ) as grows:
        grows.add(["a"], [unstored_digit()], [{"label": "first"}])
        assert ok(request(f"{stack.url}/api/labels?collection=grows"))["labels"] == ["first"]
        grows.add(["b"], [FLAT], [{"label": "second"}])
        kept = ok(request(f"{stack.url}/api/labels?collection=grows"))
        assert kept["labels"] == ["first"] and kept["count"] == 2 and not kept["complete"]


def test_the_label_sample_reads_no_more_than_its_bound(stack: Stack) -> None:
    sample = labels.sample_labels(stack.search.index, "default", items=25, shown=3)
    assert (sample.sampled, sample.total, sample.complete) == (25, DIGITS, False)
    assert len(sample.labels) == 3 and sample.distinct > 3
    assert sample.labels == sorted(sample.labels, key=int)
    assert sorted(["10", "b", "2", "a10", "a9", "1"], key=labels.natural_key) == [
        "1",
        "2",
        "10",
        "a9",
        "a10",
        "b",
    ]


def test_the_label_cache_keeps_each_collection_for_its_ttl_and_a_bounded_number() -> None:
    now = [0.0]
    taken: list[str] = []

    def sample(_index: object, collection: str) -> labels.LabelSample:
        taken.append(collection)
        return labels.LabelSample([collection], 1, 1, 1)

    cache = labels.LabelCache(ttl_s=60, collections=2, sample=sample, clock=lambda: now[0])
    index = cast(Any, None)
    assert cache.labels(index, "a").labels == ["a"]
    cache.labels(index, "a")
    now[0] = 59
    cache.labels(index, "a")
    assert taken == ["a"]
    now[0] = 61
    cache.labels(index, "a")
    cache.labels(index, "b")
    cache.labels(index, "c")  # "a" is the oldest of three: it goes
    cache.labels(index, "c")
    cache.labels(index, "a")
    assert taken == ["a", "a", "b", "c", "a"]


def test_the_model_cards_are_read_once_a_while_and_a_failure_gives_no_notice() -> None:
    now = [0.0]
    calls: list[int] = []
    answer: list[dict[str, Any] | Exception] = [
        {"models": [{"name": "digits", "default": True, "card": {"duplicate_distance": 2.0}}]}
    ]

    class Encoder:
        def info(self) -> dict[str, Any]:
            calls.append(1)
            if isinstance(answer[0], Exception):
                raise answer[0]
            return answer[0]

    encoder = cast(EncoderClient, Encoder())
    cards = nearness.ModelCards(ttl_s=60, failed_ttl_s=10, clock=lambda: now[0])
    assert cards.closeness(encoder, "digits") == nearness.Closeness(
        2.0, nearness.DEFAULT_NOTHING_CLOSE_FACTOR
    )
    assert cards.closeness(encoder, "") == nearness.Closeness(2.0, 3.0), "'': the default model's"
    assert cards.card(encoder, "cats") is None and len(calls) == 1
    now[0] = 61
    answer[0] = ServiceError("encoder", "x:1", None, "down")
    assert cards.closeness(encoder, "digits") is not None, "the cards read before stay in use"
    assert len(calls) == 2
    now[0] = 65
    cards.card(encoder, "digits")
    assert len(calls) == 2, "a failure is not tried again at once"

    fresh = nearness.ModelCards(clock=lambda: now[0])
    assert fresh.closeness(encoder, "digits") is None  # no cards at all: no notice, no error
    for bad in ("2", True, 0, -1.0, float("nan"), float("inf"), None):
        assert nearness.closeness_of({"duplicate_distance": bad}) is None, bad
    assert nearness.closeness_of(
        {"duplicate_distance": 2, "nothing_close_factor": "x"}
    ) == nearness.Closeness(2.0, nearness.DEFAULT_NOTHING_CLOSE_FACTOR)


def test_the_openapi_document_names_the_new_parameters(stack: Stack) -> None:
    document = ok(request(f"{stack.url}/api/openapi.json"))
    search = document["paths"]["/api/search"]
    names = {p["name"] for p in search["get"]["parameters"]}
    assert {"label", "filter", "max_distance"} <= names
    form = search["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    fields = document["components"]["schemas"][form.rsplit("/", 1)[-1]]["properties"]
    assert {"label", "filter", "max_distance"} <= set(fields)
    assert "repeat" in fields["label"]["description"] and "KEY=VALUE" in fields["filter"]["description"]
    assert "/api/labels" in document["paths"]
