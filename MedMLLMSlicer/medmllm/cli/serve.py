"""`medmllm serve`: run the model server for one engine (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from medmllm.cli import UsageError
from medmllm.engines.base import EngineError, EngineOptions
from medmllm.grounding.registry import slice_dialect_names

TOKEN_ENV = "MEDMLLM_TOKEN"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the model server (HTTP API, see docs/api.md)")
    add_engine_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)"
    )
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'Authorization: Bearer TOKEN' on every route but /healthz (default: ${TOKEN_ENV}, "
        "which unlike the command line other users cannot see in ps)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=Path.home() / ".cache" / "medmllm" / "server",
        help="folder for uploaded volumes and result files (default ~/.cache/medmllm/server)",
    )
    p.add_argument("--max-volume-mb", type=float, default=2048, help="largest accepted volume upload (MB)")
    p.add_argument("--max-store-gb", type=float, default=20, help="disk bound of the volume store (GB, LRU)")
    p.add_argument("--max-memory-gb", type=float, default=4, help="volumes kept decoded in memory (GB, LRU)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--exit-with",
        type=int,
        metavar="PID",
        help="stop when process PID ends (the Slicer module passes its own: see medmllm/server/watchdog.py)",
    )
    add_exposure_arguments(p)
    p.set_defaults(func=run)


def add_exposure_arguments(p: argparse.ArgumentParser) -> None:
    """Who may call the server and how often, and what is recorded (see docs/security.md)."""
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser origin allowed to call the API, e.g. https://viewer.example.org (repeatable; "
        "default none: CORS closed)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0,
        metavar="PER_MINUTE",
        help="requests per minute per token (per address without a token); 0 = no limit (default)",
    )
    p.add_argument("--rate-burst", type=int, default=30, help="requests allowed at once (default 30)")
    p.add_argument("--audit-log", type=Path, help="append one JSON line per request to this file")
    p.add_argument(
        "--audit-questions", action="store_true", help="also write the question text into the audit log"
    )
    p.add_argument(
        "--answer-timeout",
        type=float,
        default=300,
        metavar="SECONDS",
        help="end an answer whose model sends nothing for this long (default 300)",
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=8,
        help="largest request body other than a volume upload (MB, default 8)",
    )
    add_connection_arguments(p)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """Slow or idle clients, concurrency, and which proxy may name the client (docs/security.md)."""
    p.add_argument(
        "--client-timeout",
        type=float,
        default=30,
        metavar="SECONDS",
        help="close a connection that sends no complete request header, or leaves a body stalled, "
        "for this long (default 30)",
    )
    p.add_argument("--max-uploads", type=int, default=8, help="volume uploads received at once (default 8)")
    p.add_argument(
        "--max-connections", type=int, default=256, help="open connections; past it 503 (default 256)"
    )
    p.add_argument(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="comma-separated addresses of the reverse proxies whose X-Forwarded-For / -Proto to trust "
        "(default: none, the peer address is the client)",
    )


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine choice and EngineOptions, shared by `serve` and `ask`."""
    p.add_argument("--engine", default="builtin", help="engine name (default builtin; see GET /v1/models)")
    p.add_argument("--model", help="model path or name for the engine")
    p.add_argument("--base-url", help="OpenAI-compatible server URL (engine openai)")
    p.add_argument("--api-key", help="API key of that server")
    p.add_argument(
        "--dialect",
        help=f"grounding dialect of the model (engine openai): {', '.join(slice_dialect_names())}; "
        "default: guessed from the served model's name",
    )
    p.add_argument("--device", help="torch device, e.g. cuda or cpu")
    p.add_argument("--dtype", help="torch dtype, e.g. bfloat16")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine-specific option, repeatable (e.g. llama=/path, segmenter=none, max_images=4)",
    )


def _engine_extra(pairs: List[str]) -> Dict[str, str]:
    extra: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE; got {pair!r}")
        extra[key.strip()] = value
    return extra


def engine_from_args(args: argparse.Namespace):
    from medmllm.engines.registry import create_engine

    options = EngineOptions(
        model=args.model,
        base_url=args.base_url,
        api_key=args.api_key,
        dialect=args.dialect,
        device=args.device,
        dtype=args.dtype,
        extra=_engine_extra(args.option),
    )
    try:
        return create_engine(args.engine, options)
    except EngineError as exc:
        raise UsageError(str(exc)) from None


def _limits(args: argparse.Namespace) -> Dict[str, Any]:
    values = {"--max-volume-mb": args.max_volume_mb, "--max-store-gb": args.max_store_gb}
    values["--max-memory-gb"] = args.max_memory_gb
    for flag, value in values.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive")
    return {
        "max_volume_bytes": int(args.max_volume_mb * 2**20),
        "max_store_bytes": int(args.max_store_gb * 2**30),
        "max_memory_bytes": int(args.max_memory_gb * 2**30),
    }


def _exposure(args: argparse.Namespace) -> Dict[str, Any]:
    for origin in args.cors_origin:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise UsageError(
                f"--cors-origin takes an origin like https://viewer.example.org, not {origin!r} "
                "(a wildcard would let any web page call the API)"
            )
    positive = {"--answer-timeout": args.answer_timeout, "--max-request-mb": args.max_request_mb}
    positive["--rate-burst"] = args.rate_burst
    positive["--client-timeout"] = args.client_timeout
    positive["--max-uploads"] = args.max_uploads
    positive["--max-connections"] = args.max_connections
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be positive")
    if args.rate_limit < 0:
        raise UsageError("--rate-limit must be 0 (off) or positive")
    return {
        "cors_origins": [o.rstrip("/") for o in args.cors_origin],
        "rate_limit_per_minute": args.rate_limit,
        "rate_burst": args.rate_burst,
        "audit_log": args.audit_log,
        "audit_questions": args.audit_questions,
        "answer_timeout_s": args.answer_timeout,
        "max_request_bytes": int(args.max_request_mb * 2**20),
        "max_uploads": args.max_uploads,
        "client_timeout_s": args.client_timeout,
    }


def _proxies(text: Optional[str]) -> List[str]:
    """--forwarded-allow-ips: addresses or networks only (a wildcard would trust every client)."""
    import ipaddress

    proxies = [p.strip() for p in (text or "").split(",") if p.strip()]
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise UsageError(
                f"--forwarded-allow-ips takes proxy addresses like 10.0.0.5 or 10.0.0.0/24, not {proxy!r}"
            ) from None
    return proxies


def run(args: argparse.Namespace) -> int:
    from medmllm.server.auth import check_bind

    try:
        check_bind(args.host, args.token)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be 0..65535, not {args.port}")
    limits = _limits(args)
    limits.update(_exposure(args))
    proxies = _proxies(args.forwarded_allow_ips)
    if args.exit_with is not None:
        from medmllm.server.watchdog import exit_with

        try:
            exit_with(args.exit_with)  # from here on: loading a model can take minutes
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    try:
        from medmllm.server.app import create_app
        from medmllm.server.listen import serve_app
    except ImportError as exc:
        raise UsageError(
            f"the server needs the 'server' extra: pip install 'medmllm[server]' ({exc})"
        ) from None
    engine = engine_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = create_app(engine, args.store, token=args.token, **limits)
    except OSError as exc:
        raise UsageError(f"cannot write the store or the audit log: {exc}") from None
    auth = "token required" if args.token else "no token (loopback only)"
    print(
        f"medmllm serve: engine {args.engine}, http://{args.host}:{args.port}, {auth}, store {args.store}",
        flush=True,
    )
    try:
        serve_app(
            app,
            args.host,
            args.port,
            args.log_level,
            forwarded_allow_ips=proxies,
            client_timeout_s=args.client_timeout,
            max_connections=args.max_connections,
        )
    finally:
        engine.close()
    return 0
