"""What stands between the network and the routes: the Host check of a token-less server, request
body limits and timeouts, a per-token rate limit and the audit log, as one plain ASGI middleware
(so it also sees streaming answers and 401s).

The audit log is JSON lines: time, token id (a hash prefix, never the token), route, volume id,
engine, status; the question text only when asked for. No pixel data ever goes into it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from starlette.exceptions import HTTPException

from medmllm.server.auth import is_loopback_host, token_matches

#: Routes whose body the volume store bounds itself (it streams and knows the volume limit).
STREAMED_BODY_ROUTES = ("/v1/volumes/",)
#: Where a route handler leaves what the audit log should know (volume id, question).
AUDIT_SCOPE_KEY = "medmllm.audit"
MAX_BUCKETS = 10_000
#: Seconds a client may leave a request body (or, at the socket, its headers) stalled.
DEFAULT_CLIENT_TIMEOUT_S = 30.0


def token_id(token: str) -> str:
    """A stable, non-reversible name for a token in logs: the first 12 hex digits of its sha256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenBucket:
    """`rate` requests per second on average, bursts up to `burst`, per key (least recently seen
    keys are forgotten past MAX_BUCKETS, so unknown clients cannot grow it without bound)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if a request may go now (and counts it), else the seconds until one may."""
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        return wait


class AuditLog:
    """Append-only JSON lines, one per request, flushed at once (a crash loses nothing logged)."""

    def __init__(self, path: Path, questions: bool = False) -> None:
        self.path = Path(path)
        self.questions = questions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: Dict[str, Any]) -> None:
        if not self.questions:
            record.pop("question", None)
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Guard:
    """ASGI middleware: 421 for a foreign Host without a token, 413 for oversized bodies, 408 for a
    body stalled `body_timeout_s`, 429 + Retry-After past the rate limit, one audit line."""

    def __init__(
        self,
        app: Callable,
        engine: str,
        token: Optional[str] = None,
        limiter: Optional[TokenBucket] = None,
        audit: Optional[AuditLog] = None,
        max_body_bytes: int = 8 << 20,
        body_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.engine = engine
        self.token = token
        self.limiter = limiter
        self.audit = audit
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        who = self._who(scope)
        scope[AUDIT_SCOPE_KEY] = {}
        status = [0]

        async def send_recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, who)
            if refusal:
                await _reply(send_recorded, *refusal)
                return None
            streamed = scope["path"].startswith(STREAMED_BODY_ROUTES)
            timed = _timed(receive, self.body_timeout_s)
            bounded = timed if streamed else _bounded(timed, self.max_body_bytes, self._too_large())
            return await self.app(scope, bounded, send_recorded)
        finally:
            if self.audit is not None:
                self.audit.write(self._record(scope, who, status[0]))

    def _who(self, scope: dict) -> str:
        """Rate-limit key and audit name: the token's id when it is valid, else the client address."""
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if self.token and token_matches(header, self.token):
            return f"token:{token_id(self.token)}"
        client = scope.get("client") or ("?", 0)
        return f"addr:{client[0]}"

    def _refusal(self, scope: dict, who: str) -> Optional[Tuple[int, str, Dict[str, str]]]:
        headers = dict(scope.get("headers") or [])
        if not self.token and not is_loopback_host(headers.get(b"host", b"").decode("latin-1")):
            message = (
                "this server has no token, so it answers only requests addressed to a loopback name "
                "(Host: 127.0.0.1, localhost or [::1]); start it with --token to serve other names"
            )
            return 421, message, {}
        length = headers.get(b"content-length", b"")
        streamed = scope["path"].startswith(STREAMED_BODY_ROUTES)
        if not streamed and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large(), {}
        if self.limiter is None or scope["path"] == "/healthz":
            return None
        wait = self.limiter.take(who)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            message = f"too many requests: this server allows {self._rate_text()}; retry in {seconds} s"
            return 429, message, {"retry-after": str(seconds)}
        return None

    def _rate_text(self) -> str:
        assert self.limiter is not None
        return f"{self.limiter.rate * 60:g} requests per minute (bursts of {self.limiter.burst:g})"

    def _too_large(self) -> str:
        return f"request body over this server's limit of {self.max_body_bytes} bytes"

    def _record(self, scope: dict, who: str, status: int) -> Dict[str, Any]:
        route = scope.get("route")
        noted = scope.get(AUDIT_SCOPE_KEY) or {}
        params = scope.get("path_params") or {}
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "token": who.split(":", 1)[1] if who.startswith("token:") else None,
            "client": (scope.get("client") or ("?",))[0],
            "route": f"{scope['method']} {getattr(route, 'path', scope['path'][:200])}",
            "volume": noted.get("volume") or params.get("volume_id"),
            "engine": self.engine,
            "status": status,
            "question": noted.get("question"),
        }


def _timed(receive: Callable, timeout_s: float) -> Callable:
    """`receive` that gives up (408) when the client leaves its body stalled for `timeout_s`; once
    the body is complete it waits untimed (a streaming answer listens for the disconnect)."""
    complete = [False]

    async def timed() -> dict:
        if complete[0]:
            return await receive()
        try:
            event = await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body stalled for {timeout_s:g} s; send it again") from None
        if event["type"] != "http.request" or not event.get("more_body", False):
            complete[0] = True
        return event

    return timed


def _bounded(receive: Callable, limit: int, message: str) -> Callable:
    """`receive` that stops a body (chunked, or lying about its length) once it passes `limit`;
    an HTTPException, because FastAPI turns anything else raised while reading a body into a 400."""
    seen = [0]

    async def bounded() -> dict:
        event = await receive()
        if event["type"] == "http.request":
            seen[0] += len(event.get("body", b""))
            if seen[0] > limit:
                raise HTTPException(413, message)
        return event

    return bounded


async def _reply(send: Callable, status: int, detail: str, headers: Optional[Dict[str, str]] = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
