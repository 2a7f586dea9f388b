"""Encoder replicas: an ingest spreads over three (round_robin), and losing one mid-run loses nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgsearch.client import EncoderClient, ImageSearch, IndexClient
from imgsearch.ingest import collect_images, index_images
from index_service.service import IndexService
from tests.support import serve, start_index, write_digits
from tools.local import ServiceProcess, free_port

COUNT = 3000
BATCH = 50  # 60 calls, so that round_robin's spread shows in the counts
NAMES = ["replica-a", "replica-b", "replica-c"]


@pytest.fixture
def encoders(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    replicas = [
        ServiceProcess("encoder_service", free_port(), ["--replica-id", name], tmp_path / f"{name}.log")
        for name in NAMES
    ]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_healthy()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[IndexService]:
    yield from serve(start_index(tmp_path / "index"))


def served(replica: ServiceProcess) -> int:
    """Images the replica says it embedded (Info, asked of that one replica alone)."""
    client = EncoderClient(f"127.0.0.1:{replica.port}", timeout_s=10)
    try:
        info = client.info()
    finally:
        client.close()
    assert info["replica"] == replica.args[1]
    return int(info["images_embedded"])


def stored_ids(address: str) -> list[str]:
    client = IndexClient(address, timeout_s=30)
    try:
        return [item_id for page in client.scan() for item_id in page.ids]
    finally:
        client.close()


def test_the_cli_reports_each_replicas_share(
    tmp_path: Path, encoders: list[ServiceProcess], index: IndexService
) -> None:
    folder = write_digits(tmp_path / "digits", 300)
    targets = ",".join(f"127.0.0.1:{replica.port}" for replica in encoders)
    index_address = f"127.0.0.1:{index.server.port}"
    command = [sys.executable, "-m", "imgsearch", "--encoder", targets, "--index", index_address]
    done = subprocess.run(
        [*command, "index", str(folder), "--no-progress", "--batch-size", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("embedded by"))
    shares = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    assert sorted(shares) == NAMES
    assert {name: int(count) for name, count in shares.items()} == {r.args[1]: served(r) for r in encoders}
    assert sum(map(int, shares.values())) == 300


def test_an_ingest_spreads_over_three_replicas_and_survives_losing_one(
    tmp_path: Path, encoders: list[ServiceProcess], index: IndexService
) -> None:
    folder = write_digits(tmp_path / "digits", COUNT)
    files, skipped = collect_images([folder])
    assert len(files) == COUNT and not skipped
    doomed = encoders[2]
    progress = {"done": 0, "at_kill": 0}

    def on_batch(size: int) -> None:
        progress["done"] += size
        if not progress["at_kill"] and progress["done"] >= COUNT // 3:
            doomed.kill()  # SIGKILL: calls on it fail UNAVAILABLE and go to the others
            progress["at_kill"] = progress["done"]

    targets = ",".join(f"127.0.0.1:{replica.port}" for replica in encoders)
    address = f"127.0.0.1:{index.server.port}"
    with ImageSearch(targets, address, timeout_s=60) as search:
        report = index_images(search, files, BATCH, on_batch=on_batch, patience_s=30, in_flight=4)

    assert progress["at_kill"] and doomed.process is not None and doomed.process.returncode is not None
    # Every image stored exactly once.
    ids = stored_ids(address)
    assert len(ids) == COUNT and sorted(ids) == sorted(f.id for f in files)
    assert report.indexed == COUNT and report.count == COUNT and not report.skipped
    # Each replica did its share: a third each until the kill, then half each for the survivors.
    shares = report.by_replica
    assert sorted(shares) == NAMES and sum(shares.values()) == COUNT, shares
    before = progress["at_kill"]
    assert shares["replica-c"] >= 0.5 * before / 3, shares
    for survivor in encoders[:2]:
        assert shares[survivor.args[1]] >= 0.8 * (COUNT - shares["replica-c"]) / 2, shares
        # What the client tallied is what the replica itself counted: no call answered twice.
        assert served(survivor) == shares[survivor.args[1]]


def test_each_replica_is_named_by_default_and_the_cli_keeps_every_replica_busy() -> None:
    from encoder_service.service import parse_config
    from imgsearch.cli import in_flight_for

    assert parse_config([]).replica_id == f"{socket.gethostname()}:{os.getpid()}"
    assert parse_config(["--replica-id", "a"]).replica_id == "a"
    assert in_flight_for("localhost:50051") == 2  # one replica: the next batch embeds while one is stored
    assert in_flight_for("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3") == 4
