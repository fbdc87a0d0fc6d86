"""Where answers come from: a local server the module starts, or a remote one (URL + token).

The same `MedMLLMClient` talks to both. The local server is `medmllm serve` (run by Slicer's Python) on
127.0.0.1 with a free port and a random token; an "OpenAI-compatible" backend is that same local
server with the `openai` engine pointed at the user's vLLM/SGLang/Ollama URL.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

import requests

from MedMLLMSlicerLib.process_group import group_options, popen_group, stop_group

# import name -> pip requirement, with the floors of pyproject's `server` extra and a ceiling
# (pynrrd: the server writes the answers' .seg.nrrd with it, and Slicer does not bundle it)
SERVER_PACKAGES = {
    "nrrd": "pynrrd>=1.0,<2",
    "fastapi": "fastapi>=0.110,<1",
    "uvicorn": "uvicorn>=0.27,<1",
    "sse_starlette": "sse-starlette>=2.0,<4",
    "pydantic": "pydantic>=2.5,<3",
    "scipy": "scipy>=1.10,<2",
    "PIL": "pillow>=10,<14",
}

_STATUS_SENTENCES = {
    400: "the server did not understand the request (is this a MedMLLM server?)",
    401: "the server rejected the token: check the token field",
    403: "the token is valid but not allowed to use this server",
    404: "nothing answers at this address: check the URL (is it a MedMLLM server?)",
    413: "the volume is larger than the server accepts",
    429: "the server is busy: try again in a moment",
    502: "a proxy could not reach the server: is it running behind the proxy?",
    503: "the server is starting or overloaded: try again in a moment",
    504: "a proxy timed out waiting for the server",
}


def describe_status(code: int) -> str:
    """An HTTP status code as a sentence a user can act on."""
    if code in _STATUS_SENTENCES:
        return _STATUS_SENTENCES[code]
    if 200 <= code < 300:
        return "connected"
    if code >= 500:
        return f"the server failed (HTTP {code}): see its log"
    return f"the server answered HTTP {code}"


def normalize_url(url: str) -> str:
    """Add the scheme users often leave out and drop trailing slashes; reject what is not a URL."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("enter the server URL, e.g. http://gpu-box:8765")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"'{url}' is not an http(s) URL")
    return url


def is_loopback(url: str) -> bool:
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def handshake(base_url: str, token: Optional[str], timeout: float = 5.0) -> Tuple[bool, str]:
    """Test connection: (usable, a sentence saying whether the server is reachable, speaks our API
    version and accepts the token), from two small requests."""
    try:
        url = normalize_url(base_url)
    except ValueError as exc:
        return False, str(exc)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        health = requests.get(url + "/healthz", timeout=timeout)
        if health.status_code != 200:
            return False, describe_status(health.status_code)
        models = requests.get(url + "/v1/models", headers=headers, timeout=timeout)
    except requests.exceptions.ConnectionError:
        return False, f"no server at {url}: is it running, and is the port right?"
    except requests.exceptions.Timeout:
        return False, f"{url} did not answer within {timeout:g} s"
    if models.status_code != 200:
        return False, describe_status(models.status_code)
    return _connected(_json(health), _json(models))


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _connected(health: Any, models: Any) -> Tuple[bool, str]:
    from medmllm.protocol import API_VERSION

    if not isinstance(health, dict) or "api_version" not in health:
        return False, "something answers there, but it is not a MedMLLM server"
    if str(health["api_version"]) != API_VERSION:
        return False, (
            f"the server speaks API version {health['api_version']}, this module {API_VERSION}: "
            "update the older of the two"
        )
    names = [m.get("model", "?") for m in models.get("models", [])] if isinstance(models, dict) else []
    return True, f"connected: engine {health.get('engine', '?')}, models: {', '.join(names) or 'none'}"


def missing_server_packages() -> List[str]:
    """pip names of what the local server needs but this Python lacks (installed only if the user agrees)."""
    return [pip for module, pip in SERVER_PACKAGES.items() if importlib.util.find_spec(module) is None]


def pip_install(
    requirements: List[str], python: Optional[List[str]] = None, tail: int = 8
) -> Tuple[bool, str]:
    """`python -m pip install ...` (blocking: call it on a worker thread); (success, pip's last lines).

    Not `slicer.util.pip_install`: before Slicer 5.12 it runs pip synchronously on the main thread
    and takes no options, and it raises without pip's output. The command is the same (Slicer's
    `PythonSlicer -m pip`), only run where it cannot freeze the UI.
    """
    command = [*(python or [sys.executable]), "-m", "pip", "install", *requirements]
    try:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            **group_options(),
        )  # fmt: skip
    except OSError as exc:
        return False, f"pip could not be started: {exc}"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    importlib.invalidate_caches()  # so find_spec sees what was just installed
    return result.returncode == 0, "\n".join(lines[-tail:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """`medmllm serve` as a child process bound to loopback, with its output kept for the log view.

    `python` is the command that runs Python: `sys.executable`, which in Slicer is the
    `PythonSlicer` launcher (the server is then its child: see `process_group`). The server also
    watches this process (`--exit-with`), so it ends when Slicer does, even after a crash.
    """

    def __init__(
        self,
        engine: str = "builtin",
        options: Optional[List[str]] = None,
        log_lines: int = 2000,
        python: Optional[List[str]] = None,
    ) -> None:
        self.python = list(python or [sys.executable])
        self.engine = engine
        self.options = list(options or [])
        self.token = secrets.token_urlsafe(24)
        self.port = 0
        self.log: Deque[str] = collections.deque(maxlen=log_lines)
        self._process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> List[str]:
        """`medmllm serve` run by this Python (Slicer's, where `medmllm` is bundled with the module);
        the token goes in the environment (`environment()`), out of other users' process lists."""
        return [
            *self.python, "-m", "medmllm.cli", "serve", "--engine", self.engine,
            "--host", "127.0.0.1", "--port", str(self.port), "--exit-with", str(os.getpid()), *self.options,
        ]  # fmt: skip

    def environment(self) -> Dict[str, str]:
        """This environment with the bundled `medmllm` importable (Slicer adds the module's folder to
        its own `sys.path` only, so a child Python would not find it otherwise) and the token."""
        import medmllm
        from medmllm.cli.serve import TOKEN_ENV

        bundle = os.path.dirname(os.path.dirname(os.path.abspath(medmllm.__file__)))
        paths = [bundle, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), TOKEN_ENV: self.token}

    def start(self) -> None:
        """Launch the process (returns at once); call `wait_ready` on a worker thread."""
        if self.running:
            return
        self.port = free_port()
        self._process = popen_group(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, env=self.environment(),
        )  # fmt: skip
        threading.Thread(target=self._read_output, args=(self._process,), daemon=True).start()

    def _read_output(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.log.append(line.rstrip("\n").replace(self.token, "***"))

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Block until /healthz answers (worker thread only); raise RuntimeError with the reason."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                tail = "\n".join(list(self.log)[-5:])
                raise RuntimeError(f"the local server stopped while starting:\n{tail}")
            try:
                if requests.get(self.base_url + "/healthz", timeout=1.0).status_code == 200:
                    return self.base_url
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the local server did not answer within {timeout:g} s: see its log")

    def stop(self) -> None:
        """End the server's whole process group (launcher and server); safe to call twice or when
        it never started. Also after the launcher itself has ended: the server may outlive it."""
        process, self._process = self._process, None
        if process is not None:
            stop_group(process)
