"""Maps plain exceptions to gRPC status codes in servicers, so the work modules need no gRPC."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

log = logging.getLogger("imgsearch.errors")  # the logger's name from before the move to imgsearch_server

Handler = TypeVar("Handler", bound=Callable[..., Any])


class RequestError(Exception):
    """A refused request: the status code and the message the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code = code
        self.trailing = trailing


def call_gone(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """Returns why nobody awaits this call any more (its deadline passed, or the caller cancelled or
    went away), or None while it is still wanted."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if not context.is_active():
        return grpc.StatusCode.CANCELLED
    return None


def grpc_errors(mapping: dict[type[Exception], grpc.StatusCode]) -> Callable[[Handler], Handler]:
    """Decorates a servicer method: exceptions in `mapping` (and RequestError) abort the call with
    their status and message; anything else is logged and becomes INTERNAL.

    A server-streaming method (a generator) is wrapped as a generator, so what it raises while the
    stream is being sent is mapped too, not only what happens before its first message."""

    def decorate(method: Handler) -> Handler:
        def abort(error: Exception, context: grpc.ServicerContext) -> None:
            if isinstance(error, RequestError):
                if error.trailing:
                    context.set_trailing_metadata(error.trailing)
                context.abort(error.code, str(error))
            code = next((c for kind, c in mapping.items() if isinstance(error, kind)), None)
            if code is not None:
                context.abort(code, str(error))
            log.error("%s failed", method.__name__, exc_info=error)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed; see the service log")

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from method(self, request, context)
                except Exception as error:
                    abort(error, context)

            return stream  # type: ignore[return-value]

        @functools.wraps(method)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(self, request, context)
            except Exception as error:
                abort(error, context)

        return wrapper  # type: ignore[return-value]

    return decorate
