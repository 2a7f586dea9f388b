"""Shared fixtures: in-process servers on free ports, stopped after each test.

The index fixtures run on the FAISS backend unless a test asks for every backend: `@every_backend`
parametrises the `backend` fixture (faiss, milvus, milvus-server), and `backend_args` then gives each
service the flags for it, with a fresh collection per test on either Milvus. `milvus` is Milvus Lite on
one local file for the whole session (its server starts once, about 0.2 s); `milvus-server` is a real
Milvus 2.3.5 standalone server (the `milvus` package) in its own processes, started once per session
when a test first asks for it (about 6 s) and killed, its process group and all, at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import IndexClient
from index_service.service import IndexService
from tests.support import FAST, MilvusLite, connect, drop_milvus_collections, serve, start_index
from tools.milvus_server import MilvusServer


@pytest.fixture(scope="session")
def milvus_lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusLite]:
    lite = MilvusLite(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
    yield lite
    lite.close()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """One Milvus server for the session (each xdist worker starts its own, on its own ports). The fast loop
    (`make test-fast`, IMGSEARCH_FAST_TESTS=1) leaves the server's tests to `make test`: each of its four
    workers would start a server of its own."""
    if FAST:
        pytest.skip("the Milvus server runs in `make test`, not in the fast loop (IMGSEARCH_FAST_TESTS)")
    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"))
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def backend() -> str:
    """The index backend: FAISS, unless the test is parametrised with `@every_backend`."""
    return "faiss"


@pytest.fixture
def backend_args(backend: str, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """The index service's flags for the backend: none for FAISS; Milvus Lite or the Milvus server with a
    fresh collection, dropped after the test (every service the test starts with these flags shares it)."""
    if backend == "faiss":
        yield []
        return
    milvus: MilvusLite | MilvusServer = request.getfixturevalue(
        "milvus_server" if backend == "milvus-server" else "milvus_lite"
    )
    name = milvus.new_collection()
    yield ["--backend", "milvus", "--milvus-uri", milvus.uri, "--milvus-collection", name]
    drop_milvus_collections(milvus.uri, name)


@pytest.fixture
def index_service(tmp_path: Path, backend_args: list[str]) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index", *backend_args))


@pytest.fixture
def index_client(index_service: IndexService) -> Iterator[IndexClient]:
    yield from connect(IndexClient, index_service)
