"""What the tests share: images made here and the MNIST sample, services started in process on free
ports, the index backends, metrics scraping, reference k-NN and the web gateway's stack. No test
imports another test; they all import from here."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from encoder_service.service import EncoderService
from encoder_service.service import parse_config as encoder_config
from imgsearch.client import EncoderClient, ImageSearch, IndexClient
from imgsearch.ingest import collect_images
from imgsearch.v1 import index_pb2, vectors_pb2
from imgsearch_server import metrics
from index_service.service import IndexService
from index_service.service import parse_config as index_config
from web.app import create_app
from web.settings import Settings

ROOT = Path(__file__).resolve().parents[1]  # the repository
Served = TypeVar("Served", EncoderService, IndexService)
Connected = TypeVar("Connected", EncoderClient, IndexClient)

# ---- images

SAMPLE = ROOT / "encoder_service" / "data" / "mnist-10k.npz"


def mnist_sample(count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x uint8 [count, 28, 28], y) from the sample shipped in the repo."""
    with np.load(SAMPLE) as data:
        return data["x"][start : start + count], data["y"][start : start + count]


def glyph(size: tuple[int, int] = (120, 160), light_background: bool = False) -> Image.Image:
    """Returns an L-mode image of a thick '7'-like stroke."""
    image = Image.new("L", size, 255 if light_background else 0)
    draw = ImageDraw.Draw(image)
    w, h = size
    ink = 0 if light_background else 255
    draw.line([(w * 0.2, h * 0.2), (w * 0.8, h * 0.2), (w * 0.4, h * 0.85)], fill=ink, width=max(2, w // 10))
    return image


def encode(image: Image.Image, format_name: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def write_digits(folder: Path, count: int, start: int = 0, digits: int = 5) -> Path:
    """Writes `count` sample digits as folder/<label>/<number>.png (numbered from `start`); returns folder."""
    x, y = mnist_sample(count, start)
    for n, (digit, label) in enumerate(zip(x, y, strict=True), start=start):
        path = folder / str(label) / f"{n:0{digits}d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(path)
    return folder


# ---- services in process and the index backends


MILVUS_MISSING = any(importlib.util.find_spec(name) is None for name in ("pymilvus", "milvus_lite"))


MILVUS_SKIP = pytest.mark.skipif(
    MILVUS_MISSING, reason="pymilvus and milvus-lite are not installed: pip install -e '.[milvus]'"
)


# The `milvus` package (PyPI, 2.3.5, in the dev extra): a real Milvus standalone server, embedded.
MILVUS_SERVER_MISSING = any(importlib.util.find_spec(name) is None for name in ("pymilvus", "milvus"))


MILVUS_SERVER_SKIP = pytest.mark.skipif(
    MILVUS_SERVER_MISSING,
    reason="the Milvus server backend needs pymilvus and the `milvus` package (an embedded Milvus 2.3.5 "
    "server), which are not installed: pip install -c constraints.txt -e '.[milvus,dev]'",
)


# `make test-fast` (IMGSEARCH_FAST_TESTS=1): the quick loop for edits; the slowest parts wait for `make test`.
FAST = os.environ.get("IMGSEARCH_FAST_TESTS", "") not in ("", "0")

# The index backends the behaviour tests run on: FAISS, Milvus Lite (a local file) and a Milvus server.
BACKENDS = [
    "faiss",
    pytest.param("milvus", marks=MILVUS_SKIP),
    pytest.param("milvus-server", marks=MILVUS_SERVER_SKIP),
]


every_backend = pytest.mark.parametrize("backend", BACKENDS)


def start_index(data_dir: Path, *extra: str) -> IndexService:
    service = IndexService(
        index_config(["--port", "0", "--host", "127.0.0.1", "--data-dir", str(data_dir), *extra])
    )
    service.start()
    return service


class MilvusLite:
    """One Milvus Lite file for the session; a store kept open on it keeps its server up between tests."""

    def __init__(self, uri: str) -> None:
        from index_service.milvus_store import MilvusStore

        self.uri = uri
        self._keeper = MilvusStore(uri, "keeper")
        self._names = itertools.count()

    def new_collection(self) -> str:
        return f"test_{next(self._names)}"

    def drop(self, name: str) -> None:
        drop_milvus_collections(self.uri, name)

    def close(self) -> None:
        self._keeper.close()


def drop_milvus_collections(uri: str, prefix: str) -> None:
    """Drops every collection and alias an index service with --milvus-collection `prefix` made."""
    from index_service.milvus_store import MilvusCollections

    collections = MilvusCollections(uri, prefix)
    try:
        collections.remove_everything()
    finally:
        collections.close()


def start_encoder(*extra: str) -> EncoderService:
    service = EncoderService(encoder_config(["--port", "0", "--host", "127.0.0.1", *extra]))
    service.start()
    return service


def address(service: EncoderService | IndexService) -> str:
    return f"127.0.0.1:{service.server.port}"


def serve(service: Served) -> Iterator[Served]:
    """A fixture's body: yields the started service and stops it (no grace) afterwards."""
    try:
        yield service
    finally:
        service.stop(0)


def connect(
    kind: type[Connected], service: EncoderService | IndexService, timeout_s: float = 30.0
) -> Iterator[Connected]:
    """A fixture's body: yields a client of `kind` for the service, closed afterwards."""
    client = kind(address(service), timeout_s=timeout_s)
    try:
        yield client
    finally:
        client.close()


# ---- test data and references


BIG = encode(glyph((1500, 1500)).convert("RGB"), "PNG")  # small to send, slow to decode and fit


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (indices, Euclidean distances) of the k nearest rows of base, ranked as cdist would."""
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - base[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


def random_items(count: int, dim: int, seed: int = 0) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return [f"img/{n}.png" for n in range(count)], vectors, [{"label": str(n % 10)} for n in range(count)]


def packed(array: np.ndarray) -> vectors_pb2.Vectors:
    return vectors_pb2.Vectors(dim=array.shape[1], data=array.astype("<f4").tobytes())


def upsert_one(
    vectors: np.ndarray, ids: list[str] | None = None, metadata: dict[str, str] | None = None
) -> index_pb2.UpsertRequest:
    return index_pb2.UpsertRequest(
        ids=ids or ["a"],
        vectors=packed(vectors),
        model_version="m1",
        metadata=[index_pb2.Metadata(entries=metadata)] if metadata is not None else [],
    )


# ---- metrics


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int | None) -> Samples:
    """Every sample of http://127.0.0.1:PORT/metrics, by (name, labels)."""
    assert port, "the service serves no metrics"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample, labels in samples if sample == name]


def requests(samples: Samples, service: str, method: str, code: str) -> float | None:
    return value(samples, metrics.GRPC_REQUESTS, service=service, method=method, code=code)


# ---- the web gateway's stack


HOSTILE_ID = "<img src=x onerror=alert(1)>"


HOSTILE_LABEL = "<b onmouseover=alert(2)>7</b>"


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


# ---- the images' Dockerfile: one builder stage, a target per image

DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_instructions(dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """Returns (INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def dockerfile_stages(dockerfile: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, its FROM first, by the name `FROM image AS name` gives it (a stage
    without one by its number, as `--target` and `COPY --from` know it)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in dockerfile_instructions(dockerfile):
        if keyword == "FROM":
            words = args.split()
            named = len(words) >= 3 and words[-2].upper() == "AS"
            name = words[-1] if named else str(len(stages))
            assert name not in stages, f"{dockerfile}: two stages named {name}"
            current = stages[name] = []
        assert current is not None, f"{dockerfile}: {keyword} before the first FROM"
        current.append((keyword, args))
    return stages


def dockerfile_stage(target: str, dockerfile: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """The instructions of the stage `docker build --target <target>` ends with, its FROM first."""
    stages = dockerfile_stages(dockerfile)
    assert target in stages, f"{dockerfile}: no stage {target!r}, only {sorted(stages)}"
    return stages[target]


def write_photo_model(folder: Path, shape: tuple[int, int, int] = (32, 32, 3)) -> Path:
    """Writes into `folder` an untrained `wide` autoencoder for `shape` (a colour input by default) with its
    card (preprocess `photo`) and decoder: a photo model to serve, built in seconds."""
    import keras

    from encoder_service.export import write_decoder
    from encoder_service.model import build_autoencoder, model_version
    from encoder_service.model_dir import (
        AUTOENCODER_KERAS,
        CARD_JSON,
        ENCODER_KERAS,
        ENCODER_TFLITE,
        check_tflite,
        to_tflite,
    )

    keras.utils.set_random_seed(0)
    autoencoder, encoder = build_autoencoder("wide", shape)
    x = np.random.default_rng(0).random((8, *shape)).astype(np.float32)
    autoencoder.save(folder / AUTOENCODER_KERAS)
    encoder.save(folder / ENCODER_KERAS)
    tflite = to_tflite(encoder)
    (folder / ENCODER_TFLITE).write_bytes(tflite)
    card = {
        "model_version": model_version("wide", encoder),
        "architecture": "wide",
        "dataset": "untrained",
        "input_shape": list(shape),
        "preprocess": "photo",
        "embedding_dim": 128,
        "tflite_max_abs_diff": check_tflite(tflite, encoder, x),
    }
    card.update(write_decoder(autoencoder, encoder, folder, x))
    (folder / CARD_JSON).write_text(json.dumps(card))
    return folder


def upload_search(url: str, data: bytes, collection: str | None = None, k: int = 3) -> Reply:
    """A search by image on the gateway at `url` (POST /api/search), in `collection` when given."""
    fields = {"k": str(k)}
    if collection is not None:
        fields["collection"] = collection
    return request(f"{url}/api/search", fields=fields, files={"file": ("q.png", data, "image/png")})
