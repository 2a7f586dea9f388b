"""Slow and idle HTTP clients. uvicorn (0.54, h11) times out only an idle keep-alive connection, and only
after a first reply: a client that connects and sends nothing, or drips its request head a byte at a time
(slowloris), or its body, holds its connection, one of --max-connections, for ever. So:

- TimedH11Protocol, uvicorn's h11 protocol with a deadline for the request head (line and headers):
  --header-timeout-s from connecting (the first request) or from the first byte after a keep-alive pause;
  past it, 408 (or, when nothing came at all, a plain close). Its keep-alive timeout is
  --keep-alive-timeout-s. It also closes a connection whose body nobody reads any more (the reply went
  out first, a 401 or 413 say) once it has taken --body-timeout-s more.
- BodyDeadline, an ASGI middleware: while the app reads a body, it must all arrive within
  --body-timeout-s of the head; past it the read raises HTTPException 408 (with Connection: close), which
  the app's handlers turn into the JSON error, logged and counted as any other."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from web.asgi import HttpMiddleware

log = logging.getLogger("web.connections")

HEAD_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
)


@dataclass(frozen=True)
class ConnectionTimeouts:
    keep_alive_s: float
    header_s: float
    body_s: float


class TimedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the request head bounded in time; `timeouts` is set by `timed_protocol`."""

    timeouts: ClassVar[ConnectionTimeouts] = ConnectionTimeouts(keep_alive_s=5.0, header_s=10.0, body_s=30.0)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.timeout_keep_alive = self.timeouts.keep_alive_s  # type: ignore[assignment]  # a float is fine
        self.deadline: asyncio.TimerHandle | None = None
        self.waiting_for: str | None = None  # "head" or "body"
        self.head_bytes = False  # whether any of the awaited head has come

    # The request's phases, as h11 sees the client: IDLE until the head is in, SEND_BODY until the body is.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.expect("head", self.timeouts.header_s)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and self.waiting_for is None:
            self.expect("head", self.timeouts.header_s)  # the next request, after a keep-alive pause
        if self.waiting_for == "head" and data:
            self.head_bytes = True
        super().data_received(data)
        self.follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.follow(replied=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel()
        super().connection_lost(exc)

    def follow(self, replied: bool = False) -> None:
        """Moves the deadline along: the head's ends once h11 leaves IDLE; a body still coming after the
        reply gets --body-timeout-s more (while the app reads a body, BodyDeadline bounds it)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            return  # the head's deadline runs, or keep-alive's (uvicorn's) between requests
        if self.waiting_for == "head":
            self.cancel()
        if state is not h11.SEND_BODY:
            self.cancel()
        elif replied and self.waiting_for is None:
            self.expect("body", self.timeouts.body_s)

    def expect(self, phase: str, seconds: float) -> None:
        self.cancel()
        self.waiting_for = phase
        self.head_bytes = False
        self.deadline = self.loop.call_later(seconds, self.timed_out)

    def cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = None
        self.waiting_for = None

    def timed_out(self) -> None:
        phase, self.deadline, self.waiting_for = self.waiting_for, None, None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == "head":
            limit = self.timeouts.header_s
            if self.head_bytes:
                body = (
                    b'{"detail": "the request line and headers did not arrive within %g s '
                    b'(--header-timeout-s)"}' % limit
                )
                self.transport.write(HEAD_TIMED_OUT % (len(body), body))
            log.info("closed the connection from %s: no request head within %g s", client, limit)
        else:
            log.info("closed the connection from %s: the rest of an unread body took too long", client)
        self.transport.close()


def timed_protocol(timeouts: ConnectionTimeouts) -> type[TimedH11Protocol]:
    """TimedH11Protocol with these timeouts, for uvicorn.Config(http=...): uvicorn makes the protocol from
    its class, so the settings ride on a subclass."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"timeouts": timeouts})


class BodyDeadline(HttpMiddleware):
    """An ASGI middleware: a request's body must arrive within `timeout_s` of its head (this call);
    reading past that raises HTTPException 408, Connection: close. Only while the body is incomplete:
    a read after it (an app awaiting http.disconnect) waits as long as it likes."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        super().__init__(app)
        self.timeout_s = timeout_s

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def bounded() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout-s)",
                    {"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, bounded, send)
