"""Shared fixtures: in-process servers on free ports, stopped after each test.

The index fixtures run on the FAISS backend unless a test asks for both: `@both_backends` parametrises
the `backend` fixture, and `backend_args` then gives each service the flags for it. Milvus runs as
Milvus Lite on one local file for the whole session (its server starts once, about 0.2 s), with a fresh
collection per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import IndexClient
from index_service.service import IndexService
from tests.support import MilvusLite, connect, serve, start_index


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
    yield from serve(start_index(tmp_path / "index", *backend_args))


@pytest.fixture
def index_client(index_service: IndexService) -> Iterator[IndexClient]:
    yield from connect(IndexClient, index_service)
