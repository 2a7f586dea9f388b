"""The benchmark's floor: the gRPC echo runs in a process of its own (not sharing the benchmark's GIL)
and is stopped by close()."""

from __future__ import annotations

import os

import pytest

from bench.echo import EchoServer


def test_the_echo_runs_in_its_own_process_and_stops() -> None:
    echo = EchoServer(workers=2)
    try:
        assert echo.process.pid != os.getpid() and echo.process.poll() is None
        assert echo.echo(b"abc" * 1000, timeout=10) == b"abc" * 1000
        p50, p99 = echo.latency_ms(1024, repeat=20)
        assert 0 < p50 <= p99
    finally:
        echo.close()
    assert echo.process.poll() is not None, "the child is gone"


def test_an_echo_that_cannot_start_says_so() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        EchoServer(workers=0)  # the child's thread pool refuses 0 workers and exits before serving
