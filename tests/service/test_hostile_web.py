"""The web gateway against hostile callers (issue 12), over real HTTP on the uvicorn config `python -m web`
runs: the optional read token on every /api/ route (header or cookie; /healthz, /metrics and the page stay
open), `source` paths kept out of every reply unless --show-source, and slow or idle clients cut off (a
slowloris request head, a slow body, an idle keep-alive connection), with a cap on connections.

Both services run in process (real gRPC, real FAISS) on a few sample digits; the slow-client checks use raw
sockets against a gateway with short timeouts."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn

from encoder_service.service import EncoderService
from encoder_service.service import parse_config as encoder_config
from imgsearch import security
from imgsearch.client import ImageSearch
from index_service.service import IndexService
from index_service.service import parse_config as index_config
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
from web.app import create_app
from web.connections import TimedH11Protocol
from web.settings import Settings, parse_settings

INDEXED = 20
READ_TOKEN = "r3ad+T0ken/=;x"  # characters a cookie must carry percent-encoded
INDEXING_TOKEN = "indexing-s3cret"
COOKIE = "imgsearch_read_token"
# Short limits for the slow-client checks; the margin is what a busy 2-core machine may add to a timer.
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
MARGIN_S = 2.0


@dataclass
class Stack:
    encoder: str
    index: str
    search: ImageSearch
    media: Path
    item: str  # an indexed id whose source lies in the media root
    query: bytes  # a PNG that is not indexed

    def settings(self, **changes: object) -> Settings:
        base = Settings(
            encoder=self.encoder,
            index=self.index,
            host="127.0.0.1",
            port=0,
            media_root=self.media.resolve(),
            log_level="warning",
        )
        return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile-web")
    media = tmp / "media"
    write_digits(media / "digits", INDEXED)
    encoder, index = start_encoder(), start_index(tmp / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")
        item = "3/00007.png"  # sample 7 is a 3
        assert search.index.get([item])[0], "the sample changed"
        yield Stack(address(encoder), address(index), search, media, item, png(mnist_sample(1, 9000)[0][0]))
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


class ServedGateway(Gateway):
    """tests.support.Gateway on the uvicorn config of `python -m web` (web.server.uvicorn_config): its
    connection timeouts, its connection cap, its protocol."""

    def __init__(self, settings: Settings) -> None:
        from web.server import uvicorn_config

        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings))
        self.thread = threading.Thread(target=self.server.run, name="web-gateway", daemon=True)
        self.port = 0


@pytest.fixture(scope="module")
def guarded(stack: Stack) -> Iterator[str]:
    """A gateway that needs the read token, and takes the indexing token for POST /api/items."""
    settings = stack.settings(
        read_token=security.Secret(READ_TOKEN),
        allow_indexing=True,
        token=security.Secret(INDEXING_TOKEN),
    )
    with ServedGateway(settings) as gateway:
        yield gateway.url


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={quote(token, safe='')}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload(url: str, data: bytes, headers: dict[str, str] | None = None) -> Reply:
    return request(f"{url}/api/search", files={"file": ("q.png", data, "image/png")}, headers=headers)


# The read token.

API_PATHS = [
    "/api/config",
    "/api/stats",
    "/api/health",
    "/api/search?id=3%2F00007.png&k=3",
    "/api/items?id=3%2F00007.png",
    "/api/thumbnail?id=3%2F00007.png",
    "/api/openapi.json",
    "/api/no/such/route",
]


def test_without_a_read_token_configured_the_api_is_open(stack: Stack) -> None:
    with ServedGateway(stack.settings()) as gateway:
        assert request(gateway.url + "/api/stats").status == 200
        assert upload(gateway.url, stack.query).status == 200


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), cookie("wrong"), {"Authorization": READ_TOKEN}, bearer(READ_TOKEN[:-1])],
    ids=["none", "wrong-bearer", "wrong-cookie", "no-scheme", "prefix"],
)
def test_every_api_route_needs_the_read_token(guarded: str, stack: Stack, headers: dict[str, str]) -> None:
    for path in API_PATHS:
        reply = request(guarded + path, headers=headers)
        assert reply.status == 401, (path, reply.status, reply.body[:200])
        body = reply.json()
        assert "read token" in body["detail"] and body["auth"] == "read-token", body
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert READ_TOKEN not in reply.body.decode()
    assert upload(guarded, stack.query, headers).status == 401


def test_the_read_token_opens_the_api_by_header_or_cookie(guarded: str, stack: Stack) -> None:
    for headers in (bearer(READ_TOKEN), cookie(READ_TOKEN)):
        for path in API_PATHS[:-1]:
            reply = request(guarded + path, headers=headers)
            assert reply.status == 200, (path, headers, reply.body[:200])
        assert request(guarded + API_PATHS[-1], headers=headers).status == 404
        found = upload(guarded, stack.query, headers)
        assert found.status == 200 and found.json()["results"]
    # the cookie is what an <img src> of the page carries
    thumbnail = request(
        f"{guarded}/api/thumbnail?id={quote(stack.item, safe='')}", headers=cookie(READ_TOKEN)
    )
    assert thumbnail.status == 200 and thumbnail.headers["content-type"] == "image/png"
    assert "private" in thumbnail.headers["cache-control"], "no shared cache may keep a guarded image"


def test_health_metrics_and_the_page_stay_open(guarded: str) -> None:
    for path in ("/", "/healthz", "/metrics", "/static/app.js", "/static/style.css"):
        assert request(guarded + path).status == 200, path


def test_indexing_still_takes_its_own_token(guarded: str, stack: Stack) -> None:
    files = {"file": ("q.png", stack.query, "image/png")}

    def add(headers: dict[str, str]) -> Reply:
        return request(guarded + "/api/items", headers=headers, fields={"id": "hostile/added"}, files=files)

    try:
        assert add({}).json().get("auth") == "read-token"
        refused = add({**cookie(READ_TOKEN), **bearer("wrong")})
        assert refused.status == 401 and "invalid token" in refused.json()["detail"]
        assert add(bearer(READ_TOKEN)).status == 401, "the read token never writes"
        # the indexing token reads too: the page's add form sends it with the read cookie, curl alone
        assert add(bearer(INDEXING_TOKEN)).status == 201
        assert add({**cookie(READ_TOKEN), **bearer(INDEXING_TOKEN)}).status == 201
    finally:
        stack.search.index.delete(["hostile/added"])


def test_read_token_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable in (
        "IMGSEARCH_WEB_READ_TOKEN",
        "IMGSEARCH_WEB_READ_TOKEN_FILE",
        "IMGSEARCH_WEB_SHOW_SOURCE",
    ):
        monkeypatch.delenv(variable, raising=False)
    assert parse_settings([]).read_token is None
    settings = parse_settings(["--read-token", READ_TOKEN])
    assert settings.read_token is not None and settings.read_token.value == READ_TOKEN
    assert READ_TOKEN not in repr(settings) and READ_TOKEN not in settings.summary()
    assert "read token set" in settings.summary()
    token_file = tmp_path / "read_token"
    token_file.write_text(f"  {READ_TOKEN}\n")
    from_file = parse_settings(["--read-token-file", str(token_file)]).read_token
    assert from_file is not None and from_file.value == READ_TOKEN
    monkeypatch.setenv("IMGSEARCH_WEB_READ_TOKEN_FILE", str(token_file))
    from_env = parse_settings([]).read_token
    assert from_env is not None and from_env.value == READ_TOKEN
    monkeypatch.setenv("IMGSEARCH_WEB_READ_TOKEN", "from-env")
    from_env = parse_settings([]).read_token
    assert from_env is not None and from_env.value == "from-env", "the token wins over its file, as --token"
    with pytest.raises(SystemExit):
        parse_settings(["--read-token", "a", "--read-token-file", str(token_file)])
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit):
        parse_settings(["--read-token-file", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="must differ"):  # whoever may read could write
        Settings(allow_indexing=True, token=security.Secret("same"), read_token=security.Secret("same"))


def test_the_token_help_says_to_send_the_services_read_token(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--read-token" in out and "--read-token-file" in out and "--show-source" in out
    assert "read-only token" in out


def test_the_gateway_runs_on_the_services_read_only_token(tmp_path: Path) -> None:
    """Both services with a full and a read-only token (their --read-token), the gateway sending the
    read-only one: every page call passes (Embed, Reconstruct, Search, Get, Stats, health); an upsert
    through it is refused by the index (PERMISSION_DENIED, 502 saying why)."""
    tokens = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--auth-token",
        INDEXING_TOKEN,
        "--read-token",
        READ_TOKEN,
    ]
    encoder = EncoderService(encoder_config(tokens))
    index = IndexService(index_config([*tokens, "--data-dir", str(tmp_path / "index")]))
    media = write_digits(tmp_path / "media", 10)
    with ExitStack() as running:
        for service in (encoder, index):
            service.start()
            running.callback(service.stop, 0)
        with ImageSearch(address(encoder), address(index), 30, token=INDEXING_TOKEN) as writer:
            index_folder(writer, media)
        settings = Settings(
            encoder=address(encoder),
            index=address(index),
            media_root=media.resolve(),
            token=security.Secret(READ_TOKEN),
            log_level="warning",
        )
        query = png(mnist_sample(1, 9000)[0][0])
        with ServedGateway(replace(settings, host="127.0.0.1", port=0)) as gateway:
            for path in (
                "/api/stats",
                "/healthz",
                "/api/search?id=3%2F00007.png&k=3",
                "/api/thumbnail?id=3%2F00007.png",
            ):
                assert request(gateway.url + path).status == 200, path
            item = request(gateway.url + "/api/items?id=3%2F00007.png").json()
            assert item["view"]["input"] and item["view"]["reconstruction"], item["view"]
            assert upload(gateway.url, query).json()["query"]["reconstruction"]
        # Misconfigured: indexing on with the read-only token. The index refuses the write.
        with ServedGateway(replace(settings, port=0, allow_indexing=True)) as gateway:
            refused = request(
                gateway.url + "/api/items",
                fields={"id": "x"},
                files={"file": ("q.png", query, "image/png")},
                headers=bearer(READ_TOKEN),
            )
            assert refused.status == 502 and "full token" in refused.json()["detail"], refused.body[:300]


# `source` paths: kept on the gateway unless --show-source.


def sources_in(found: object) -> list[str]:
    """Every `source` value anywhere in a JSON reply."""
    if isinstance(found, dict):
        return [
            *([str(found["source"])] if "source" in found else []),
            *(s for value in found.values() for s in sources_in(value)),
        ]
    if isinstance(found, list):
        return [s for value in found for s in sources_in(value)]
    return []


def replies(url: str, stack: Stack) -> list[Reply]:
    encoded = quote(stack.item, safe="")
    return [
        request(f"{url}/api/search?id={encoded}&k=5"),
        request(f"{url}/api/items?id={encoded}"),
        upload(url, stack.query),
    ]


def test_source_paths_are_hidden_by_default(stack: Stack) -> None:
    with ServedGateway(stack.settings()) as gateway:
        for reply in replies(gateway.url, stack):
            assert reply.status == 200, reply.body[:200]
            assert sources_in(reply.json()) == [], reply.body[:300]
            assert str(stack.media) not in reply.body.decode() and "digits/" not in reply.body.decode()
        item = request(f"{gateway.url}/api/items?id={quote(stack.item, safe='')}").json()
        assert item["metadata"] == {"label": "3"}
        assert item["view"]["input"], "the gateway still reads the source itself"
        assert item["thumbnail_url"] == f"/api/thumbnail?id={quote(stack.item, safe='')}", "by id, no path"
        assert request(gateway.url + item["thumbnail_url"]).status == 200


def test_show_source_shows_them(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSEARCH_WEB_SHOW_SOURCE", raising=False)
    assert parse_settings([]).show_source is False
    assert parse_settings(["--show-source"]).show_source is True
    monkeypatch.setenv("IMGSEARCH_WEB_SHOW_SOURCE", "yes")
    assert parse_settings([]).show_source is True
    with ServedGateway(stack.settings(show_source=True)) as gateway:
        for reply in replies(gateway.url, stack):
            assert reply.status == 200 and sources_in(reply.json()), reply.body[:200]
        item = request(f"{gateway.url}/api/items?id={quote(stack.item, safe='')}").json()
        assert Path(item["metadata"]["source"]) == stack.media / "digits" / stack.item


# Slow and idle clients.


@pytest.fixture(scope="module")
def impatient(stack: Stack) -> Iterator[Gateway]:
    settings = stack.settings(
        header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S, keep_alive_timeout_s=KEEP_ALIVE_S
    )
    with ServedGateway(settings) as gateway:
        yield gateway


def until_closed(
    sock: socket.socket, drip: list[bytes], every_s: float, limit_s: float
) -> tuple[float, bytes]:
    """Sends `drip` one piece every `every_s` while reading; returns (seconds until the server closed the
    connection, what it sent), or fails once `limit_s` passed with the connection still open."""
    started = time.monotonic()
    received = b""
    pieces = list(drip)
    next_send = started
    sock.settimeout(0.05)
    while time.monotonic() - started < limit_s:
        if pieces and time.monotonic() >= next_send:
            try:
                sock.sendall(pieces.pop(0))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, received
            next_send += every_s
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started, received
        if not data:
            return time.monotonic() - started, received
        received += data
    pytest.fail(f"the connection was still open after {limit_s:.1f} s (received {received[:80]!r})")


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=5)


def test_a_request_head_sent_slowly_is_cut_off(impatient: Gateway) -> None:
    """Slowloris: the request line, then a header byte every 0.25 s, never the blank line."""
    with connect(impatient) as sock:
        drip = [b"GET /api/stats HTTP/1.1\r\nHost: x\r\n", *([b"X"] * 100)]
        took, sent = until_closed(sock, drip, 0.25, HEADER_TIMEOUT_S + MARGIN_S)
    assert took >= HEADER_TIMEOUT_S - 0.2, f"closed too early: {took:.2f} s"
    assert sent.startswith(b"HTTP/1.1 408 "), sent[:100]


def test_a_connection_that_sends_nothing_is_closed(impatient: Gateway) -> None:
    with connect(impatient) as sock:
        took, sent = until_closed(sock, [], 1, HEADER_TIMEOUT_S + MARGIN_S)
    assert took >= HEADER_TIMEOUT_S - 0.2 and sent == b"", (took, sent[:100])


def test_a_body_sent_slowly_is_cut_off(impatient: Gateway) -> None:
    """The head at once, then the declared body a few bytes every 0.25 s."""
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    with connect(impatient) as sock:
        took, sent = until_closed(sock, [head, *([b"\x00" * 8] * 100)], 0.25, BODY_TIMEOUT_S + MARGIN_S)
    assert took >= BODY_TIMEOUT_S - 0.2, f"closed too early: {took:.2f} s"
    assert sent.startswith(b"HTTP/1.1 408 "), sent[:100]
    assert b"--body-timeout-s" in sent, sent


def test_a_body_nobody_reads_is_cut_off_too(stack: Stack) -> None:
    """The reply goes out before the body (401: no read token); the rest of the body, dripped, gets
    --body-timeout-s more, then the connection is closed."""
    settings = stack.settings(
        read_token=security.Secret(READ_TOKEN),
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    head = b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nContent-Type: image/png\r\n\r\n"
    with ServedGateway(settings) as gateway, connect(gateway) as sock:
        took, sent = until_closed(sock, [head, *([b"\x00" * 8] * 100)], 0.25, BODY_TIMEOUT_S + MARGIN_S)
    assert sent.startswith(b"HTTP/1.1 401 "), sent[:100]
    assert took >= BODY_TIMEOUT_S - 0.2, f"closed too early: {took:.2f} s"


def test_an_idle_keep_alive_connection_is_closed(impatient: Gateway) -> None:
    with connect(impatient) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        took, sent = until_closed(sock, [], 1, KEEP_ALIVE_S + MARGIN_S + 5)
    head, _, _ = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), sent[:100]
    assert took >= KEEP_ALIVE_S - 0.2, f"closed too early: {took:.2f} s"
    assert took <= KEEP_ALIVE_S + MARGIN_S + 2, f"closed too late: {took:.2f} s (the reply takes a moment)"


def test_normal_requests_still_work_and_keep_alive(impatient: Gateway, stack: Stack) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", impatient.port, timeout=10)
    try:
        for path in ("/api/stats", "/healthz", "/api/config"):
            connection.request("GET", path)
            reply = connection.getresponse()
            assert reply.status == 200, path
            reply.read()
            time.sleep(KEEP_ALIVE_S / 3)  # well inside the idle limit: the same connection serves on
        assert connection.sock is not None, "the connection was kept"
    finally:
        connection.close()
    assert upload(impatient.url, stack.query).status == 200


def test_connections_are_capped(stack: Stack) -> None:
    """Past --max-connections connections (or requests in flight) a request gets 503 at once."""
    with ServedGateway(stack.settings(max_connections=3)) as gateway, ExitStack() as held:
        for _ in range(3):
            held.enter_context(connect(gateway))
        time.sleep(0.2)  # the server has accepted them
        assert request(gateway.url + "/api/stats").status == 503
        held.close()
        time.sleep(0.2)
        assert request(gateway.url + "/api/stats").status == 200


def test_connection_defaults(stack: Stack) -> None:
    from web.server import uvicorn_config

    settings = Settings()
    assert settings.keep_alive_timeout_s == 5
    assert settings.header_timeout_s == 10
    assert settings.body_timeout_s == 30
    assert settings.max_connections == 200
    app = create_app(stack.settings())
    config = uvicorn_config(app, settings)
    app.state.search.close()  # the lifespan, which never runs here, would
    assert config.limit_concurrency == 200
    assert config.timeout_keep_alive == 5
    protocol = config.http
    assert isinstance(protocol, type) and issubclass(protocol, TimedH11Protocol)
    assert protocol.timeouts.header_s == 10 and protocol.timeouts.body_s == 30
    parsed = parse_settings(
        [
            "--keep-alive-timeout-s",
            "2",
            "--header-timeout-s",
            "3",
            "--body-timeout-s",
            "4",
            "--max-connections",
            "50",
        ]
    )
    assert (parsed.keep_alive_timeout_s, parsed.header_timeout_s, parsed.body_timeout_s) == (2, 3, 4)
    assert parsed.max_connections == 50
    for flag in ("--header-timeout-s", "--body-timeout-s", "--keep-alive-timeout-s", "--max-connections"):
        with pytest.raises(SystemExit):
            parse_settings([flag, "0"])
