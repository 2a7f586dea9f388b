"""The index on a real Milvus server (the session's Milvus 2.3.5, tests/support.py MilvusServer), in real
processes: two index service replicas on one collection see each other's writes at once; Milvus killed
and started again mid-ingest loses no acknowledged item, fails the calls meanwhile with UNAVAILABLE, and
the same service answers again afterwards; and one replica killed while a client connected to both keeps
searching through the other."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from imgsearch.client import ImageSearch, IndexClient, ServiceError
from imgsearch.ingest import collect_images, index_images
from imgsearch.v1 import index_pb2, index_pb2_grpc
from tests.support import (
    MILVUS_SERVER_SKIP,
    packed,
    random_items,
    requests,
    scrape,
    write_digits,
)
from tools.local import ServiceProcess, free_port
from tools.milvus_server import MilvusServer

pytestmark = MILVUS_SERVER_SKIP
INDEX = "imgsearch.v1.Index"


@pytest.fixture
def collection(milvus_server: MilvusServer) -> Iterator[str]:
    name = milvus_server.new_collection()
    yield name
    if milvus_server.process is None:  # a test that killed Milvus and failed before starting it again
        milvus_server.start()
    milvus_server.drop(name)


def replica(
    server: MilvusServer, collection: str, log: Path, *extra: str, metrics: bool = False
) -> ServiceProcess:
    """An index service process on the collection (not yet waited for)."""
    args = ["--host", "127.0.0.1", "--backend", "milvus", "--milvus-uri", server.uri]
    args += ["--milvus-collection", collection, *extra]
    if metrics:
        args += ["--metrics-port", str(free_port()), "--metrics-host", "127.0.0.1"]
    return ServiceProcess("index_service", free_port(), args, log).start()


def local(process: ServiceProcess) -> str:
    return f"127.0.0.1:{process.port}"


def metrics_port(process: ServiceProcess) -> int:
    return int(process.args[process.args.index("--metrics-port") + 1])


def scanned(client: IndexClient) -> list[str]:
    return [item_id for page in client.scan() for item_id in page.ids]


def test_a_write_acknowledged_by_one_replica_is_read_by_the_other(
    tmp_path: Path, milvus_server: MilvusServer, collection: str
) -> None:
    """Two index service processes on one Milvus collection hold nothing of their own: whatever one
    acknowledges, the other's next read returns (Strong consistency), both ways, item by item."""
    replicas = [replica(milvus_server, collection, tmp_path / f"{name}.log") for name in "ab"]
    clients: list[IndexClient] = []
    try:
        for process in replicas:
            process.wait_healthy()
        a, b = clients = [IndexClient(local(p), timeout_s=30) for p in replicas]
        ids, vectors, metadata = random_items(400, 16)
        assert a.upsert(ids[:200], vectors[:200], metadata[:200], "m1") == 200
        stats = b.stats()
        assert (stats.count, stats.dim, stats.model_version) == (200, 16, "m1")
        assert [row[0].id for row in b.search(vectors[:200:20], 1)] == ids[:200:20]
        for n in range(200, 230):  # one write on one, read at once on the other, alternately
            writer, reader = (a, b) if n % 2 else (b, a)
            assert writer.upsert(ids[n : n + 1], vectors[n : n + 1], metadata[n : n + 1], "m1") == n + 1
            items, missing = reader.get([ids[n]], with_vectors=True)
            assert not missing and items[0].metadata == metadata[n] and items[0].vector is not None
            np.testing.assert_array_equal(items[0].vector, vectors[n])
            assert reader.search(vectors[n : n + 1], 1)[0][0].id == ids[n]
        assert b.upsert(ids[230:], vectors[230:], metadata[230:], "m1") == 400
        assert a.search(vectors[:8], 5) == b.search(vectors[:8], 5)
        assert a.delete(ids[:10]) == (10, 0)
        assert b.get(ids[:12])[1] == ids[:10]
        b.upsert(ids[10:11], np.zeros((1, 16), np.float32), [{"label": "new"}], "m1")
        assert a.get(ids[10:11])[0][0].metadata == {"label": "new"}
        with pytest.raises(ServiceError, match=r"model version 'm2'.*reindex") as refused:
            a.upsert(["other"], np.zeros((1, 16), np.float32), (), "m2")  # the model the writes fixed
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert sorted(scanned(a)) == sorted(scanned(b)) == sorted(ids[10:])
    finally:
        for client in clients:
            client.close()
        for process in replicas:
            assert process.stop() == 0
    for name in "ab":
        assert "received SIGTERM" in (tmp_path / f"{name}.log").read_text()


def outage_call(address: str, method: str, request: object) -> tuple[grpc.StatusCode, str, float]:
    """One raw call while Milvus is down: its status code, details and seconds."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = index_pb2_grpc.IndexStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request, timeout=60)
    return caught.value.code(), caught.value.details() or "", time.monotonic() - started


def test_milvus_killed_and_started_again_mid_ingest_loses_no_acknowledged_item(
    tmp_path: Path, milvus_server: MilvusServer, collection: str
) -> None:
    """`index_images` (what `imgsearch index` runs) through an encoder and an index service process on
    the Milvus server; a third of the way in, Milvus is killed (SIGKILL, its whole process group). Calls
    then fail with UNAVAILABLE naming the Milvus within --milvus-timeout-s (no hang, no INTERNAL), the
    ingest waits (--patience-s) while Milvus is started again on its data, and ends with every image
    stored once, on the same index service process."""
    count, batch = 600, 20
    folder = write_digits(tmp_path / "digits", count)
    files, skipped = collect_images([folder])
    assert len(files) == count and not skipped
    encoder = ServiceProcess("encoder_service", free_port(), [], tmp_path / "encoder.log").start()
    index = replica(milvus_server, collection, tmp_path / "index.log", "--milvus-timeout-s", "2")
    restarted = threading.Event()
    failures: list[BaseException] = []

    def restart() -> None:
        try:
            milvus_server.start()
        except BaseException as error:
            failures.append(error)
        finally:
            restarted.set()

    progress = {"done": 0, "at_kill": 0}
    outage: list[tuple[str, grpc.StatusCode, str, float]] = []
    waits: list[str] = []

    def on_batch(size: int) -> None:
        progress["done"] += size
        if progress["at_kill"] or progress["done"] < count // 3:
            return
        progress["at_kill"] = progress["done"]
        milvus_server.kill()
        for method, request in [
            ("Stats", index_pb2.StatsRequest()),
            ("Search", index_pb2.SearchRequest(queries=packed(np.ones((1, 64))), k=3)),
            ("Upsert", index_pb2.UpsertRequest(ids=["x"], vectors=packed(np.ones((1, 64))))),
        ]:
            outage.append((method, *outage_call(local(index), method, request)))
        threading.Thread(target=restart, name="milvus-restart", daemon=True).start()

    try:
        encoder.wait_healthy()
        index.wait_healthy()
        pid = index.process.pid if index.process else None
        with ImageSearch(local(encoder), local(index), timeout_s=60) as search:
            report = index_images(
                search, files, batch, on_batch=on_batch, patience_s=180, on_wait=waits.append
            )
            assert restarted.wait(180) and not failures, failures
            assert progress["at_kill"] and report.indexed == count and report.count == count
            assert not report.skipped
            stored = scanned(search.index)
            assert len(stored) == count and sorted(stored) == sorted(f.id for f in files)
            assert search.index.stats().count == count
            first = files[0]
            found = search.index.search(search.encoder.embed([first.path.read_bytes()]).vectors, 1)[0][0]
            assert found.id == first.id and found.distance == pytest.approx(0, abs=1e-3)
        assert index.process is not None and index.process.pid == pid and index.process.poll() is None
    finally:
        assert index.stop() == 0
        encoder.stop()
    for method, code, details, seconds in outage:
        assert code == grpc.StatusCode.UNAVAILABLE, (method, code, details)
        assert f"Milvus at {milvus_server.uri} failed" in details, (method, details)
        assert "Traceback" not in details and seconds < 15, (method, details, seconds)
    # The ingest waited on the index while Milvus was away, and said why.
    assert waits and all("index service" in w and "not reachable" in w for w in waits), waits
    assert any(f"Milvus at {milvus_server.uri}" in w for w in waits), waits
    log = (tmp_path / "index.log").read_text()
    assert "Exception calling application" not in log and "INTERNAL" not in log


def test_a_replica_killed_while_a_client_on_both_keeps_searching(
    tmp_path: Path, milvus_server: MilvusServer, collection: str
) -> None:
    """A client connected to two replicas (a comma list: round_robin over both) searches on while one is
    killed with SIGKILL: calls that found it gone are retried on the other, so every search answers,
    rightly; both served before the kill, the survivor after."""
    replicas = [replica(milvus_server, collection, tmp_path / f"{name}.log", metrics=True) for name in "ab"]
    ids, vectors, metadata = random_items(300, 16, seed=7)
    both: IndexClient | None = None
    try:
        for process in replicas:
            process.wait_healthy()
        setup = IndexClient(local(replicas[0]), timeout_s=30)
        assert setup.upsert(ids, vectors, metadata, "m1") == 300
        setup.close()
        doomed, survivor = replicas
        both = IndexClient(",".join(local(p) for p in replicas), timeout_s=30)
        answered = 0
        for n in range(90):
            if n == 30:
                served = [requests(scrape(metrics_port(p)), INDEX, "Search", "OK") for p in replicas]
                assert all(served), served  # round_robin used both
                doomed.kill()
            row = n % 300
            found = both.search(vectors[row : row + 1], 3)[0]
            assert found[0].id == ids[row] and found[0].metadata == metadata[row]
            answered += 1
        assert answered == 90
        assert doomed.process is not None and doomed.process.returncode == -9
        after = requests(scrape(metrics_port(survivor)), INDEX, "Search", "OK")
        assert after is not None and after >= 60
        assert both.stats().count == 300
    finally:
        if both is not None:
            both.close()
        for process in replicas:
            process.stop()
