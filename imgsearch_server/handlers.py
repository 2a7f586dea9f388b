"""Registers a servicer so that a request protobuf cannot parse gets INVALID_ARGUMENT, not INTERNAL.

grpcio's generated `add_*Servicer_to_server` answers a request that fails to parse (for example a
string field holding bad UTF-8) with INTERNAL "Exception deserializing request!". Users deserve to
know it was their request: here the parse error becomes INVALID_ARGUMENT with protobuf's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message, symbol_database
from google.protobuf.descriptor import ServiceDescriptor


class _Unparsable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except message.DecodeError as error:
            return _Unparsable(str(error))

    return parse


def _guarded(
    method: Callable[[Any, grpc.ServicerContext], Any],
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request cannot be parsed: {request.reason}")
        return method(request, context)

    return handle


def add_servicer(server: grpc.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Registers every method of `service` on `servicer` (unary, or with a streamed reply) with parse
    errors as INVALID_ARGUMENT."""
    classes = symbol_database.Default()
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{service.full_name}.{method.name}: streamed requests are not supported")
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _guarded(getattr(servicer, method.name)),
            request_deserializer=_parser(classes.GetSymbol(method.input_type.full_name)),
            response_serializer=lambda reply: reply.SerializeToString(),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
