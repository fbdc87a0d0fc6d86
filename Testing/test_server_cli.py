"""`medmllm serve` as a real process: it serves, checks the token, and never prints the token."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import requests
from conftest import free_port

SERVE = "import sys; from medmllm.cli import main; sys.exit(main())"


def test_serve_process_takes_the_token_from_the_environment_and_never_logs_it(tmp_path):
    port = free_port()
    token = "tok-9f8e7d6c5b4a"
    cmd = [sys.executable, "-c", SERVE, "serve", "--port", str(port), "--store", str(tmp_path)]
    env = {**os.environ, "MEDMLLM_TOKEN": token}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"{url}/healthz", timeout=2).json()
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert health["engine"] == "builtin" and health["auth"] is True
        assert requests.get(f"{url}/v1/models", timeout=5).status_code == 401
        good = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert good.status_code == 200 and good.json()["engine"] == "builtin"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert "token required" in output and token not in output
