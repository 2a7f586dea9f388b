"""imgsearch_server.memory: the arena cap and the trim after a bulk write's request is freed."""

from __future__ import annotations

import time

import pytest

from imgsearch_server import memory


def test_the_arena_cap_leaves_a_cap_set_in_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    if memory._MALLOPT is None:
        pytest.skip("not glibc")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert memory.limit_arenas() is True


def test_asks_for_a_later_trim_coalesce_into_one_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[float] = []

    def trim(pad: int) -> int:
        trims.append(time.monotonic())
        return 1

    monkeypatch.setattr(memory, "_MALLOC_TRIM", trim)
    monkeypatch.setattr(memory, "TRIM_AFTER_S", 0.2)
    last = 0.0
    for _ in range(5):  # a burst of bulk writes, each asking
        memory.release_free_memory_soon()
        last = time.monotonic()
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while not trims and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # no second trim follows
    assert len(trims) == 1
    assert trims[0] - last >= 0.2 - 0.01  # only once the burst was quiet for TRIM_AFTER_S
    memory.release_free_memory_soon()
    deadline = time.monotonic() + 10
    while len(trims) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(trims) == 2
