"""The web gateway's request log and request ids (web/requestlog.py), over real HTTP (uvicorn): one DEBUG
line per answered request, a WARNING line with the request id and the error's detail from status 400 up,
the id taken from X-Request-Id or made and echoed in the reply, JSON lines with the same keys as the
services' (`--log-format json`), and `python -m web` configuring the logging through
imgsearch_server.serving.configure_logging with uvicorn's access log off.

The index runs in process (an empty FAISS index); the encoder is an address where nothing listens, so a
search by upload gets 503."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from imgsearch_server import serving
from index_service.service import IndexService
from tests.support import Gateway, Reply, address, mnist_sample, png, request, start_index
from tools.local import free_port
from web import server
from web.requestlog import request_log
from web.settings import Settings, parse_settings

LOGGER = request_log.name
GENERATED = re.compile(r"[0-9a-f]{16}")
MAX_UPLOAD = 4096


@dataclass
class Stack:
    url: str
    index: IndexService
    encoder: str  # nobody listens there


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    index = start_index(tmp_path_factory.mktemp("web-logs"))
    down = f"127.0.0.1:{free_port()}"
    try:
        settings = Settings(encoder=down, index=address(index), timeout_s=5, max_upload_bytes=MAX_UPLOAD)
        with Gateway(settings) as gateway:
            yield Stack(gateway.url, index, down)
    finally:
        index.stop(0)


def eventually(found: Callable[[], list[Any]], count: int = 1, timeout_s: float = 10.0) -> list[Any]:
    """What `found` returns once it holds `count` items: the client may have the reply before the
    middleware, after sending it, writes its line."""
    deadline = time.monotonic() + timeout_s
    while True:
        items = found()
        if len(items) >= count or time.monotonic() > deadline:
            return items
        time.sleep(0.01)


def lines_for(caplog: pytest.LogCaptureFixture, request_id: str, count: int = 1) -> list[logging.LogRecord]:
    def found() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == LOGGER and getattr(r, "fields", {}).get("request_id") == request_id
        ]

    return eventually(found, count)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, "fields", None)
    assert isinstance(found, dict)
    return found


def upload(url: str, data: bytes, headers: dict[str, str] | None = None) -> Reply:
    return request(f"{url}/api/search", files={"file": ("q.png", data, "image/png")}, headers=headers)


def test_one_debug_line_per_ok_request(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ids = []
    for path in ("/api/config", "/api/stats", "/api/stats", "/"):
        reply = request(stack.url + path)
        assert reply.status == 200
        ids.append(reply.headers["x-request-id"])
    assert all(GENERATED.fullmatch(rid) for rid in ids) and len(set(ids)) == len(ids), "a new id each"
    for path, rid in zip(("/api/config", "/api/stats", "/api/stats", "/"), ids, strict=True):
        (line,) = lines_for(caplog, rid)
        assert line.levelno == logging.DEBUG
        assert fields(line)["method"] == "GET" and fields(line)["status"] == 200
        assert fields(line)["route"] == path and fields(line)["path"] == path
        assert fields(line)["client"].startswith("127.0.0.1:") and fields(line)["duration_ms"] > 0
        assert "details" not in fields(line)
        assert line.getMessage().startswith(f"GET {path} 200 ") and f"request_id={rid} " in line.getMessage()


def test_a_given_request_id_is_used_and_echoed(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    reply = request(stack.url + "/api/stats", headers={"X-Request-Id": "req-42.a"})
    assert reply.status == 200 and reply.headers["x-request-id"] == "req-42.a"
    (line,) = lines_for(caplog, "req-42.a")
    assert line.levelno == logging.DEBUG and "request_id=req-42.a" in line.getMessage()
    # an id that is no plain token of up to 128 characters is replaced, never logged
    for bad in ("x" * 129, "two words", "semi;colon"):
        reply = request(stack.url + "/api/stats", headers={"X-Request-Id": bad})
        assert GENERATED.fullmatch(reply.headers["x-request-id"]), bad
        assert len(lines_for(caplog, reply.headers["x-request-id"])) == 1
    assert not any("x" * 129 in r.getMessage() or "two words" in r.getMessage() for r in caplog.records)
    longest = "a" * 128
    assert (
        request(stack.url + "/api/config", headers={"X-Request-Id": longest}).headers["x-request-id"]
        == longest
    )


@pytest.mark.parametrize(
    "path,status,route,detail",
    [
        ("/api/items?id=nope", 404, "/api/items", "no item with id 'nope'"),  # from the index service
        ("/no/such/page", 404, "unmatched", "Not Found"),
        ("/api/search?id=x&k=0", 422, "/api/search", "k: "),
    ],
)
def test_errors_are_warnings_with_the_request_id_and_detail(
    stack: Stack, caplog: pytest.LogCaptureFixture, path: str, status: int, route: str, detail: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reply = request(stack.url + path, headers={"X-Request-Id": f"err-{status}"})
    assert reply.status == status and reply.headers["x-request-id"] == f"err-{status}"
    (line,) = lines_for(caplog, f"err-{status}")
    assert line.levelno == logging.WARNING
    assert fields(line)["status"] == status and fields(line)["route"] == route
    assert fields(line)["path"] == path.partition("?")[0], "the path, never the query"
    assert detail in fields(line)["details"] and detail in line.getMessage()
    assert f"request_id=err-{status}" in line.getMessage()


def test_an_empty_upload_is_a_400_warning(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reply = upload(stack.url, b"", headers={"X-Request-Id": "empty-1"})
    assert reply.status == 400
    (line,) = lines_for(caplog, "empty-1")
    assert line.levelno == logging.WARNING and fields(line)["method"] == "POST"
    assert "the upload is empty" in fields(line)["details"]


def test_an_upload_over_the_limit_is_logged_and_tagged(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The body limit answers before the app: the outermost middleware still tags and logs it."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reply = upload(stack.url, b"\0" * (MAX_UPLOAD + 128 * 1024), headers={"X-Request-Id": "big-1"})
    assert reply.status == 413 and reply.headers["x-request-id"] == "big-1"
    (line,) = lines_for(caplog, "big-1")
    assert line.levelno == logging.WARNING and "over the limit" in fields(line)["details"]


def test_a_service_down_gets_503_with_the_request_id(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reply = upload(stack.url, png(mnist_sample(1)[0][0]))
    assert reply.status == 503
    rid = reply.headers["x-request-id"]
    assert reply.json()["request_id"] == rid and reply.json()["service"] == "encoder"
    (line,) = lines_for(caplog, rid)
    assert line.levelno == logging.WARNING and fields(line)["status"] == 503
    assert f"the encoder service at {stack.encoder} is not reachable" in fields(line)["details"]
    # health answers 503 too: its line says what is not serving
    health = request(stack.url + "/healthz", headers={"X-Request-Id": "health-1"})
    assert health.status == 503
    (line,) = lines_for(caplog, "health-1")
    assert line.levelno == logging.WARNING and fields(line)["details"].startswith("encoder: ")
    assert "index:" not in fields(line)["details"], "the index is serving"


def test_nothing_is_logged_below_the_level(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    ok = request(stack.url + "/api/config", headers={"X-Request-Id": "quiet-ok"})
    missing = request(stack.url + "/nope", headers={"X-Request-Id": "quiet-404"})
    assert ok.headers["x-request-id"] == "quiet-ok" and missing.headers["x-request-id"] == "quiet-404"
    assert len(lines_for(caplog, "quiet-404")) == 1  # logged after the OK request's turn: none came
    assert not [r for r in caplog.records if "quiet-ok" in r.getMessage()]


def test_json_lines_carry_the_fields(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    serving.configure_logging("json", "DEBUG")
    try:
        request(stack.url + "/api/stats", headers={"X-Request-Id": "json-ok"})
        request(stack.url + "/api/items?id=nope", headers={"X-Request-Id": "json-404"})

        def logged() -> list[dict[str, Any]]:
            err = capsys.readouterr().err
            seen.extend(json.loads(line) for line in err.splitlines() if line.startswith("{"))
            return [
                line for line in seen if line["logger"] == LOGGER and line["request_id"].startswith("json-")
            ]

        seen: list[dict[str, Any]] = []
        lines = eventually(logged, 2)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert [(line["request_id"], line["severity"], line["status"]) for line in lines] == [
        ("json-ok", "DEBUG", 200),
        ("json-404", "WARNING", 404),
    ]
    for line in lines:
        assert line["method"] == "GET" and line["client"].startswith("127.0.0.1:")
        assert line["duration_ms"] > 0 and line["request_id"] in line["message"]
        assert {"timestamp", "route", "path"} <= set(line)
    assert lines[0]["route"] == "/api/stats" and "details" not in lines[0]
    assert lines[1]["details"] == "no item with id 'nope'"


# The settings and `python -m web`.


def test_log_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IMGSEARCH_LOG_FORMAT", "IMGSEARCH_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    settings = parse_settings([])
    assert (settings.log_format, settings.log_level) == ("text", "info")
    monkeypatch.setenv("IMGSEARCH_LOG_FORMAT", "JSON")
    monkeypatch.setenv("IMGSEARCH_LOG_LEVEL", "DEBUG")
    settings = parse_settings([])
    assert (settings.log_format, settings.log_level) == ("json", "debug")
    assert parse_settings(["--log-format", "text", "--log-level", "warning"]).log_format == "text", (
        "flags win"
    )
    with pytest.raises(SystemExit):
        parse_settings(["--log-format", "xml"])
    monkeypatch.setenv("IMGSEARCH_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit):
        parse_settings([])  # a bad env value fails as a bad flag does
    monkeypatch.setenv("IMGSEARCH_LOG_FORMAT", "text")
    monkeypatch.setenv("IMGSEARCH_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        parse_settings([])


def test_the_server_logs_through_configure_logging_without_an_access_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    ran: dict[str, Any] = {}

    def run(app: Any, **options: Any) -> None:
        ran.update(options)
        app.state.search.close()  # the lifespan would

    monkeypatch.setattr(uvicorn, "run", run)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    chatty = {name: logging.getLogger(name).level for name in server.CHATTY}
    try:
        assert server.main(["--log-format", "json", "--log-level", "debug", "--port", "0"]) == 0
        (handler,) = root.handlers
        assert root.level == logging.DEBUG
        assert type(handler.formatter).__name__ == "_JsonFormatter", "the services' JSON lines"
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in server.CHATTY)
        record = logging.LogRecord(LOGGER, logging.DEBUG, __file__, 1, "x", None, None)
        record.fields = {"request_id": "r1", "status": 200}
        assert json.loads(handler.format(record))["request_id"] == "r1"
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, was in chatty.items():
            logging.getLogger(name).setLevel(was)
    assert ran["access_log"] is False, "the request log replaces uvicorn's access log"
    assert ran["log_config"] is None, "uvicorn's loggers go through the root handler"
    assert ran["log_level"] == "debug"
