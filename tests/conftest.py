"""Shared fixtures: in-process servers on free ports, stopped after each test.

The index fixtures run on the FAISS backend unless a test asks for both: `@both_backends` parametrises
the `backend` fixture, and `backend_args` then gives each service the flags for it. Milvus runs as
Milvus Lite on one local file for the whole session (its server starts once, about 0.2 s), with a fresh
collection per test."""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgsearch.client import IndexClient
from index_service.service import IndexService, parse_config

MILVUS_MISSING = any(importlib.util.find_spec(name) is None for name in ("pymilvus", "milvus_lite"))
MILVUS_SKIP = pytest.mark.skipif(
    MILVUS_MISSING, reason="pymilvus and milvus-lite are not installed: pip install -e '.[milvus]'"
)
BACKENDS = ["faiss", pytest.param("milvus", marks=MILVUS_SKIP)]
both_backends = pytest.mark.parametrize("backend", BACKENDS)


def start_index(data_dir: Path, *extra: str) -> IndexService:
    service = IndexService(
        parse_config(["--port", "0", "--host", "127.0.0.1", "--data-dir", str(data_dir), *extra])
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
        from pymilvus import MilvusClient

        client: Any = MilvusClient(self.uri)
        try:
            if client.has_collection(name):
                client.drop_collection(name)
        finally:
            client.close()

    def close(self) -> None:
        self._keeper.close()


@pytest.fixture(scope="session")
def milvus_lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLite]:
    lite = MilvusLite(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
    yield lite
    lite.close()


@pytest.fixture
def backend() -> str:
    """The index backend: FAISS, unless the test is parametrised with `@both_backends`."""
    return "faiss"


@pytest.fixture
def backend_args(backend: str, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """The index service's flags for the backend: none for FAISS; Milvus Lite with a fresh collection,
    dropped after the test (every service the test starts with these flags shares it)."""
    if backend == "faiss":
        yield []
        return
    lite: MilvusLite = request.getfixturevalue("milvus_lite")
    name = lite.new_collection()
    yield ["--backend", "milvus", "--milvus-uri", lite.uri, "--milvus-collection", name]
    lite.drop(name)


@pytest.fixture
def index_service(tmp_path: Path, backend_args: list[str]) -> Iterator[IndexService]:
    service = start_index(tmp_path / "index", *backend_args)
    yield service
    service.stop(0)


@pytest.fixture
def index_client(index_service: IndexService) -> Iterator[IndexClient]:
    client = IndexClient(f"127.0.0.1:{index_service.server.port}", timeout_s=30)
    yield client
    client.close()
