"""Which threads run a call, and how many calls of each kind may be in flight, for both gRPC servers.

gRPC's own `maximum_concurrent_rpcs` counts every call alike and runs them all on one pool: eight open
health `Watch` streams (open to anyone) held all eight workers, and a busy service refused its own
health probe. Here each kind of call has threads of its own and a bound of its own:

- unary calls (Embed, Search...): the server's `--workers`, at most `--max-concurrent-rpcs` queued or
  running; past it, RESOURCE_EXHAUSTED at once;
- health `Watch` streams, and other streams (Scan, reflection): `--max-streams` open of each, each
  stream on a thread of that kind's pool, never a worker's;
- health `Check`: a small pool of its own that never waits behind work (nor behind refusals), so a probe
  answers in milliseconds under any load and counts against no bound;
- every refusal (load, a missing or wrong token): another small pool, so a flood of refused calls
  delays neither the work nor the probes.

The bounds are read from the pools themselves (tasks queued or running), in gRPC's serving thread just
before it submits the call: the decision and the count cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from imgsearch_server.pools import LastIdleFirstPool

# What a server interceptor is handed: the rest of the chain, giving the call's handler.
Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # probes (Docker, load balancers) carry no token
SMALL_POOL_THREADS = 2  # health checks and refusals each take microseconds
REFUSED_FOR_CALLS = "max_concurrent_rpcs"
REFUSED_FOR_STREAMS = "max_streams"
_REFUSAL = "imgsearch_refusal"  # marks a behaviour that only aborts: it runs on the refusals' pool
FOR_LOAD = "for load"


def refused_for_load(handler: grpc.RpcMethodHandler) -> bool:
    """Whether the handler is admission's refusal of a call past its bound (a call that never ran)."""
    return getattr(behavior_of(handler), _REFUSAL, None) == FOR_LOAD


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any] | None:
    """The function that serves the call, whatever the handler's shape."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream  # type: ignore[no-any-return]
    if handler.request_streaming:
        return handler.stream_unary  # type: ignore[no-any-return]
    if handler.response_streaming:
        return handler.unary_stream  # type: ignore[no-any-return]
    return handler.unary_unary  # type: ignore[no-any-return]


def handler_like(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
    keep_request_deserializer: bool = True,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that runs `behavior`, on the same pool as `handler`'s behaviour
    unless `behavior` names its own (the interceptors each wrap the one before)."""
    old = behavior_of(handler)
    for attribute in ("experimental_thread_pool", _REFUSAL):
        if not hasattr(behavior, attribute) and hasattr(old, attribute):
            setattr(behavior, attribute, getattr(old, attribute))
    make: Callable[..., grpc.RpcMethodHandler]
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    deserializer = request_deserializer
    if deserializer is None and keep_request_deserializer:
        deserializer = handler.request_deserializer
    return make(
        behavior,
        request_deserializer=deserializer,
        response_serializer=response_serializer or handler.response_serializer,
    )


def refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, *, for_load: bool = False
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape that fails the call with `code` and never parses the request;
    admission runs it on the refusals' pool."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    setattr(refuse, _REFUSAL, FOR_LOAD if for_load else "refused")
    return handler_like(handler, refuse, keep_request_deserializer=False)


def _on(pool: futures.ThreadPoolExecutor, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    behavior = behavior_of(handler)
    if behavior is None:
        return handler

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, context)

    run.experimental_thread_pool = pool  # type: ignore[attr-defined]  # grpcio's per-method pool
    return handler_like(handler, run)


class Admission(grpc.ServerInterceptor):
    """Sends each call to its kind's pool, or refuses it with RESOURCE_EXHAUSTED when that kind is at its
    bound; see the module's doc. Put it after the metrics interceptor and before the token's."""

    def __init__(
        self,
        *,
        workers: int,
        max_calls: int,
        max_streams: int,
        on_refused: Callable[[str, str], None] = lambda _path, _reason: None,
        place: bool = False,
    ) -> None:
        """`place`: a lone call's thread is held to the core that submitted it (pools.py)."""
        self.workers = LastIdleFirstPool(workers, "grpc", place=place)
        self.streams = LastIdleFirstPool(max_streams, "grpc-stream", place=place)
        self.watches = LastIdleFirstPool(max_streams, "grpc-watch", place=place)
        self.health = LastIdleFirstPool(SMALL_POOL_THREADS, "grpc-health", place=place)
        self.refusals = LastIdleFirstPool(SMALL_POOL_THREADS, "grpc-refusal", place=place)
        self.max_calls = max_calls
        self.max_streams = max_streams
        self._on_refused = on_refused

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if getattr(behavior_of(handler), _REFUSAL, False):
            return _on(self.refusals, handler)
        path = handler_call_details.method
        streamed = handler.request_streaming or handler.response_streaming
        if not streamed:
            if path.startswith(OPEN_PREFIXES):
                return _on(self.health, handler)
            if self.workers.pending >= self.max_calls:
                return self._refuse(handler, path, REFUSED_FOR_CALLS, f"{self.max_calls} calls in flight")
            return handler  # the server's default pool: the workers
        pool = self.watches if path.startswith(OPEN_PREFIXES) else self.streams
        if pool.pending >= self.max_streams:
            kind = "health watch" if pool is self.watches else "data"
            return self._refuse(handler, path, REFUSED_FOR_STREAMS, f"{self.max_streams} {kind} streams open")
        return _on(pool, handler)

    def _refuse(
        self, handler: grpc.RpcMethodHandler, path: str, reason: str, what: str
    ) -> grpc.RpcMethodHandler:
        self._on_refused(path, reason)
        flag = "--max-concurrent-rpcs" if reason == REFUSED_FOR_CALLS else "--max-streams"
        message = f"refused for load: {what} ({flag}); retry later"
        refused = refusal(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, message, for_load=True)
        return _on(self.refusals, refused)

    def shutdown(self) -> None:
        """Lets the pools' threads go once their tasks end (after the server stopped)."""
        for pool in (self.workers, self.streams, self.watches, self.health, self.refusals):
            pool.shutdown(wait=False, cancel_futures=True)
