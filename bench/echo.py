"""The floor for any Python gRPC call: a bare echo of the same payload over the same kind of channel."""

from __future__ import annotations

from concurrent import futures

import grpc

from bench.report import p50_p99_ms, samples_s

_METHOD = "/bench.Echo/Echo"
_LIMITS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


class EchoServer:
    """A sync gRPC server (like the services) whose one method returns the request's bytes."""

    def __init__(self, workers: int = 8) -> None:
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo",
            {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
            ],
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
            ],
        )
        self.echo = self.channel.unary_unary(_METHOD, request_serializer=None, response_deserializer=None)

    def latency_ms(self, payload_bytes: int, repeat: int = 500) -> tuple[float, float]:
        """Returns (p50, p99) in ms of echoing a payload of that many bytes."""
        payload = b"x" * payload_bytes
        return p50_p99_ms(samples_s(lambda: self.echo(payload, timeout=30), repeat, warmup=20))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)
