"""`python -m bench.model_server MODEL --port PORT`: one of three ways to serve the same two methods and
health, for bench/hostile.py to compare, each in a process of its own.

- `shared`: grpcio's sync server as the services had it: one pool of 8 workers for every call, health
  included, gRPC's own `maximum_concurrent_rpcs` (64) over all of them, and an interceptor that wraps
  every handler, as the services' request metrics do. A wrapped health `Watch` loses grpcio's
  non-blocking mark, so each open stream holds a worker: the stall the services had;
- `pools`: the same server and interceptor with `imgsearch_server.admission` after it: workers for unary
  calls, pools of their own for streams and for health checks and refusals (what the services run now);
- `aio`: `grpc.aio`, health on the event loop, the work on an executor of 8 threads.

`/bench.Work/Echo` returns its request; `/bench.Work/Busy` holds a worker for BUSY_S (sleeping, as a call
waiting on the model or FAISS outside the GIL does) and returns an empty reply.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imgsearch_server.admission import Admission, behavior_of, handler_like

MODELS = ("shared", "pools", "aio")
WORKERS = 8
MAX_CALLS = 64
MAX_STREAMS = 16
BUSY_S = 0.2


def _echo(request: bytes, _context: Any) -> bytes:
    return request


def _busy(_request: bytes, _context: Any) -> bytes:
    time.sleep(BUSY_S)
    return b""


class Wrapping(grpc.ServerInterceptor):
    """Wraps every handler's behaviour in a plain function, as a metrics interceptor does."""

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        behavior = behavior_of(handler) if handler is not None else None
        if behavior is None:
            return handler
        run = behavior

        def wrapped(request: Any, context: Any) -> Any:
            return run(request, context)

        return handler_like(handler, wrapped)


def _handlers(echo: Any, busy: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Work",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Busy": grpc.unary_unary_rpc_method_handler(busy),
        },
    )


def serve_sync(model: str, port: int) -> None:
    if model == "shared":
        server = grpc.server(
            futures.ThreadPoolExecutor(WORKERS), interceptors=[Wrapping()], maximum_concurrent_rpcs=MAX_CALLS
        )
    else:
        admission = Admission(workers=WORKERS, max_calls=MAX_CALLS, max_streams=MAX_STREAMS)
        server = grpc.server(admission.workers, interceptors=[Wrapping(), admission])
    server.add_generic_rpc_handlers((_handlers(_echo, _busy),))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait()


async def serve_aio(port: int) -> None:
    pool = futures.ThreadPoolExecutor(WORKERS)

    async def echo(request: bytes, _context: Any) -> bytes:
        return request

    async def busy(request: bytes, context: Any) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(pool, _busy, request, context)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(echo, busy),))
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_server", description=__doc__)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.model == "aio":
        asyncio.run(serve_aio(args.port))
    else:
        serve_sync(args.model, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
