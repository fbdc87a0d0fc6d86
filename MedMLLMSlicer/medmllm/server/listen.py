"""Run the app under uvicorn with the connection limits a shared server needs (docs/security.md).

uvicorn's own settings do most of it: `limit_concurrency` answers 503 past a number of open
connections, `timeout_keep_alive` closes idle keep-alive connections, and forwarded headers
(`X-Forwarded-For`) are trusted only from the proxies the operator names (uvicorn's default trusts
loopback, which would let any local process pick the address the rate limit and audit log see).
One gap is closed here: uvicorn arms no timer on a fresh connection, and any byte received
cancels its keep-alive timer, so a client that connects and sends nothing (or a header a byte at a
time) would hold a socket forever. `TimedHttpToolsProtocol` closes a connection that has no request
in progress `client_timeout_s` after it opened or after its last response.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from medmllm.server.guard import DEFAULT_CLIENT_TIMEOUT_S

#: Seconds an idle keep-alive connection stays open after a response (uvicorn's own timer).
KEEP_ALIVE_S = 5
DEFAULT_MAX_CONNECTIONS = 256


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection left without a complete request header for
    `client_timeout_s` (set per server by `_timed_protocol`)."""

    client_timeout_s = DEFAULT_CLIENT_TIMEOUT_S
    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.client_timeout_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()


def _timed_protocol(client_timeout_s: float) -> type:
    return type("TimedHttpToolsProtocol", (TimedHttpToolsProtocol,), {"client_timeout_s": client_timeout_s})


def serve_app(
    app: Any,
    host: str,
    port: int,
    log_level: str = "info",
    forwarded_allow_ips: Sequence[str] = (),
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve until stopped (blocking)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_timed_protocol(client_timeout_s),
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=list(forwarded_allow_ips) or None,
        limit_concurrency=max_connections,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    uvicorn.Server(config).run()
