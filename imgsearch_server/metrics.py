"""Prometheus metrics and the per-request log of the gRPC services; the parts that know no gRPC (a
registry, the /metrics HTTP server) serve the web gateway too.

Every server gets its own `CollectorRegistry` (tests run several servers in one process), filled by:

- `RequestInterceptor`, the outermost server interceptor: for every call, unary or streamed, it counts
  `imgsearch_grpc_requests_total{service, method, code}`, observes
  `imgsearch_grpc_request_seconds{service, method}` (a streamed reply: until its last message), echoes
  the request id in the trailing metadata key `x-request-id` (the caller's own, or a new one) and logs one
  line: at DEBUG when the code is OK, at WARNING, with the details, for every other code. The code is
  the one the caller got: the interceptor serialises replies itself, so a reply over the message limit
  is RESOURCE_EXHAUSTED here too, and a call whose caller left while it ran is DEADLINE_EXCEEDED or
  CANCELLED. Calls that admission (imgsearch_server/admission.py) refuses past `--max-concurrent-rpcs` or
  `--max-streams` are counted in `imgsearch_grpc_rejected_total{service, reason}` as well as with code
  RESOURCE_EXHAUSTED (no latency: they never ran).
- the encoder's `watch_encoder` (encoder_service/metrics.py) and the index's `watch_index`
  (index_service/metrics.py): batch sizes, images embedded, vectors and bytes stored, the model version.

Metric and log labels name the gRPC service and method (`imgsearch.v1.Encoder`, `Embed`): a scrape job
tells the services' replicas apart.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from imgsearch.wire import REQUEST_ID_KEY
from imgsearch_server import admission
from imgsearch_server.errors import call_gone

log = logging.getLogger("imgsearch.metrics")
request_log = logging.getLogger("imgsearch.requests")

METRICS_PATH = "/metrics"

# The names as scraped (counters with _total, histograms as _bucket/_sum/_count, info with _info).
# EXPORTED lists those of every server; each service's own are in its metrics.py's EXPORTED.
GRPC_REQUESTS = "imgsearch_grpc_requests_total"
GRPC_REQUEST_SECONDS = "imgsearch_grpc_request_seconds"
GRPC_REJECTED = "imgsearch_grpc_rejected_total"
EXPORTED = (GRPC_REQUESTS, GRPC_REQUEST_SECONDS, GRPC_REJECTED)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**n) for n in range(11))  # 1, 2, 4, ..., 1024
UNKNOWN = "unknown"  # the service and method labels of a call to a method nobody serves

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def new_registry() -> CollectorRegistry:
    """A registry of its own, with the process's CPU, memory and file descriptors and Python's version."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's `x-request-id` when it is a plain token of up to 128 characters, else a new one
    (16 random hex digits)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if _REQUEST_ID.fullmatch(text):
                return text
            break
    return os.urandom(8).hex()


def _split(path: str) -> tuple[str, str]:
    """Splits "/imgsearch.v1.Encoder/Embed" into ("imgsearch.v1.Encoder", "Embed")."""
    service, _, method = path.lstrip("/").rpartition("/")
    return service or UNKNOWN, method or UNKNOWN


Observer = Callable[[Any, Any], None]  # (request, reply) of a call that ended OK


class ServerMetrics:
    """One server's registry, its request metrics and the interceptor that keeps them."""

    def __init__(self, registry: CollectorRegistry | None = None, max_reply_bytes: int | None = None) -> None:
        self.registry = new_registry() if registry is None else registry
        self.requests = Counter(
            "imgsearch_grpc_requests",
            "gRPC calls ended, by service, method and status code (refused ones included)",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imgsearch_grpc_request_seconds",
            "time from a call's arrival (its wait for a worker included) to its status; a streamed reply: "
            "to its last message",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "imgsearch_grpc_rejected",
            "calls refused for load with RESOURCE_EXHAUSTED before they ran, by service and reason",
            ["service", "reason"],
            registry=self.registry,
        )
        self.observers: dict[str, Observer] = {}
        self.interceptor = RequestInterceptor(self, max_reply_bytes)
        # labels() takes a lock and builds a key: each call reuses the children instead
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    def count(self, service: str, method: str, code: str) -> None:
        """One more call of `service`/`method` ended with `code` (a status code's name)."""
        child = self._counted.get((service, method, code))
        if child is None:
            child = self._counted.setdefault(
                (service, method, code), self.requests.labels(service, method, code)
            )
        child.inc()

    def observe_latency(self, service: str, method: str, seconds: float) -> None:
        """One call of `service`/`method` took `seconds`."""
        child = self._timed.get((service, method))
        if child is None:
            child = self._timed.setdefault((service, method), self.latency.labels(service, method))
        child.observe(seconds)

    def expect(self, services: Iterable[str]) -> None:
        """Shows the rejection counters of these gRPC services at 0 before the first rejection."""
        for service in services:
            for reason in (admission.REFUSED_FOR_CALLS, admission.REFUSED_FOR_STREAMS):
                self.rejected.labels(service, reason)

    def refused(self, path: str, reason: str) -> None:
        """One call of `path` refused for load (`reason`: the bound it met); admission calls this."""
        self.rejected.labels(_split(path)[0], reason).inc()

    def on_ok(self, path: str, observer: Observer) -> None:
        """Calls `observer(request, reply)` after each call of `path` ("/pkg.Service/Method") that ends
        OK (a unary reply only); what it raises is logged, never the caller's problem."""
        self.observers[path] = observer


class _Call:
    """What the interceptor knows of one call."""

    __slots__ = ("method", "request_id", "service", "started")

    def __init__(self, service: str, method: str, request_id: str) -> None:
        self.service = service
        self.method = method
        self.request_id = request_id
        self.started = time.perf_counter()


class RequestInterceptor(grpc.ServerInterceptor):
    """Counts, times and logs every call, and tags it with a request id; see the module's doc.

    Put it first among a server's interceptors, so that it also sees what the later ones refuse (an
    UNAUTHENTICATED call, one refused for load). It serialises each reply itself, so that a reply
    too large for a message (`max_reply_bytes`) or one that cannot be serialised is refused, counted
    and logged with its real code, and a call whose caller left (its deadline passed, or it cancelled)
    while it ran is counted as what the caller saw, not as OK."""

    def __init__(self, metrics: ServerMetrics, max_reply_bytes: int | None = None) -> None:
        self._metrics = metrics
        self.max_reply_bytes = max_reply_bytes

    def intercept_service(
        self, continuation: admission.Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        path = handler_call_details.method
        metadata: Sequence[tuple[str, Any]] = handler_call_details.invocation_metadata or ()
        if handler is None:
            call = _Call(UNKNOWN, UNKNOWN, request_id(metadata))
            self._end(call, grpc.StatusCode.UNIMPLEMENTED, None, f"no method {path}", timed=False)
            return None
        return self._wrap(handler, path, _Call(*_split(path), request_id(metadata)))

    def _serialize(self, reply: Any, serializer: Callable[[Any], bytes] | None) -> Any:
        """The reply as the bytes gRPC will send; raises _ReplyTooLarge past the message limit."""
        data = serializer(reply) if serializer is not None else reply
        if self.max_reply_bytes is not None and isinstance(data, bytes) and len(data) > self.max_reply_bytes:
            raise _ReplyTooLarge(
                f"the reply is {len(data)} bytes, over the limit of {self.max_reply_bytes} bytes per message "
                "(--max-message-bytes); ask for fewer results or items per call"
            )
        return data

    def _wrap(self, handler: grpc.RpcMethodHandler, path: str, call: _Call) -> grpc.RpcMethodHandler:
        behavior = admission.behavior_of(handler)
        if behavior is None:
            return handler
        run: Callable[..., Any] = behavior
        timed = not admission.refused_for_load(handler)
        observer = self._metrics.observers.get(path)
        serializer = handler.response_serializer

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                reply = run(request, context)
                data = self._serialize(reply, serializer)
            except _ReplyTooLarge as error:
                self._abort(call, context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            except BaseException:
                self._finish(call, context, grpc.StatusCode.UNKNOWN, timed=timed)
                raise
            code = self._finish(call, context, grpc.StatusCode.OK, timed=timed)
            if observer is not None and code == grpc.StatusCode.OK:
                try:
                    observer(request, reply)
                except Exception:
                    log.exception("metrics: observing %s failed", path)
            return data

        def streamed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                for reply in run(request, context):
                    yield self._serialize(reply, serializer)
            except _ReplyTooLarge as error:
                self._abort(call, context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
            except GeneratorExit:  # the stream was dropped: the caller went away
                self._finish(call, context, grpc.StatusCode.CANCELLED)
                raise
            except BaseException:
                self._finish(call, context, grpc.StatusCode.UNKNOWN)
                raise
            self._finish(call, context, grpc.StatusCode.OK)

        return admission.handler_like(
            handler, streamed if handler.response_streaming else unary, response_serializer=_as_sent
        )

    def _abort(self, call: _Call, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        """Fails the call with `code`, counted and logged as such first (abort raises)."""
        try:
            context.set_code(code)
            context.set_details(message)
        except Exception:  # a context that keeps neither: count and log all the same
            pass
        self._finish(call, context, code)
        context.abort(code, message)

    def _finish(
        self, call: _Call, context: grpc.ServicerContext, default: grpc.StatusCode, *, timed: bool = True
    ) -> grpc.StatusCode:
        """Echoes the request id, then counts and logs the call; returns its status code: the one the
        handler set or aborted with, else `default` (OK on a normal return, UNKNOWN on an exception, as
        grpcio reports them), or what the caller saw when it was gone before the end (DEADLINE_EXCEEDED,
        CANCELLED)."""
        code: grpc.StatusCode = context.code() or default  # type: ignore[attr-defined]
        why = ""
        if code == grpc.StatusCode.OK and (gone := call_gone(context)) is not None:
            code, why = gone, "the caller was gone before the reply"
        try:
            trailing = tuple(context.trailing_metadata() or ())
            if not any(key == REQUEST_ID_KEY for key, _ in trailing):
                context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, call.request_id)))
        except Exception:  # a context that keeps no trailing metadata: count and log all the same
            pass
        self._end(call, code, context, why, timed=timed)
        return code

    def _end(
        self,
        call: _Call,
        code: grpc.StatusCode,
        context: grpc.ServicerContext | None,
        why: str,
        *,
        timed: bool,
    ) -> None:
        elapsed = time.perf_counter() - call.started
        self._metrics.count(call.service, call.method, code.name)
        if timed:
            self._metrics.observe_latency(call.service, call.method, elapsed)
        level = logging.DEBUG if code == grpc.StatusCode.OK else logging.WARNING
        if not request_log.isEnabledFor(level):
            return
        peer = context.peer() if context is not None else ""
        details: Any = why
        if context is not None and code != grpc.StatusCode.OK:
            details = context.details() or why  # type: ignore[attr-defined]
            if isinstance(details, bytes):
                details = details.decode("utf-8", "replace")
        fields = {
            "service": call.service,
            "method": call.method,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3) if timed else None,
            "request_id": call.request_id,
            "peer": peer,
        }
        if details:
            fields["details"] = details
        request_log.log(
            level,
            "%s/%s %s %s request_id=%s peer=%s%s",
            call.service,
            call.method,
            code.name,
            f"{elapsed * 1000:.1f} ms" if timed else "(not run)",
            call.request_id,
            peer or "-",
            f": {details}" if details else "",
            extra={"fields": fields},
        )


class _ReplyTooLarge(Exception):
    """A reply over the message limit: refused by the interceptor instead of failing inside gRPC."""


def _as_sent(data: Any) -> bytes:
    """The response serializer of a wrapped call: the interceptor has serialised the reply already."""
    return data if isinstance(data, bytes) else data.SerializeToString()  # type: ignore[no-any-return]


# Serving /metrics.


class MetricsServer:
    """The registry over HTTP (any path; /metrics by convention) on a thread of its own."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        error: OSError | None = None
        for address in _bind_addresses(host):
            try:
                self._httpd, self._thread = start_http_server(port, address, registry=registry)
                break
            except OSError as caught:
                error = caught
        if self._httpd is None:
            raise OSError(f"cannot serve metrics on {host or '0.0.0.0'}:{port}: {error}")
        bound = self._httpd.server_address[0]
        self.host = bound.decode() if isinstance(bound, bytes) else str(bound)
        self.port = int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def close(self) -> None:
        """Stops serving (within the HTTP server's poll interval, 0.5 s) and frees the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _bind_addresses(host: str) -> list[str]:
    """The addresses to try for a gRPC-style host: "[::]" is every interface, IPv6 and IPv4 where the
    machine has IPv6, else IPv4's."""
    bare = host.strip().removeprefix("[").removesuffix("]")
    if bare in ("", "0.0.0.0"):
        return ["0.0.0.0"]
    if bare == "::":
        return ["::", "0.0.0.0"] if socket.has_ipv6 else ["0.0.0.0"]
    return [bare]
