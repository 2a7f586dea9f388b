"""Hostile load: how fast health and ordinary calls answer while 150 calls hold the workers or 64 health
`Watch` streams are held open, for three ways of serving (bench/model_server.py) and for the real
encoder service, every server in a process of its own.

This is the measurement behind the services' server model (imgsearch_server/admission.py): it keeps
grpcio's sync server and gives each kind of call threads of its own, rather than moving to `grpc.aio`."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.encoder import start_serving
from bench.report import Figure, Section, p50_p99_ms
from imgsearch.v1 import encoder_pb2
from tests.support import encode, glyph
from tools.local import ServiceProcess, free_port, wait_healthy

MODELS = ("shared", "pools", "aio")
IN_FLIGHT = 150
WATCHES = 64
PROBE_TIMEOUT_S = 1.0


def raw(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary method of `channel` that takes and returns bytes."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _health(channel: grpc.Channel) -> Callable[[], Any]:
    stub = health_pb2_grpc.HealthStub(channel)
    return lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)


def timed(call: Callable[[], Any], repeat: int, pause_s: float = 0.0) -> tuple[np.ndarray, int]:
    """Each call's seconds (a failed call counts as the timeout) and how many failed."""
    times, failed = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            call()
        except grpc.RpcError:
            failed += 1
            times.append(PROBE_TIMEOUT_S)
            continue
        times.append(time.perf_counter() - started)
        if pause_s:
            time.sleep(pause_s)
    return np.array(times), failed


@contextmanager
def calls_in_flight(channel: grpc.Channel, method: str, request: Any, count: int) -> Iterator[list[Any]]:
    """`count` calls started and left running; cancelled on the way out."""
    call = raw(channel, method)
    started = [call.future(request, timeout=120) for _ in range(count)]
    time.sleep(0.3)
    try:
        yield started
    finally:
        for future in started:
            future.cancel()


@contextmanager
def watches_open(channel: grpc.Channel, count: int) -> Iterator[list[bool]]:
    """`count` health Watch streams asked for and left open; yields, per stream, whether it has sent
    its first status (it is being served) so far."""
    stub = health_pb2_grpc.HealthStub(channel)
    streams = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(count)]
    served = [False] * count

    def first(position: int) -> None:
        try:
            next(streams[position])
            served[position] = True
        except grpc.RpcError:
            pass

    readers = [threading.Thread(target=first, args=(n,), daemon=True) for n in range(count)]
    for reader in readers:
        reader.start()
    time.sleep(1.0)
    try:
        yield served
    finally:
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.join(5)


def _row(name: str, times: np.ndarray, failed: int) -> str:
    p50, p99 = p50_p99_ms(times)
    return f"| {name} | {p50:.2f} | {p99:.2f} | {failed} of {len(times)} |"


def measure_model(model: str, repeat: int) -> tuple[list[str], dict[str, tuple[np.ndarray, int]]]:
    port = free_port()
    server = ServiceProcess("bench.model_server", port, [model])
    server.start()
    results: dict[str, tuple[np.ndarray, int]] = {}
    try:
        wait_healthy(server.address, 60, server.process)  # type: ignore[arg-type]
        address = server.address
        with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address) as load:
            echo = raw(channel, "/bench.Work/Echo")
            results["echo, idle"] = timed(lambda: echo(b"x" * 100, timeout=PROBE_TIMEOUT_S), repeat * 10)
            results["health Check, idle"] = timed(_health(channel), repeat * 10)
            with calls_in_flight(load, "/bench.Work/Busy", b"", IN_FLIGHT):
                results[f"health Check, {IN_FLIGHT} calls in flight"] = timed(_health(channel), repeat, 0.02)
            with watches_open(load, WATCHES) as served:
                echoes = timed(lambda: echo(b"x" * 100, timeout=PROBE_TIMEOUT_S), repeat)
                results[f"echo, {WATCHES} Watch streams asked ({sum(served)} served)"] = echoes
    finally:
        server.stop()
    return [_row(f"{model}: {name}", *values) for name, values in results.items()], results


def measure_encoder(repeat: int) -> list[str]:
    """The real encoder service (LiteRT): health while IN_FLIGHT Embed calls of 3 large PNGs wait."""
    service, _ = start_serving(["--workers", "4"])
    rows = []
    try:
        big = encode(glyph((1500, 1500)).convert("RGB"), "PNG")
        request = encoder_pb2.EmbedRequest(images=[encoder_pb2.Image(encoded=big)] * 3).SerializeToString()
        address = service.address
        with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address) as load:
            rows.append(_row("encoder service: health Check, idle", *timed(_health(channel), repeat * 10)))
            method = "/imgsearch.v1.Encoder/Embed"
            with calls_in_flight(load, method, request, IN_FLIGHT):
                times, failed = timed(_health(channel), repeat, 0.02)
            name = f"encoder service: health Check, {IN_FLIGHT} Embed calls in flight"
            rows.append(_row(name, times, failed))
    finally:
        service.stop()
    return rows


def run(out: Path, quick: bool) -> list[Section]:
    repeat = 20 if quick else 100
    section = Section("Hostile load: health and calls while the workers are full or streams held open")
    rows = ["| server, case | p50 ms | p99 ms | failed (1 s timeout) |", "| --- | ---: | ---: | ---: |"]
    by_model = {}
    for model in MODELS:
        print(f"bench: hostile: {model}", file=sys.stderr, flush=True)
        model_rows, by_model[model] = measure_model(model, repeat)
        rows += model_rows
    rows += measure_encoder(repeat)
    section.tables.append(
        (
            "Each server in its own process; `shared`: one pool for every call (the services before), "
            "`pools`: imgsearch_server/admission.py (the services now), `aio`: grpc.aio with the work on "
            f"an executor. {IN_FLIGHT} calls in flight each hold a worker for 0.2 s.",
            "\n".join(rows),
        )
    )
    idle_pools = p50_p99_ms(by_model["pools"]["echo, idle"][0])[0]
    idle_aio = p50_p99_ms(by_model["aio"]["echo, idle"][0])[0]
    loaded = by_model["pools"][f"health Check, {IN_FLIGHT} calls in flight"]
    section.figures.append(
        Figure(
            f"pools: health Check p99 with {IN_FLIGHT} calls in flight",
            p50_p99_ms(loaded[0])[1],
            "ms",
            target="< 1000 ms, none failed",
            met=p50_p99_ms(loaded[0])[1] < 1000 and loaded[1] == 0,
        )
    )
    section.figures.append(
        Figure(
            "pools: echo p50, idle",
            idle_pools,
            "ms",
            reference="aio: echo p50, idle",
            reference_value=idle_aio,
            ratio=idle_pools / idle_aio if idle_aio else None,
        )
    )
    _ = out
    return [section]
