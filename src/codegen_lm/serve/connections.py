"""Connections: what the server does on its own against slow or idle clients, and how it stops.

- **Header timeout.** A connection must deliver a request's headers within ``header_timeout`` seconds of opening
  (or of its previous response): a socket that trickles its headers, or never sends them, is answered 408 and closed.
- **No lockout at the connection limit.** Past ``max_connections``, a new connection evicts the connection that has
  waited longest for headers (idle keep-alive or slow), instead of being refused: sockets held open by a slow client
  cannot keep ``/health`` or a real request out. Only when every connection is busy with a request is the newcomer
  answered 503.
- **Draining shutdown.** On SIGTERM/SIGINT the server first drains while it still accepts connections: ``/health``
  answers 503 (a load balancer takes the replica out), new requests get 503, running ones get ``shutdown_timeout``
  seconds to finish and then end with an error (an error event for streams). Only then does uvicorn stop listening.

uvicorn's HTTP protocol classes are extended rather than replaced: the guard only watches when a request's headers
have arrived (the protocol starts a request cycle) and when its response is complete.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from .protocol import ApiError


def _raw_response(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = json.dumps(ApiError(status, message).body()).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


def guarded(base: type[asyncio.Protocol], header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """``base`` (one of uvicorn's HTTP protocols) with a header timeout and eviction at ``max_connections``."""
    waiting: dict[Any, None] = {}  # connections awaiting request headers, longest-waiting first (insertion order)

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._seen_cycle: Any = None
            self._header_timer: asyncio.TimerHandle | None = None
            self._received = False  # bytes of the awaited request have arrived
            self._refused = False
            if len(self.connections) > max_connections and not self._evict_one():
                # Answer at once, then only read (and drop) what the client sends until it leaves or the header
                # timeout ends it: closing with its request unread would reset the connection, answer and all.
                self._refused = True
                transport.write(_raw_response(503, "Service Unavailable", "the server has too many open connections, "
                                              "all of them busy; retry shortly", "retry-after: 1\r\n"))
                if transport.can_write_eof():
                    transport.write_eof()
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._received = True
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._seen_cycle:  # headers complete
                self._stop_waiting()

        def on_response_complete(self) -> None:
            self._seen_cycle = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is self._seen_cycle:  # (no pipelined request started)
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._received = False
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)
            waiting[self] = None

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            waiting.pop(self, None)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting.pop(self, None)
            if self.transport.is_closing():
                return
            if self._received and not self._refused:  # a request was begun: say why it ends (an idle one just closes)
                self.transport.write(_raw_response(408, "Request Timeout", "the request headers did not arrive "
                                                   f"within {header_timeout:g} s"))
            self.transport.close()

        def _evict_one(self) -> bool:
            """Close the connection that has waited longest for request headers; False if none is waiting."""
            oldest = next(iter(waiting), None)
            if oldest is None:
                return False
            oldest._stop_waiting()
            oldest.transport.close()
            return True

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining (``drain``) before it stops accepting connections."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.force_exit:  # a second Ctrl-C skips the drain
            drain = asyncio.ensure_future(self._drain())
            while not drain.done() and not self.force_exit:
                await asyncio.wait({drain}, timeout=0.1)
            drain.cancel()
        await super().shutdown(sockets)


def http_config(app: Any, host: str, port: int, *, header_timeout: float = 10.0, max_connections: int = 1024,
                log_level: str = "info", http: str = "auto") -> uvicorn.Config:
    """uvicorn settings with the connection guard in place of its plain concurrency limit (which would answer 503 to
    every newcomer once slow sockets fill it)."""
    if header_timeout <= 0:
        raise ValueError(f"the header timeout must be positive (got {header_timeout:g} s)")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1 (got {max_connections})")
    base = import_from_string(HTTP_PROTOCOLS[http])
    # The drain itself bounds how long requests may run on; uvicorn's own graceful timeout only covers the last writes.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                          http=guarded(base, header_timeout, max_connections))
