"""The web gateway's JSON API over real HTTP (uvicorn), against both services in process (real gRPC, real
FAISS): every endpoint, the error codes (400, 401, 403, 404, 413, 422, 503), path traversal refused,
hostile ids kept as data, the page served offline, metrics, health, settings."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from PIL import Image

from imgsearch import security
from imgsearch.client import ImageSearch
from tests.support import (
    HOSTILE_ID,
    HOSTILE_LABEL,
    ROOT,
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
from tools.local import free_port
from web import healthcheck
from web.settings import Settings, parse_settings

INDEXED = 200
MAX_UPLOAD = 64 * 1024
MAX_K = 50
SPECIAL = 11  # the stack's items beside the digits
TOKEN = "s3cret-token"
STATIC = ROOT / "web" / "static"


@dataclass
class Stack:
    url: str
    search: ImageSearch
    media: Path
    outside: Path
    encoder: str
    index: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("web")
    media = tmp / "media"
    write_digits(media / "digits", INDEXED)
    outside = tmp / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(png(mnist_sample(1, 5000)[0][0]))
    (media / "link.png").symlink_to(secret)
    big = np.zeros((300, 400), dtype=np.uint8)
    big[100:200, 150:250] = 255
    Image.fromarray(big).save(media / "big.png")
    digit = media / "digits" / "3" / sorted(p.name for p in (media / "digits" / "3").iterdir())[0]
    (media / "notes.png").write_bytes(b"not an image at all")
    hostile = media / "hostile.png"
    hostile.write_bytes(png(mnist_sample(1, 7000)[0][0]))

    encoder, index = start_encoder(), start_index(tmp / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")
        # Items with odd sources, embedded from the digit's image (label 3 like it), and the hostile id.
        odd = {
            "relative": str(digit.relative_to(media)),
            "no-source": "",
            "missing-file": str(media / "nope.png"),
            "dotdot": "digits/../../outside/secret.png",
            "absolute-outside": str(secret),
            "symlink-out": str(media / "link.png"),
            "etc-passwd": "/etc/passwd",
            "dotdot-etc": "../../../../../../../../etc/passwd",
            "undecodable": str(media / "notes.png"),
        }
        metadata = [{"label": "3", "source": source} if source else {"label": "3"} for source in odd.values()]
        search.add(list(odd), [digit.read_bytes()] * len(odd), metadata)
        search.add(
            [HOSTILE_ID, "big"],
            [hostile.read_bytes(), (media / "big.png").read_bytes()],
            [
                {"label": HOSTILE_LABEL, "source": str(hostile)},
                {"label": "big", "source": str(media / "big.png")},
            ],
        )
        settings = Settings(
            encoder=address(encoder),
            index=address(index),
            media_root=media.resolve(),
            max_upload_bytes=MAX_UPLOAD,
            max_k=MAX_K,
        )
        with Gateway(settings) as gateway:
            yield Stack(gateway.url, search, media, outside, address(encoder), address(index))
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


def query_digit(n: int = 9000) -> tuple[bytes, str]:
    """A sample digit that is not indexed (the stack indexes the first INDEXED), as PNG, and its label."""
    x, y = mnist_sample(1, n)
    return png(x[0]), str(y[0])


def upload(
    url: str, data: bytes, k: int | None = None, name: str = "q.png", kind: str = "image/png"
) -> Reply:
    fields = {} if k is None else {"k": str(k)}
    return request(f"{url}/api/search", fields=fields, files={"file": (name, data, kind)})


def decoded_view(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


# The page: served by the gateway, nothing from elsewhere.


def test_the_page_is_served_and_needs_nothing_from_elsewhere(stack: Stack) -> None:
    reply = request(stack.url + "/")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.body.decode()
    assert "/static/app.js" in page and "/static/style.css" in page
    csp = reply.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), f"{name} loads from elsewhere"
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text
    for name in ("app.js", "style.css"):
        assert request(f"{stack.url}/static/{name}").status == 200


def test_openapi_describes_the_api(stack: Stack) -> None:
    spec = request(stack.url + "/api/openapi.json").json()
    paths = spec["paths"]
    assert set(paths["/api/search"]) == {"get", "post"}
    assert set(paths["/api/items"]) == {"get", "post"}
    for path in ("/api/thumbnail", "/api/stats", "/api/health", "/api/config"):
        assert "get" in paths[path], path
    assert request(stack.url + "/docs").status == 404, "Swagger UI would load from a CDN"


def test_config(stack: Stack) -> None:
    config = request(stack.url + "/api/config").json()
    assert config == {
        "max_upload_bytes": MAX_UPLOAD,
        "max_k": MAX_K,
        "default_k": 10,
        "thumbnails": True,
        "indexing": False,
    }


def test_stats(stack: Stack) -> None:
    stats = request(stack.url + "/api/stats").json()
    assert stats["count"] == INDEXED + SPECIAL
    assert stats["dim"] == 128 and stats["model_version"] and stats["bytes_used"] > 0


# Search by upload.


def test_search_by_upload_finds_the_querys_label_and_shows_the_models_view(stack: Stack) -> None:
    data, label = query_digit()
    reply = upload(stack.url, data)
    assert reply.status == 200, reply.body
    found = reply.json()
    assert found["k"] == 10 and len(found["results"]) == 10
    first = found["results"][0]
    assert first["metadata"]["label"] == label
    distances = [r["distance"] for r in found["results"]]
    assert distances == sorted(distances)
    assert first["thumbnail_url"] == f"/api/thumbnail?id={quote(first['id'], safe='')}"
    query = found["query"]
    assert query["note"] is None, query["note"]
    model_input, reconstruction = decoded_view(query["input"]), decoded_view(query["reconstruction"])
    assert model_input.shape == reconstruction.shape == (28, 28)
    assert model_input.max() > 128 and reconstruction.max() > 64


def test_k_is_chosen_and_bounded(stack: Stack) -> None:
    data, _ = query_digit()
    assert len(upload(stack.url, data, k=3).json()["results"]) == 3
    for bad in (0, MAX_K + 1):
        reply = upload(stack.url, data, k=bad)
        assert reply.status == 422 and "k" in reply.json()["detail"]


@pytest.mark.parametrize(
    "data,name,kind,words",
    [
        (b"hello, not an image", "notes.txt", "text/plain", "not an image the encoder can use"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png", "image/png", "not an image the encoder can use"),
        (b"", "empty.png", "image/png", "empty"),
    ],
    ids=["text", "broken-png", "empty"],
)
def test_a_non_image_gets_400_with_a_message(
    stack: Stack, data: bytes, name: str, kind: str, words: str
) -> None:
    reply = upload(stack.url, data, name=name, kind=kind)
    assert reply.status == 400, reply.body
    assert words in reply.json()["detail"]


def test_an_upload_over_the_limit_gets_413_with_a_message(stack: Stack) -> None:
    # Over the body limit (the framework's check, from Content-Length), and just over the file limit.
    for size in (4 * MAX_UPLOAD, MAX_UPLOAD + 1):
        reply = upload(stack.url, os.urandom(size))
        assert reply.status == 413, (size, reply.body)
        assert f"over the limit of {MAX_UPLOAD} bytes" in reply.json()["detail"]
    # A chunked body (no Content-Length) is cut off once it passes the limit.
    url = urlsplit(stack.url)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    chunks = iter([head, *(os.urandom(32 * 1024) for _ in range(8)), f"\r\n--{boundary}--\r\n".encode()])
    try:
        connection.request(
            "POST",
            "/api/search",
            body=chunks,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        assert response.status == 413 and "over the limit" in json.loads(response.read())["detail"]
    finally:
        connection.close()
    assert upload(stack.url, query_digit()[0]).status == 200, "the gateway still serves afterwards"


# Search by id, items, thumbnails.


def test_search_by_id_is_more_like_this(stack: Stack) -> None:
    reply = request(f"{stack.url}/api/search?id={quote('3/00007.png')}&k=5")
    assert reply.status == 200, reply.body
    found = reply.json()
    assert found["query"] == {"id": "3/00007.png"} and len(found["results"]) == 5
    assert "3/00007.png" not in [r["id"] for r in found["results"]], "the item itself is left out"


def test_unknown_ids_get_404(stack: Stack) -> None:
    for path in ("/api/search?id=nope", "/api/items?id=nope", "/api/thumbnail?id=nope"):
        reply = request(stack.url + path)
        assert reply.status == 404, path
        assert "nope" in reply.json()["detail"]
    assert request(stack.url + "/api/search").status == 422, "no id: a bad request, as JSON"


def test_get_an_item_with_its_models_view(stack: Stack) -> None:
    item = request(f"{stack.url}/api/items?id={quote('3/00007.png')}").json()
    assert item["id"] == "3/00007.png" and item["metadata"]["label"] == "3"
    assert item["thumbnail_url"] == "/api/thumbnail?id=3%2F00007.png"
    assert decoded_view(item["view"]["input"]).shape == (28, 28)
    assert decoded_view(item["view"]["reconstruction"]).shape == (28, 28)
    bare = request(f"{stack.url}/api/items?id=no-source").json()
    assert bare["thumbnail_url"] is None and bare["view"]["input"] is None
    assert "no source" in bare["view"]["note"]


def test_thumbnails_are_downscaled_png_with_cache_headers(stack: Stack) -> None:
    reply = request(f"{stack.url}/api/thumbnail?id={quote('3/00007.png')}")
    assert reply.status == 200 and reply.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(reply.body)).size == (28, 28), "never enlarged"
    assert reply.headers["cache-control"] == "max-age=300" and reply.headers["etag"]
    again = request(
        f"{stack.url}/api/thumbnail?id={quote('3/00007.png')}",
        headers={"If-None-Match": reply.headers["etag"]},
    )
    assert again.status == 304 and again.body == b""
    big = request(f"{stack.url}/api/thumbnail?id=big&size=64")
    assert Image.open(io.BytesIO(big.body)).size == (64, 48), "fitted into 64x64, the aspect kept"
    assert request(f"{stack.url}/api/thumbnail?id=big&size=10000").status == 422
    relative = request(f"{stack.url}/api/thumbnail?id=relative")
    assert relative.status == 200, "a relative source is taken inside the media root"
    broken = request(f"{stack.url}/api/thumbnail?id=undecodable")
    assert broken.status == 404 and "cannot be decoded" in broken.json()["detail"]
    view = request(f"{stack.url}/api/items?id=undecodable").json()["view"]
    assert view["input"] is None and "not an image the encoder can use" in view["note"]


@pytest.mark.parametrize(
    "item_id", ["dotdot", "absolute-outside", "symlink-out", "etc-passwd", "dotdot-etc", "missing-file"]
)
def test_sources_outside_the_media_root_get_404(stack: Stack, item_id: str) -> None:
    for path in (f"/api/thumbnail?id={item_id}", f"/api/thumbnail?id={item_id}&size=16"):
        reply = request(stack.url + path)
        assert reply.status == 404, (item_id, reply.body[:100])
        assert reply.headers["content-type"] == "application/json"
        assert "media root" in reply.json()["detail"]
    item = request(f"{stack.url}/api/items?id={item_id}").json()
    assert item["view"]["input"] is None and "media root" in item["view"]["note"]


def test_traversal_in_the_request_itself_is_just_an_unknown_id(stack: Stack) -> None:
    for item_id in ("../../etc/passwd", "/etc/passwd", str(stack.outside / "secret.png")):
        reply = request(f"{stack.url}/api/thumbnail?id={quote(item_id, safe='')}")
        assert reply.status == 404 and b"root:" not in reply.body
    assert request(stack.url + "/static/../../../../etc/passwd").status == 404
    assert request(stack.url + "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd").status == 404


def test_a_hostile_id_round_trips_as_data(stack: Stack) -> None:
    encoded = quote(HOSTILE_ID, safe="")
    item = request(f"{stack.url}/api/items?id={encoded}").json()
    assert item["id"] == HOSTILE_ID and item["metadata"]["label"] == HOSTILE_LABEL
    assert item["thumbnail_url"] == f"/api/thumbnail?id={encoded}" and "<" not in item["thumbnail_url"]
    found = request(f"{stack.url}/api/search?id={encoded}&k=3").json()
    assert found["query"]["id"] == HOSTILE_ID
    assert request(f"{stack.url}/api/thumbnail?id={encoded}").status == 200
    # As the query of an upload: its own image finds it first, at distance 0.
    first = upload(stack.url, (stack.media / "hostile.png").read_bytes(), k=3).json()["results"][0]
    assert first["id"] == HOSTILE_ID and first["distance"] == pytest.approx(0, abs=1e-3)


# Indexing: off by default; with --allow-indexing, only with the token.


def test_the_gateway_is_read_only_by_default(stack: Stack) -> None:
    reply = request(
        stack.url + "/api/items",
        fields={"id": "new"},
        files={"file": ("q.png", query_digit()[0], "image/png")},
        headers={"Authorization": "Bearer anything"},
    )
    assert reply.status == 403 and "--allow-indexing" in reply.json()["detail"]
    assert request(stack.url + "/api/items?id=new").status == 404


def test_indexing_needs_the_flag_and_the_token(stack: Stack) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        Settings(allow_indexing=True)
    settings = Settings(
        encoder=stack.encoder,
        index=stack.index,
        media_root=stack.media.resolve(),
        allow_indexing=True,
        token=security.Secret(TOKEN),
    )
    data, label = query_digit(9001)
    fields = {"id": "added/by-web.png", "label": label}
    files = {"file": ("q.png", data, "image/png")}

    def add(headers: dict[str, str]) -> Reply:
        return request(gateway.url + "/api/items", headers=headers, fields=fields, files=files)

    with Gateway(settings) as gateway:
        assert request(gateway.url + "/api/config").json()["indexing"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            reply = add(headers)
            assert reply.status == 401, headers
            assert reply.headers["www-authenticate"] == "Bearer" and TOKEN not in reply.body.decode()
        assert request(gateway.url + "/api/items?id=added%2Fby-web.png").status == 404
        reply = add({"Authorization": f"Bearer {TOKEN}"})
        try:
            assert reply.status == 201, reply.body
            assert reply.json() == {"id": "added/by-web.png", "count": INDEXED + SPECIAL + 1}
            item = request(gateway.url + "/api/items?id=added%2Fby-web.png").json()
            assert item["metadata"] == {"label": label} and item["thumbnail_url"] is None
            bad = request(
                gateway.url + "/api/items",
                headers={"Authorization": f"Bearer {TOKEN}"},
                fields={"id": "x"},
                files={"file": ("x.txt", b"text", "text/plain")},
            )
            assert bad.status == 400
        finally:
            stack.search.index.delete(["added/by-web.png"])


# Services down, health, metrics.


def test_a_service_down_gets_503_naming_it(stack: Stack) -> None:
    down = f"127.0.0.1:{free_port()}"
    for settings, service in (
        (Settings(encoder=down, index=stack.index, timeout_s=5), "encoder"),
        (Settings(encoder=stack.encoder, index=down, timeout_s=5), "index"),
    ):
        with Gateway(settings) as gateway:
            reply = upload(gateway.url, query_digit()[0])
            assert reply.status == 503, reply.body
            body = reply.json()
            assert body["service"] == service
            assert f"the {service} service at {down} is not reachable" in body["detail"]
            health = request(gateway.url + "/healthz")
            assert health.status == 503
            assert health.json()[service]["ok"] is False and down in health.json()[service]["detail"]
            assert request(gateway.url + "/api/health").status == 503
            assert healthcheck.main([gateway.url + "/healthz", "--timeout-s", "5"]) == 1
            if service == "index":
                reply = request(gateway.url + "/api/stats")
                assert reply.status == 503 and "index service" in reply.json()["detail"]
                assert request(gateway.url + "/api/search?id=x").status == 503


def test_health(stack: Stack) -> None:
    reply = request(stack.url + "/healthz")
    assert reply.status == 200
    assert reply.json()["ok"] is True and reply.json()["index"]["address"] == stack.index
    assert request(stack.url + "/api/health").json()["encoder"]["ok"] is True
    assert healthcheck.main([stack.url + "/healthz"]) == 0
    assert healthcheck.main([f"http://127.0.0.1:{free_port()}/healthz", "--timeout-s", "2"]) == 1


def test_metrics(stack: Stack) -> None:
    request(stack.url + "/api/stats")
    request(stack.url + "/api/items?id=nope")
    request(stack.url + "/no/such/page")
    reply = request(stack.url + "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert re.search(
        r'imgsearch_http_requests_total\{method="GET",route="/api/stats",status="200"\} \d', text
    )
    assert 'route="/api/items",status="404"' in text
    assert 'route="unmatched",status="404"' in text and "/no/such/page" not in text
    assert 'imgsearch_http_request_seconds_bucket{le="0.1",route="/api/stats"}' in text
    assert "process_cpu_seconds_total" in text


# Settings and the commands.


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMGSEARCH_ENCODER", "dns:///encoder:50051")
    monkeypatch.setenv("IMGSEARCH_INDEX", "index:50052")
    monkeypatch.setenv("IMGSEARCH_MEDIA_ROOT", str(tmp_path))
    monkeypatch.setenv("IMGSEARCH_WEB_MAX_UPLOAD_BYTES", "1000")
    monkeypatch.setenv("IMGSEARCH_TOKEN", TOKEN)
    monkeypatch.setenv("IMGSEARCH_WEB_ALLOW_INDEXING", "1")
    settings = parse_settings(["--port", "9999"])
    assert (settings.encoder, settings.index, settings.port) == ("dns:///encoder:50051", "index:50052", 9999)
    assert settings.media_root == tmp_path.resolve() and settings.max_upload_bytes == 1000
    assert settings.allow_indexing and settings.token is not None and settings.token.value == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in settings.summary()
    assert parse_settings(["--index", "elsewhere:1"]).index == "elsewhere:1", "flags win"
    monkeypatch.delenv("IMGSEARCH_TOKEN")
    with pytest.raises(SystemExit):
        parse_settings([])  # indexing without a token
    monkeypatch.delenv("IMGSEARCH_WEB_ALLOW_INDEXING")
    with pytest.raises(SystemExit):
        parse_settings(["--media-root", str(tmp_path / "nope")])
    assert parse_settings([]).allow_indexing is False


def test_imgsearch_web_is_the_gateways_command(capsys: pytest.CaptureFixture[str]) -> None:
    from imgsearch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["web", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--media-root" in out and "--allow-indexing" in out and "--max-upload-bytes" in out
