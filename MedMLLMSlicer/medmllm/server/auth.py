"""Bearer-token check for every route but /healthz, and the rule that a public bind needs a token.

Written as plain ASGI middleware so it also covers the OpenAPI pages and streaming responses;
the token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

OPEN_PATHS = ("/healthz",)
#: A token for a public bind: at least this long, with at least MIN_TOKEN_DISTINCT different characters.
MIN_TOKEN_CHARS = 24
MIN_TOKEN_DISTINCT = 10


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_host(header: str) -> bool:
    """True when a Host header (`name[:port]`, `[v6]:port`) names this machine's loopback."""
    try:
        name = urlsplit(f"//{header}").hostname
    except ValueError:
        return False
    return bool(name) and is_loopback(name)


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to serve patient data on a reachable address without a token, or with a guessable one."""
    if is_loopback(host):
        return
    if not token:
        raise ValueError(
            f"refusing to listen on {host} without a token: anyone on the network could read the volumes; "
            "pass --token (or bind to 127.0.0.1)"
        )
    check_token_strength(token, host)


def check_token_strength(token: str, where: str) -> None:
    """Refuse a guessable token for a server reachable at `where` (a public bind, Ray Serve's proxy)."""
    if len(token) < MIN_TOKEN_CHARS or len(set(token)) < MIN_TOKEN_DISTINCT:
        raise ValueError(
            f"refusing to listen on {where} with a guessable token: use at least {MIN_TOKEN_CHARS} "
            f"characters with at least {MIN_TOKEN_DISTINCT} different ones, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def token_matches(header: Optional[str], token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token.encode())


class BearerAuth:
    """ASGI middleware answering 401 unless `Authorization: Bearer <token>` matches."""

    def __init__(self, app: Callable, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> Any:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        header = headers.get(b"authorization", b"").decode("latin-1")
        if token_matches(header, self.token):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": "missing or wrong token (Authorization: Bearer <token>)"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return None
