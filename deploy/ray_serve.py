"""The model server on Ray Serve: the same FastAPI app, one replica per GPU, each volume pinned to
one replica so its decoded array and the engine's prepared features are reused.

`serve run deploy/serve_config.yaml` (see docs/scaling.md). Routing uses Ray Serve's request-router
extension: the client sends the volume id in the `serve_multiplexed_model_id` header
(`medmllm.protocol.ROUTING_HEADER`), the proxy puts it in the request metadata, and
`VolumeAffinityRouter` picks the replica by rendezvous hashing of that id over the running
replicas: the same volume always reaches the same replica, and when a replica comes or goes only
its own volumes move. Requests without a volume (health, models, results) go to any replica.

The replicas share one store folder (a shared filesystem across nodes): uploads are atomic renames
into a content-addressed folder, conversations are saved per session, and result files are read
from there, so any replica can serve a follow-up or a download; affinity is for speed, not truth.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REPLICA_HEADER = b"x-medmllm-replica"


def _weight(key: str, replica: RunningReplica) -> bytes:
    return hashlib.sha256(f"{key}|{replica.replica_id.unique_id}".encode()).digest()


class VolumeAffinityRouter(RequestRouter):
    """Same routing key (volume id) -> same replica, by rendezvous hashing; no key -> any replica."""

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if not key or not candidate_replicas:
            return [candidate_replicas]
        return [[max(candidate_replicas, key=lambda replica: _weight(key, replica))]]


@dataclass
class ServeArgs:
    """The `args:` of serve_config.yaml (what `medmllm serve` takes on its command line)."""

    engine: str = "builtin"
    store: str = "~/.cache/medmllm/server"
    model: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    token_env: str = "MEDMLLM_TOKEN"
    allow_no_token: bool = False
    replicas: int = 1
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    max_ongoing_requests: int = 64
    server: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, args: Dict[str, Any]) -> ServeArgs:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown args {unknown} in the serve config; known: {sorted(known)}")
        return cls(**args)


def build_asgi(config: ServeArgs) -> Callable:
    """The replica's app: `medmllm serve`'s FastAPI app around a fresh engine, tagged with the replica."""
    from medmllm.engines.base import EngineOptions
    from medmllm.engines.registry import create_engine
    from medmllm.server.app import create_app

    options = dict(config.options)
    engine = create_engine(
        config.engine, EngineOptions(model=config.model, extra=options.pop("extra", {}), **options)
    )
    token = os.environ.get(config.token_env) or None
    app = create_app(engine, Path(config.store).expanduser(), token=token, **config.server)
    replica = serve.get_replica_context().replica_id.unique_id.encode()

    async def tagged(scope: dict, receive: Callable, send: Callable) -> None:
        async def send_tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (REPLICA_HEADER, replica)])
            await send(message)

        await app(scope, receive, send_tagged if scope["type"] == "http" else send)

    return tagged


@serve.ingress()
class MedMLLMReplica:
    """One engine and its FastAPI app; Ray gives each replica its own GPU (`num_gpus`)."""

    def __init__(self, config: ServeArgs) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> Callable:
        return build_asgi(self.config)


def app(args: Dict[str, Any]) -> serve.Application:
    """Application builder named by `import_path: deploy.ray_serve:app` in serve_config.yaml."""
    from medmllm.server.auth import check_token_strength

    config = ServeArgs.from_dict(args)
    token = os.environ.get(config.token_env)
    if token:
        check_token_strength(token, f"Ray Serve's proxy (${config.token_env})")
    elif not config.allow_no_token:
        raise ValueError(
            f"set ${config.token_env} on every Ray node: Serve's proxy is reachable from the network "
            "(or set allow_no_token: true for a loopback-only test)"
        )
    deployment = serve.deployment(
        MedMLLMReplica,
        name="medmllm",
        num_replicas=config.replicas,
        ray_actor_options={"num_gpus": config.num_gpus, "num_cpus": config.num_cpus},
        max_ongoing_requests=config.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=VolumeAffinityRouter),
    )
    return deployment.bind(config)
