"""Exits 0 when a gRPC server's grpc.health.v1 Check answers SERVING: the Docker HEALTHCHECK probe.

With IMGSEARCH_TLS_CA set (as in the service's own container when TLS is on) it probes over TLS; health
needs no token, so the probe never holds one.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgsearch import security


def check(
    target: str,
    service: str = "",
    timeout_s: float = 3.0,
    tls_ca: security.PathLike | None = None,
    server_name: str | None = None,
) -> str | None:
    """Returns None when `service` on `target` is SERVING, else one line saying why not."""
    try:
        with security.open_channel(target, tls_ca=tls_ca, server_name=server_name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as err:
        code = err.code() if isinstance(err, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        return f"{target}: health check failed: {name}: {details}"
    except (OSError, ValueError) as err:  # an unreadable CA file
        return f"{target}: health check failed: {err}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return f"{target}: {status}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 when SERVING, 1 otherwise (with one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m imgsearch_server.healthcheck",
        description="Exit 0 when the gRPC server at HOST:PORT reports SERVING through grpc.health.v1.",
    )
    parser.add_argument("target", metavar="HOST:PORT", help="the gRPC server, e.g. localhost:50051")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the Check call in seconds")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("IMGSEARCH_TLS_CA") or None,
        help="CA certificate (PEM) to probe over TLS (env IMGSEARCH_TLS_CA; unset or empty: plaintext)",
    )
    parser.add_argument(
        "--tls-server-name",
        default=os.environ.get("IMGSEARCH_TLS_SERVER_NAME") or None,
        help="the name the server's certificate holds when it is not HOST, e.g. `encoder` for a probe "
        "of localhost (env IMGSEARCH_TLS_SERVER_NAME)",
    )
    args = parser.parse_args(argv)
    problem = check(
        args.target, timeout_s=args.timeout_s, tls_ca=args.tls_ca, server_name=args.tls_server_name
    )
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
