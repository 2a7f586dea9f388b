"""The floor for any Python gRPC call: a bare echo of the same payload over the same kind of channel.

The echo server runs in its own process (`python -m bench.echo`), as every service measured does: in the
benchmark's process it would share the client's GIL, which slows the floor and flatters every ratio
against it (issue 18 measured 0.54 ms for one call across processes).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc

from bench.report import p50_p99_ms, samples_s
from imgsearch_server import cpus
from imgsearch_server.pools import LastIdleFirstPool

_METHOD = "/bench.Echo/Echo"
_LIMITS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
_READY_S = 30.0


class EchoServer:
    """A sync gRPC echo server (like the services: a thread pool) in a child process, and a channel to it.

    `echo(payload)` returns the payload's bytes; `close()` stops the child (and waits for it)."""

    def __init__(self, workers: int = 8, io_core: str = "none") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.echo", "--workers", str(workers), "--io-core", io_core],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = self.process.stdout.readline() if self.process.stdout else ""
            if not line.startswith("port "):
                raise RuntimeError(f"the echo server did not start (exit {self.process.poll()}): {line!r}")
            self.port = int(line.split()[1])
            self.channel = self.new_channel()
        except BaseException:
            self._stop()
            raise
        self.echo = self.method(self.channel)

    def new_channel(self) -> grpc.Channel:
        """A channel of its own to the echo server, connected (for concurrent callers, as clients are)."""
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=_LIMITS)
        grpc.channel_ready_future(channel).result(timeout=_READY_S)
        return channel

    @staticmethod
    def method(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
        """The echo call on `channel`: bytes in, the same bytes back."""
        return channel.unary_unary(_METHOD, request_serializer=None, response_deserializer=None)

    def latency_ms(self, payload_bytes: int, repeat: int = 500) -> tuple[float, float]:
        """Returns (p50, p99) in ms of echoing a payload of that many bytes."""
        payload = b"x" * payload_bytes
        return p50_p99_ms(samples_s(lambda: self.echo(payload, timeout=30), repeat, warmup=20))

    def close(self) -> None:
        self.channel.close()
        self._stop()

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def serve(workers: int, io_core: str = "none") -> None:
    """Serves the echo on a free port, prints `port N`, and stops on SIGTERM or SIGINT. With an io_core
    other than none, its threads are held as the services' are (imgsearch_server.cpus, pools): the
    same hand-offs, without the services' handlers."""
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
    )
    core = cpus.io_core(io_core)
    pool = (
        futures.ThreadPoolExecutor(max_workers=workers)
        if core is None
        else LastIdleFirstPool(workers, "echo", place=True)
    )
    server = grpc.server(pool, options=_LIMITS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    if core is not None:
        cpus.hold_io_threads(core)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    print(f"port {port}", flush=True)
    stopped.wait()
    server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--io-core", default="none", help="auto, none or a core: as the services' flag")
    args = parser.parse_args(argv)
    serve(args.workers, cpus.check_io_core(args.io_core))
    return 0


if __name__ == "__main__":
    sys.exit(main())
