"""Shared fixtures: in-process servers on free ports, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import IndexClient
from index_service.service import IndexService, parse_config


def start_index(data_dir: Path, *extra: str) -> IndexService:
    service = IndexService(
        parse_config(["--port", "0", "--host", "127.0.0.1", "--data-dir", str(data_dir), *extra])
    )
    service.start()
    return service


@pytest.fixture
def index_service(tmp_path: Path) -> Iterator[IndexService]:
    service = start_index(tmp_path / "index")
    yield service
    service.stop(0)


@pytest.fixture
def index_client(index_service: IndexService) -> Iterator[IndexClient]:
    client = IndexClient(f"127.0.0.1:{index_service.server.port}", timeout_s=30)
    yield client
    client.close()
