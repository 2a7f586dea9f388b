"""--io-core: gRPC's I/O threads held to one core in a real service process, the flag checked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from encoder_service.service import parse_config as encoder_config
from imgsearch.client import IndexClient
from index_service.service import parse_config
from tools.local import ServiceProcess, free_port

CORES = sorted(os.sched_getaffinity(0))


def test_the_flag_takes_auto_none_or_a_core_of_this_process() -> None:
    assert parse_config([]).server.io_core == "none"  # the index: its OpenMP threads need every core
    assert encoder_config([]).server.io_core == "auto"
    assert parse_config(["--io-core", "NONE"]).server.io_core == "none"
    assert parse_config(["--io-core", str(CORES[-1])]).server.io_core == str(CORES[-1])
    for bad in ("fast", "-1", str(max(CORES) + 1), "1.5"):
        with pytest.raises(SystemExit, match="--io-core must be auto, none or one of this process's cores"):
            parse_config(["--io-core", bad])


def allowed_cores(pid: int, names: tuple[str, ...]) -> dict[int, set[int]]:
    """Each thread of `pid` named one of `names` (gRPC core's): the cores it may run on."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip().startswith(names):
            found[int(task.name)] = os.sched_getaffinity(int(task.name))
    return found


@pytest.mark.skipif(len(CORES) < 2, reason="one core: nothing to hold")
@pytest.mark.parametrize("setting", ["first", "none"])
def test_the_io_threads_are_held_to_the_core_asked_for(tmp_path: Path, setting: str) -> None:
    core = str(CORES[0]) if setting == "first" else "none"
    service = ServiceProcess(
        "index_service", free_port(), ["--host", "127.0.0.1", "--data-dir", str(tmp_path), "--io-core", core]
    )
    service.start()
    try:
        service.wait_healthy(60)
        client = IndexClient(service.address, timeout_s=30)
        try:
            vectors = np.random.default_rng(0).standard_normal((50, 128)).astype(np.float32)
            client.upsert([f"v{i}" for i in range(50)], vectors)
            assert client.search(vectors[:1], 3)[0][0].id == "v0"
        finally:
            client.close()
        assert service.process is not None
        threads = allowed_cores(service.process.pid, ("event_engine",))
        assert threads, "no gRPC event-engine thread found"
        expected = {CORES[0]} if setting == "first" else set(CORES)
        assert all(cores == expected for cores in threads.values()), threads
    finally:
        service.stop()
