"""Both services as local processes on this machine: for `make demo`, `make up` and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch import security


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    address: str,
    timeout_s: float = 60.0,
    process: subprocess.Popen[bytes] | None = None,
    tls_ca: security.PathLike | None = None,
) -> None:
    """Returns once the service at `address` reports SERVING (over TLS when `tls_ca` is given); raises
    RuntimeError after the timeout or as soon as its process exits."""
    deadline = time.monotonic() + timeout_s
    with security.open_channel(address, tls_ca=tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service for {address} exited with code {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"no healthy service at {address} after {timeout_s:.0f} s")


class ServiceProcess:
    """One service (`python -m MODULE ARGS`) as a child process, stopped with SIGTERM."""

    def __init__(
        self, module: str, port: int, args: Sequence[str] = (), log_path: Path | None = None
    ) -> None:
        self.module, self.port, self.args, self.log_path = module, port, list(args), log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port), *self.args],
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log else None,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if log:
            log.close()
        return self

    def wait_healthy(self, timeout_s: float = 60.0, tls_ca: security.PathLike | None = None) -> None:
        wait_healthy(self.address, timeout_s, self.process, tls_ca)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited in time; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class LocalServices:
    """The encoder and the index as child processes; a context manager that always stops both."""

    def __init__(
        self,
        data_dir: Path,
        encoder_port: int | None = None,
        index_port: int | None = None,
        log_dir: Path | None = None,
        encoder_args: Sequence[str] = (),
    ) -> None:
        self.encoder = ServiceProcess(
            "encoder_service",
            encoder_port or free_port(),
            encoder_args,
            log_dir / "encoder.log" if log_dir else None,
        )
        self.index = ServiceProcess(
            "index_service",
            index_port or free_port(),
            ["--data-dir", str(data_dir)],
            log_dir / "index.log" if log_dir else None,
        )

    def __enter__(self) -> LocalServices:
        try:
            self.encoder.start()
            self.index.start()
            tls_ca = os.environ.get("IMGSEARCH_TLS_CA") or None  # services started with TLS settings
            self.encoder.wait_healthy(tls_ca=tls_ca)
            self.index.wait_healthy(tls_ca=tls_ca)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        self.index.stop()
        self.encoder.stop()


def run_until_stopped(processes: list[ServiceProcess]) -> None:
    """Returns on Ctrl-C or SIGTERM, or once one of the processes exits."""
    stop = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop and all(p.process is not None and p.process.poll() is None for p in processes):
            time.sleep(0.3)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """`make up`: both services on their default ports, logging here, until Ctrl-C or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.local", description=main.__doc__)
    parser.add_argument(
        "--encoder-port", type=int, default=int(os.environ.get("IMGSEARCH_ENCODER_PORT", 50051))
    )
    parser.add_argument("--index-port", type=int, default=int(os.environ.get("IMGSEARCH_INDEX_PORT", 50052)))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("IMGSEARCH_DATA_DIR", "index-data"))
    )
    args = parser.parse_args(argv)
    with LocalServices(args.data_dir, args.encoder_port, args.index_port) as services:
        print(
            f"encoder on {services.encoder.address}, index on {services.index.address} "
            f"(data in {args.data_dir}); Ctrl-C stops both",
            file=sys.stderr,
            flush=True,
        )
        run_until_stopped([services.encoder, services.index])
    return 0


if __name__ == "__main__":
    sys.exit(main())
