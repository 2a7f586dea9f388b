"""The web gateway's test stack: both services in process on free ports (real gRPC, real FAISS), a media
root of sample digits indexed as `imgsearch index` does, and the gateway on a real uvicorn in a thread.

Shared by tests/test_web_api.py and tests/test_web_browser.py."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image

from encoder_service.service import EncoderService
from encoder_service.service import parse_config as encoder_config
from imgsearch.client import ImageSearch
from imgsearch.ingest import collect_images
from index_service.service import IndexService
from index_service.service import parse_config as index_config
from web.app import create_app
from web.settings import Settings

HOSTILE_ID = "<img src=x onerror=alert(1)>"
HOSTILE_LABEL = "<b onmouseover=alert(2)>7</b>"


def start_encoder() -> EncoderService:
    service = EncoderService(encoder_config(["--port", "0", "--host", "127.0.0.1"]))
    service.start()
    return service


def start_index(data_dir: Path) -> IndexService:
    service = IndexService(index_config(["--port", "0", "--host", "127.0.0.1", "--data-dir", str(data_dir)]))
    service.start()
    return service


def address(service: EncoderService | IndexService) -> str:
    return f"127.0.0.1:{service.server.port}"


def index_folder(search: ImageSearch, folder: Path, batch: int = 256) -> int:
    """Indexes every image under the folder as `imgsearch index` would (ids relative to it; metadata
    label = parent folder, source = the absolute path); returns the count stored afterwards."""
    files, _ = collect_images([folder])
    count = 0
    for start in range(0, len(files), batch):
        part = files[start : start + batch]
        count = search.add(
            [f.id for f in part], [f.path.read_bytes() for f in part], [f.metadata for f in part]
        )
    return count


class Gateway:
    """The gateway app on uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, settings: Settings, search: ImageSearch | None = None) -> None:
        self.app = create_app(settings, search)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name="web-gateway", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    *,
    method: str | None = None,
    fields: Mapping[str, str] | None = None,
    files: Mapping[str, tuple[str, bytes, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Reply:
    """One HTTP request with urllib; `fields` and `files` (name -> (filename, data, type)) make a
    multipart/form-data POST. HTTP errors come back as replies, not exceptions."""
    body = None
    all_headers = dict(headers or {})
    if fields is not None or files is not None:
        boundary = uuid.uuid4().hex
        buffer = io.BytesIO()
        for name, value in (fields or {}).items():
            buffer.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            buffer.write(value.encode() + b"\r\n")
        for name, (filename, data, content_type) in (files or {}).items():
            buffer.write(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n".encode()
            )
            buffer.write(data + b"\r\n")
        buffer.write(f"--{boundary}--\r\n".encode())
        body = buffer.getvalue()
        all_headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    call = urllib.request.Request(url, data=body, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as reply:
            return Reply(reply.status, dict(reply.headers.items()), reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, dict(error.headers.items()), error.read())


def png(pixels: np.ndarray) -> bytes:
    """A uint8 [h, w] array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
