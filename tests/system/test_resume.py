"""`imgsearch index --resume`: an ingest killed half way, resumed, equals an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from imgsearch.client import IndexClient
from tests.support import write_digits
from tools.local import LocalServices, ServiceProcess, free_port

COUNT = 2000


def cli(encoder: str, index: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "imgsearch", "--encoder", encoder, "--index", index, *args]


def everything(address: str, ids: list[str]) -> tuple[list[str], list[dict[str, str]], np.ndarray]:
    client = IndexClient(address, timeout_s=60)
    try:
        items, missing = client.get(ids, with_vectors=True)
    finally:
        client.close()
    assert missing == []
    vectors = np.stack([item.vector for item in items if item.vector is not None])
    return [item.id for item in items], [item.metadata for item in items], vectors


def test_an_interrupted_ingest_resumed_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    folder = write_digits(tmp_path / "digits", COUNT)

    with LocalServices(tmp_path / "resumed", log_dir=tmp_path) as services:
        whole = ServiceProcess("index_service", free_port(), ["--data-dir", str(tmp_path / "whole")])
        try:
            whole.start()
            whole.wait_healthy()
            encoder, resumed = services.encoder.address, services.index.address
            done = subprocess.run(
                cli(encoder, whole.address, "index", str(folder), "--no-progress"),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr

            first = subprocess.Popen(
                cli(encoder, resumed, "index", str(folder), "--no-progress", "--batch-size", "16"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            index = IndexClient(resumed, timeout_s=30)
            try:
                deadline = time.monotonic() + 120
                while index.stats().count < 100 and time.monotonic() < deadline and first.poll() is None:
                    time.sleep(0.01)
                first.send_signal(signal.SIGKILL)
                first.wait()
                time.sleep(0.5)  # an upsert the killed client sent may still be landing
                stopped_at = index.stats().count
            finally:
                index.close()
            assert 0 < stopped_at < COUNT, f"the ingest was not stopped half way ({stopped_at} of {COUNT})"

            again = subprocess.run(
                cli(encoder, resumed, "index", str(folder), "--no-progress", "--resume"),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert again.returncode == 0, again.stderr
            assert f"resuming: {stopped_at} of {COUNT} images are already in the index" in again.stdout
            assert f"indexed {COUNT - stopped_at} images; the index now holds {COUNT}" in again.stdout

            ids = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
            got, expected = everything(resumed, ids), everything(whole.address, ids)
            assert got[0] == expected[0] == ids
            assert got[1] == expected[1], "the same metadata (label, source)"
            assert np.allclose(got[2], expected[2], atol=1e-5), "the same vectors"
        finally:
            whole.stop()
