"""kill -9 under load: every acknowledged write survives, in real processes; and a second process on one
data dir (a second FAISS replica) waits as a standby."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgsearch.client import IndexClient, ServiceError
from tests.support import mnist_sample
from tools.local import ServiceProcess, free_port

DIM = 16
THREADS = 4
ROUNDS = 3

Items = dict[str, tuple[np.ndarray, dict[str, str]]]
Op = tuple[str, list[str], np.ndarray, list[dict[str, str]]]


def applied(items: Items, op: Op) -> Items:
    items = dict(items)
    kind, ids, vectors, metadata = op
    for n, item_id in enumerate(ids):
        if kind == "upsert":
            items[item_id] = (vectors[n], metadata[n])
        else:
            items.pop(item_id, None)
    return items


class Writer(threading.Thread):
    """Upserts and deletes in its own id space until the service dies; records what was acknowledged."""

    def __init__(self, name: str, address: str, items: Items, seed: int) -> None:
        super().__init__(daemon=True)
        self.prefix, self.address, self.items = name, address, items
        self.rng = random.Random(seed)
        self.vectors = np.random.default_rng(seed)
        self.pending: Op | None = None  # sent, never acknowledged: it may or may not have been applied
        self.acknowledged = 0

    def next_op(self) -> Op:
        ids = [f"{self.prefix}-{self.rng.randrange(60)}" for _ in range(self.rng.randint(1, 5))]
        ids = list(dict.fromkeys(ids))
        if self.rng.random() < 0.3:
            return ("delete", ids, np.zeros((0, DIM), np.float32), [])
        metadata = [{"writer": self.prefix, "n": str(self.rng.randrange(10**6))} for _ in ids]
        return ("upsert", ids, self.vectors.standard_normal((len(ids), DIM)).astype(np.float32), metadata)

    def run(self) -> None:
        client = IndexClient(self.address, timeout_s=10)
        try:
            while True:
                op = self.next_op()
                self.pending = op
                if op[0] == "upsert":
                    client.upsert(op[1], op[2], op[3], "crash-model")
                else:
                    client.delete(op[1])
                self.items = applied(self.items, op)
                self.pending = None
                self.acknowledged += 1
        except ServiceError:
            return  # the service was killed
        finally:
            client.close()


def stored(client: IndexClient, prefix: str) -> Items:
    items, _ = client.get([f"{prefix}-{n}" for n in range(60)], with_vectors=True)
    return {i.id: (i.vector, i.metadata) for i in items}  # type: ignore[misc]


def same(a: Items, b: Items) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)


def test_kill_9_at_random_moments_loses_no_acknowledged_write(tmp_path: Path) -> None:
    port = free_port()
    args = ["--data-dir", str(tmp_path / "data"), "--snapshot-every-ops", "40"]
    models: dict[str, Items] = {f"w{n}": {} for n in range(THREADS)}
    rng = random.Random(7)
    for round_number in range(ROUNDS):
        service = ServiceProcess("index_service", port, args, tmp_path / "index.log").start()
        try:
            service.wait_healthy()
            writers = [
                Writer(name, service.address, models[name], seed=round_number * 100 + n)
                for n, name in enumerate(models)
            ]
            for writer in writers:
                writer.start()
            time.sleep(rng.uniform(0.3, 1.5))
            service.kill()  # SIGKILL: no drain, no snapshot
            for writer in writers:
                writer.join(30)
            assert sum(w.acknowledged for w in writers) > 20
        finally:
            service.kill()
        service.start()
        try:
            service.wait_healthy()
            client = IndexClient(service.address, timeout_s=30)
            everything: Items = {}
            for writer in writers:
                actual = stored(client, writer.prefix)
                acknowledged = writer.items
                maybe = applied(acknowledged, writer.pending) if writer.pending else acknowledged
                assert same(actual, acknowledged) or same(actual, maybe), f"{writer.prefix} lost writes"
                models[writer.prefix] = actual
                everything.update(actual)
            # the index as a whole answers like a brute force over the acknowledged history
            ids = sorted(everything)
            base = np.stack([everything[i][0] for i in ids])
            queries = np.random.default_rng(round_number).standard_normal((5, DIM)).astype(np.float32)
            distances = np.sqrt(((queries[:, None, :] - base[None]) ** 2).sum(-1))
            expected = np.argsort(distances, axis=1, kind="stable")[:, :10]
            got = client.search(queries, 10)
            assert [[m.id for m in row] for row in got] == [[ids[i] for i in row] for row in expected]
            assert client.stats().count == len(ids)
            client.close()
        finally:
            service.kill()
    log = (tmp_path / "index.log").read_text()
    assert "log records replayed" in log


def test_an_ingest_survives_the_index_being_killed_under_it(tmp_path: Path) -> None:
    x, y = mnist_sample(3000)
    folder = tmp_path / "images"
    for n, (digit, label) in enumerate(zip(x, y, strict=True)):
        path = folder / str(label) / f"{n:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit).save(path)
    encoder = ServiceProcess("encoder_service", free_port(), [], tmp_path / "encoder.log").start()
    index = ServiceProcess(
        "index_service", free_port(), ["--data-dir", str(tmp_path / "data")], tmp_path / "index.log"
    ).start()
    try:
        encoder.wait_healthy()
        index.wait_healthy()
        ingest = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imgsearch",
                "--encoder",
                encoder.address,
                "--index",
                index.address,
                "index",
                str(folder),
                "--batch-size",
                "50",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = IndexClient(index.address, timeout_s=5)
        kills = 0
        for threshold in (600, 1800):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ingest.poll() is None:
                try:
                    if client.stats().count >= threshold:
                        break
                except ServiceError:  # a new channel: the old one may wait out a reconnect backoff
                    client.close()  # while the ingest, back on the restarted index, runs to the end
                    client = IndexClient(index.address, timeout_s=5)
                time.sleep(0.05)
            if ingest.poll() is not None:
                break
            index.kill()
            kills += 1
            time.sleep(0.5)
            index.start()
        stdout, stderr = ingest.communicate(timeout=180)
        assert ingest.returncode == 0, stderr
        assert kills == 2, "the ingest finished before both kills: make the folder larger"
        assert "indexed 3000 images; the index now holds 3000" in stdout
        index.wait_healthy()
        all_ids = [p.relative_to(folder).as_posix() for p in folder.rglob("*.png")]
        items, missing = client.get(all_ids)
        assert not missing and len(items) == 3000 and client.stats().count == 3000
        client.close()
    finally:
        index.kill()
        encoder.kill()


def test_a_standby_waits_listening_on_nothing_and_serves_once_the_dir_is_free(tmp_path: Path) -> None:
    """--when-locked wait (what Compose sets): a second FAISS replica says why once, does not exit (no
    restart loop) and does not listen (round-robin skips it); it takes over when the first one stops."""
    log_path = tmp_path / "standby.log"
    first = ServiceProcess("index_service", free_port(), ["--data-dir", str(tmp_path / "data")]).start()
    standby = ServiceProcess(
        "index_service",
        free_port(),
        ["--data-dir", str(tmp_path / "data"), "--when-locked", "wait"],
        log_path,
    )
    try:
        first.wait_healthy()
        standby.start()
        deadline = time.monotonic() + 30
        while "refusing to serve" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log_path.read_text()
        assert "refusing to serve" in text and "--backend milvus" in text, text
        time.sleep(3)  # more than one poll: still waiting, said once, nothing listening
        assert standby.process is not None and standby.process.poll() is None
        assert log_path.read_text().count("refusing to serve") == 1
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", standby.port)) != 0
        assert first.stop() == 0
        standby.wait_healthy(30)
        assert "the data dir is free now: serving" in log_path.read_text()
        assert standby.stop() == 0  # graceful, SIGTERM
    finally:
        first.kill()
        standby.kill()


def test_a_waiting_standby_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    first = ServiceProcess("index_service", free_port(), ["--data-dir", str(tmp_path)]).start()
    standby = ServiceProcess(
        "index_service", free_port(), ["--data-dir", str(tmp_path), "--when-locked", "wait"]
    )
    try:
        first.wait_healthy()
        standby.start()
        time.sleep(4)  # started up and waiting
        assert standby.process is not None and standby.process.poll() is None
        started = time.monotonic()
        assert standby.stop(timeout_s=10) == 0
        assert time.monotonic() - started < 5
    finally:
        first.kill()
        standby.kill()
