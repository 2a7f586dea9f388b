"""The index service on Milvus: the same answers as FAISS (on Milvus Lite and on a Milvus server),
replicas that share one collection, a restart that reads everything back, and clear errors when Milvus is
missing or wrong (on Milvus Lite, here; tests/system/test_milvus_server.py has the Milvus server's
replicas and outages).

The API's behaviour on every backend is tested in test_index_service.py and test_scan.py."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from imgsearch.client import IndexClient
from imgsearch.v1 import index_pb2, index_pb2_grpc
from index_service.service import IndexService, parse_config
from tests.support import (
    MILVUS_SERVER_SKIP,
    MILVUS_SKIP,
    every_backend,
    packed,
    random_items,
    start_index,
    upsert_one,
)
from tools.local import ServiceProcess, free_port

pytestmark = MILVUS_SKIP
every_milvus = pytest.mark.parametrize(
    "backend", ["milvus", pytest.param("milvus-server", marks=MILVUS_SERVER_SKIP)]
)


def scan_all(client: IndexClient) -> dict[str, dict[str, str]]:
    return {i: m for page in client.scan() for i, m in zip(page.ids, page.metadata, strict=True)}


@every_milvus
def test_faiss_and_milvus_give_the_same_ids_and_distances(tmp_path: Path, backend_args: list[str]) -> None:
    faiss_service = start_index(tmp_path / "faiss")
    milvus_service = start_index(tmp_path / "unused", *backend_args)
    clients = [IndexClient(f"127.0.0.1:{s.server.port}") for s in (faiss_service, milvus_service)]
    try:
        ids, vectors, metadata = random_items(3000, 64, seed=3)
        replaced = np.random.default_rng(4).standard_normal((100, 64)).astype(np.float32)
        for client in clients:
            for start in range(0, 3000, 1000):
                client.upsert(
                    ids[start : start + 1000],
                    vectors[start : start + 1000],
                    metadata[start : start + 1000],
                    "m1",
                )
            client.upsert(ids[:100], replaced, [{"label": "replaced"}] * 100, "m1")
            assert client.delete([*ids[100:150], "nope"]) == (50, 1)
        queries = np.random.default_rng(5).standard_normal((30, 64)).astype(np.float32)
        faiss_client, milvus_client = clients
        for k in (1, 10, 100):
            expected, got = faiss_client.search(queries, k), milvus_client.search(queries, k)
            assert [[m.id for m in row] for row in got] == [[m.id for m in row] for row in expected]
            assert [[m.metadata for m in row] for row in got] == [
                [m.metadata for m in row] for row in expected
            ]
            np.testing.assert_allclose(
                [[m.distance for m in row] for row in got],
                [[m.distance for m in row] for row in expected],
                rtol=1e-5,
                atol=1e-5,
            )
        by_id = ids[:20] + ids[2000:2020]
        expected, got = faiss_client.search_by_id(by_id, 10), milvus_client.search_by_id(by_id, 10)
        assert [[m.id for m in row] for row in got] == [[m.id for m in row] for row in expected]
        np.testing.assert_allclose(
            [[m.distance for m in row] for row in got],
            [[m.distance for m in row] for row in expected],
            rtol=1e-5,
            atol=1e-5,
        )
        expected_items, expected_missing = faiss_client.get(ids[90:160], with_vectors=True)
        got_items, got_missing = milvus_client.get(ids[90:160], with_vectors=True)
        assert got_missing == expected_missing == ids[100:150]
        assert [(i.id, i.metadata) for i in got_items] == [(i.id, i.metadata) for i in expected_items]
        for mine, theirs in zip(got_items, expected_items, strict=True):
            assert mine.vector is not None and theirs.vector is not None
            np.testing.assert_array_equal(mine.vector, theirs.vector)  # stored as float32, exactly
        faiss_stats, milvus_stats = faiss_client.stats(), milvus_client.stats()
        assert (milvus_stats.count, milvus_stats.dim, milvus_stats.model_version) == (
            faiss_stats.count,
            faiss_stats.dim,
            faiss_stats.model_version,
        )
        assert scan_all(milvus_client) == scan_all(faiss_client)
    finally:
        for client in clients:
            client.close()
        faiss_service.stop(0)
        milvus_service.stop(0)


@every_backend
def test_an_emptied_index_takes_a_new_dim_and_model_version(index_client: IndexClient) -> None:
    vectors = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]], np.float32)  # 1, 2 and 3 from 0
    index_client.upsert(["a", "b", "c"], vectors, (), "m1")
    found = index_client.search(np.zeros((1, 4), np.float32), 10)[0]  # k over the count: all three
    assert [(m.id, m.distance) for m in found] == [("a", 1), ("b", 2), ("c", 3)]
    assert [(m.id, m.distance) for m in index_client.search_by_id(["a"], 10)[0]] == [
        ("b", pytest.approx(np.sqrt(5))),
        ("c", pytest.approx(np.sqrt(10))),
    ]
    assert index_client.delete(["a", "b", "c"]) == (3, 0)
    stats = index_client.stats()
    assert (stats.count, stats.dim, stats.model_version) == (0, 4, "m1")  # kept until the next upsert
    assert index_client.search(np.zeros((1, 4), np.float32), 5) == [[]]
    index_client.upsert(["x"], np.ones((1, 8), np.float32), [{"k": "v"}], "m2")
    stats = index_client.stats()
    assert (stats.count, stats.dim, stats.model_version) == (1, 8, "m2")
    assert index_client.search_by_id(["x"], 3) == [[]]
    with pytest.raises(Exception, match="model version 'm1'"):
        index_client.upsert(["y"], np.ones((1, 8), np.float32), (), "m1")
    index_client.delete(["x"])
    index_client.upsert(["y"], np.ones((1, 8), np.float32), (), "m3")  # the same dim, another model
    stats = index_client.stats()
    assert (stats.count, stats.dim, stats.model_version) == (1, 8, "m3")


ODD_IDS = ['say "hi"', "it's", "back\\slash", "new\nline\ttab\r", "ünï/çødé 🙂", "a" * 256, "id in [1]", "'"]


@every_backend
def test_ids_are_any_string(index_client: IndexClient) -> None:
    # Each row twice as far out as the one before: the nearest other item is the previous one (the next
    # for the first).
    vectors = np.repeat(2.0 ** np.arange(len(ODD_IDS), dtype=np.float32)[:, None], 4, axis=1)
    metadata = [{"name": i, "quote": '"\\'} for i in ODD_IDS]
    assert index_client.upsert(ODD_IDS, vectors, metadata, "m1") == len(ODD_IDS)
    items, missing = index_client.get([*ODD_IDS[::-1], '"'], with_vectors=True)
    assert [(i.id, i.metadata) for i in items] == list(zip(ODD_IDS[::-1], metadata[::-1], strict=True))
    assert missing == ['"']
    nearest = index_client.search_by_id(ODD_IDS, 1)
    assert [row[0].id for row in nearest] == [ODD_IDS[1], *ODD_IDS[:-1]]
    assert sorted(scan_all(index_client)) == sorted(ODD_IDS)
    assert index_client.delete(ODD_IDS[:4]) == (4, 0)
    assert sorted(scan_all(index_client)) == sorted(ODD_IDS[4:])


@every_milvus
def test_metadata_over_milvus_varchar_limit_is_invalid_argument(index_client: IndexClient) -> None:
    """A difference between the backends: the Milvus backend keeps an item's metadata as JSON in a
    VARCHAR of at most 65,535 bytes; FAISS takes any metadata within the per-key limits."""
    big = {f"k{n}": "v" * 4000 for n in range(20)}  # 80 KB: within the per-key limits
    with pytest.raises(Exception, match="65535") as caught:
        index_client.upsert(["big"], np.ones((1, 4), np.float32), [big], "m1")
    assert getattr(caught.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
    assert index_client.stats().count == 0


# ---- the service holds no state: replicas and restarts --------------------------------------------


class LiteServer:
    """A Milvus Lite server in its own process (`python -m milvus_lite server`), as a Milvus server is to
    replicas: one Milvus Lite file can only be opened by one process (it holds a lock on it)."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir, self.log_path, self.port = data_dir, log_path, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir)),
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the Milvus Lite server did not start in 60 s"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # it stops gracefully on KeyboardInterrupt
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def lite_server(tmp_path: Path) -> Iterator[LiteServer]:
    server = LiteServer(tmp_path / "milvus-data", tmp_path / "milvus.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_replicas_on_one_milvus_see_each_others_writes(tmp_path: Path, lite_server: LiteServer) -> None:
    """Two index services, one in this process and one in its own, on one Milvus: what either writes,
    the other reads at once (Strong consistency); neither holds anything of its own."""
    args = ["--backend", "milvus", "--milvus-uri", lite_server.uri, "--milvus-collection", "shared"]
    here = start_index(tmp_path / "unused", *args)
    there = ServiceProcess("index_service", free_port(), args, tmp_path / "there.log").start()
    a = IndexClient(f"127.0.0.1:{here.server.port}")
    b = IndexClient(there.address)
    try:
        there.wait_healthy()
        ids, vectors, metadata = random_items(500, 16)
        assert a.upsert(ids[:300], vectors[:300], metadata[:300], "m1") == 300
        assert b.upsert(ids[300:], vectors[300:], metadata[300:], "m1") == 500
        for client in (a, b):
            stats = client.stats()
            assert (stats.count, stats.dim, stats.model_version) == (500, 16, "m1")
        assert a.search(vectors[:5], 3) == b.search(vectors[:5], 3)
        assert [row[0].id for row in b.search(vectors[:300:50], 1)] == ids[:300:50]
        assert b.delete(ids[:10]) == (10, 0)
        assert a.get(ids[:12])[1] == ids[:10]
        a.upsert(ids[10:11], np.zeros((1, 16), np.float32), [{"label": "new"}], "m1")
        assert b.get(ids[10:11])[0][0].metadata == {"label": "new"}
        with pytest.raises(Exception, match=r"model version 'm2'.*reindex"):
            b.upsert(["other"], np.zeros((1, 16), np.float32), (), "m2")  # the model a's writes fixed
        assert set(scan_all(b)) == set(ids[10:])
    finally:
        a.close()
        b.close()
        assert there.stop() == 0
        here.stop(0)
    assert "received SIGTERM" in (tmp_path / "there.log").read_text()


def lite_file_is_free(uri: str) -> bool:
    """Whether no Milvus Lite server holds the file's lock (it is released when the last store closes)."""
    fd = os.open(Path(uri) / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_a_new_service_on_the_same_lite_file_sees_everything(tmp_path: Path) -> None:
    """Stopping the service stops the Milvus Lite server it started and unlocks the file; the next
    service opens the file again and finds every item (and the dim and model version)."""
    uri = str(tmp_path / "index.db")
    args = ["--backend", "milvus", "--milvus-uri", uri]
    ids, vectors, metadata = random_items(200, 8)
    first = start_index(tmp_path / "unused", *args)
    client = IndexClient(f"127.0.0.1:{first.server.port}")
    client.upsert(ids, vectors, metadata, "m1")
    client.delete(ids[:5])
    before = client.search(vectors[:5], 10)
    client.close()
    assert not lite_file_is_free(uri)
    first.stop(0)
    assert lite_file_is_free(uri)
    second = start_index(tmp_path / "unused", *args)
    try:
        client = IndexClient(f"127.0.0.1:{second.server.port}")
        stats = client.stats()
        assert (stats.count, stats.dim, stats.model_version) == (195, 8, "m1")
        assert client.search(vectors[:5], 10) == before
        items, _ = client.get(ids[5:6], with_vectors=True)
        assert items[0].vector is not None
        np.testing.assert_array_equal(items[0].vector, vectors[5])
        client.close()
    finally:
        second.stop(0)
    assert not list(tmp_path.glob("unused*")), "the Milvus backend uses no data dir"


def test_a_lite_file_serves_one_process_only(tmp_path: Path) -> None:
    """Milvus Lite locks its file: services in one process share it (as the tests above do), but a
    service in another process cannot open it; replicas in several processes need a Milvus server."""
    uri = str(tmp_path / "index.db")
    other = ServiceProcess("index_service", free_port(), ["--backend", "milvus", "--milvus-uri", uri]).start()
    try:
        other.wait_healthy()
        with pytest.raises(SystemExit, match="from one process only"):
            start_index(tmp_path, "--backend", "milvus", "--milvus-uri", uri)
    finally:
        assert other.stop() == 0


# ---- configuration and failures -------------------------------------------------------------------


def test_the_backend_comes_from_flags_or_env(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    assert parse_config([]).backend == "faiss"
    with pytest.raises(SystemExit) as exited:
        parse_config(["--backend", "milvus"])
    assert exited.value.code == 2 and "--backend milvus needs --milvus-uri" in capsys.readouterr().err
    monkeypatch.setenv("IMGSEARCH_INDEX_BACKEND", "milvus")
    monkeypatch.setenv("IMGSEARCH_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("IMGSEARCH_MILVUS_COLLECTION", "photos")
    config = parse_config([])
    assert (config.backend, config.milvus_uri, config.milvus_collection) == (
        "milvus",
        "http://milvus:19530",
        "photos",
    )
    with pytest.raises(SystemExit):
        parse_config(["--backend", "qdrant"])


def test_a_lite_file_in_a_missing_directory_fails_at_start(tmp_path: Path) -> None:
    uri = str(tmp_path / "nowhere" / "index.db")
    with pytest.raises(SystemExit, match="its directory does not exist"):
        start_index(tmp_path, "--backend", "milvus", "--milvus-uri", uri)


def test_a_milvus_that_is_not_there_at_start_stops_the_service(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match=rf"Milvus at {re.escape(uri)} is not reachable"):
        start_index(tmp_path, "--backend", "milvus", "--milvus-uri", uri)


def test_a_milvus_that_goes_away_is_unavailable_until_it_is_back(
    tmp_path: Path, lite_server: LiteServer
) -> None:
    """Calls while Milvus is down fail with UNAVAILABLE (which clients retry) after --milvus-timeout-s,
    naming the Milvus; once it is back, the same service answers again."""
    service = start_index(
        tmp_path, "--backend", "milvus", "--milvus-uri", lite_server.uri, "--milvus-timeout-s", "1"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            stub = index_pb2_grpc.IndexStub(channel)
            stub.Upsert(upsert_one(np.ones((1, 4))), timeout=30)
            lite_server.stop()
            for call, request in [
                (stub.Stats, index_pb2.StatsRequest()),
                (stub.Search, index_pb2.SearchRequest(queries=packed(np.ones((1, 4))), k=1)),
            ]:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert f"Milvus at {lite_server.uri} failed" in (caught.value.details() or "")
                assert time.monotonic() - started < 10
            lite_server.start()
            deadline = time.monotonic() + 60
            while True:  # gRPC reconnects with backoff
                try:
                    assert stub.Stats(index_pb2.StatsRequest(), timeout=30).count == 1
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.5)
    finally:
        service.stop(0)


def test_a_collection_left_without_its_index_gets_one(tmp_path: Path) -> None:
    """A replica that stopped between creating the collection and its index: the next one finishes."""
    from pymilvus import DataType, MilvusClient

    from index_service.milvus_store import MODEL_VERSION_PROPERTY

    uri = str(tmp_path / "index.db")
    client: Any = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
    schema.add_field("metadata", DataType.VARCHAR, max_length=65535)
    client.create_collection("imgsearch", schema=schema, properties={MODEL_VERSION_PROPERTY: "m1"})
    assert not client.list_indexes("imgsearch")
    service = start_index(tmp_path, "--backend", "milvus", "--milvus-uri", uri)
    try:
        index = IndexClient(f"127.0.0.1:{service.server.port}")
        assert index.upsert(["a", "b"], np.eye(2, 4, dtype=np.float32), (), "m1") == 2
        assert [m.id for m in index.search(np.eye(1, 4, dtype=np.float32), 1)[0]] == ["a"]
        assert client.list_indexes("imgsearch")
        index.close()
    finally:
        service.stop(0)
        client.close()


def test_a_collection_that_is_not_an_index_is_refused(tmp_path: Path) -> None:
    from pymilvus import DataType, MilvusClient

    uri = str(tmp_path / "other.db")
    client: Any = MilvusClient(uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("theirs", schema=schema)
    service: IndexService | None = None
    try:
        service = start_index(
            tmp_path, "--backend", "milvus", "--milvus-uri", uri, "--milvus-collection", "theirs"
        )
        index = IndexClient(f"127.0.0.1:{service.server.port}")
        with pytest.raises(Exception, match="not an imgsearch index") as caught:
            index.stats()
        assert getattr(caught.value, "code", None) == grpc.StatusCode.FAILED_PRECONDITION
        index.close()
    finally:
        if service is not None:
            service.stop(0)
        client.close()
