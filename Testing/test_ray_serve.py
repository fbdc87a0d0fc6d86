"""The model server on Ray Serve (deploy/ray_serve.py): a local Ray with two CPU replicas; every
volume's requests reach one replica, and the volumes spread over both. Skipped without ray[serve]."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.serve as serve
import requests
from conftest import free_port, phantom_ct
from medmllm.client import MedMLLMClient, parse_sse
from medmllm.protocol import ROUTING_HEADER, chat_request, volume_path

ROOT = Path(__file__).resolve().parents[1]
VOLUMES = 16


def _load_deploy():
    """deploy/ray_serve.py as `deploy.ray_serve`: Ray pickles its classes by module name, so the
    replicas import it the same way (the repository root on their PYTHONPATH)."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("deploy.ray_serve")


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    import ray

    deploy = _load_deploy()
    port = free_port()
    paths = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": paths}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"engine": "builtin", "store": str(tmp_path_factory.mktemp("store")), "replicas": 2}
        args.update(num_gpus=0, num_cpus=0, allow_no_token=True)
        serve.run(deploy.app(args), name="medmllm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_of_chat(url: str, volume_id: str, question: str) -> str:
    body = chat_request(volume_id, question)
    with requests.post(f"{url}/v1/chat", json=body, headers={ROUTING_HEADER: volume_id}, stream=True) as r:
        assert r.status_code == 200, r.text
        events = list(parse_sse(r.iter_content(chunk_size=None)))
        assert events[-1]["type"] == "done" and not any(e["type"] == "error" for e in events)
        return r.headers["x-medmllm-replica"]


def test_each_volume_stays_on_one_replica_and_volumes_spread_over_both(ray_url):
    client = MedMLLMClient(ray_url, timeout=(10.0, 120.0))
    assert client.health()["engine"] == "builtin"
    voxels, matrix = phantom_ct()
    seen = {}
    for n in range(VOLUMES):
        volume_id = client.ensure_volume(voxels + np.int16(n), matrix)
        head = requests.head(f"{ray_url}{volume_path(volume_id)}", headers={ROUTING_HEADER: volume_id})
        assert head.status_code == 200
        replicas = {head.headers["x-medmllm-replica"]}
        replicas |= {_replica_of_chat(ray_url, volume_id, q) for q in ("where are the bones?", "report")}
        assert len(replicas) == 1, f"volume {n} reached {replicas}"
        seen[volume_id] = replicas.pop()
    assert len(set(seen.values())) == 2, "the volumes should spread over both replicas"


def test_a_follow_up_through_the_client_keeps_the_conversation(ray_url):
    client = MedMLLMClient(ray_url, timeout=(10.0, 120.0))
    voxels, matrix = phantom_ct()
    volume_id = client.ensure_volume(voxels - np.int16(5), matrix)
    first = list(client.chat(volume_id, "where are the bones?", session_id="ray-conv"))
    second = list(client.chat(volume_id, "and how big are they?", session_id="ray-conv"))
    assert first[-1]["type"] == "done" and second[-1]["type"] == "done"
    assert first[-1]["session_id"] == second[-1]["session_id"] == "ray-conv"


def test_the_shipped_serve_config_builds_and_bad_args_are_named():
    import yaml

    deploy = _load_deploy()
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    parsed = deploy.ServeArgs.from_dict(args)
    assert parsed.num_gpus == 1 and parsed.replicas == 2
    with pytest.raises(ValueError, match="unknown args \\['gpus'\\]"):
        deploy.ServeArgs.from_dict({"gpus": 1})
    with pytest.raises(ValueError, match="MEDMLLM_TEST_UNSET_TOKEN_VARIABLE"):
        deploy.app({"token_env": "MEDMLLM_TEST_UNSET_TOKEN_VARIABLE"})


def test_a_guessable_token_is_refused_as_by_a_public_bind(monkeypatch):
    """Serve's proxy is reachable from the network: the token rules of `medmllm serve --host 0.0.0.0`."""
    deploy = _load_deploy()
    monkeypatch.setenv("MEDMLLM_TEST_TOKEN", "secret")
    with pytest.raises(ValueError, match=r"guessable token.*24 characters"):
        deploy.app({"token_env": "MEDMLLM_TEST_TOKEN"})
    monkeypatch.setenv("MEDMLLM_TEST_TOKEN", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")  # long, one character
    with pytest.raises(ValueError, match="guessable token"):
        deploy.app({"token_env": "MEDMLLM_TEST_TOKEN", "allow_no_token": True})
    monkeypatch.setenv("MEDMLLM_TEST_TOKEN", "Q7v-2mZp9LxR4tWc8NbY1sKd6Hf3")
    assert deploy.app({"token_env": "MEDMLLM_TEST_TOKEN", "num_gpus": 0}) is not None
