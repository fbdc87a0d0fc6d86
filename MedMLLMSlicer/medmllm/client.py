"""HTTP client of the model server; runs inside Slicer (stdlib + numpy + requests only) and outside.

The same volume is never sent twice: its id is the sha256 of the wire bytes, so `ensure_volume`
asks with HEAD first and uploads only when the server does not have it. Chat answers stream as
server-sent events parsed here by hand, robust to any chunking. A server at its limit of uploads
or connections (HTTP 503) is asked again after the Retry-After it sends, for up to `busy_wait_s`.
Every failure is a `BackendError` whose message is a sentence a user can act on.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import urljoin

import numpy as np
import requests

from medmllm.protocol import (
    API_VERSION,
    ROUTING_HEADER,
    UPLOAD_ENCODING,
    chat_request,
    plain_file_name,
    results_path,
    volume_path,
)

Timeout = Union[float, Tuple[float, float]]
BUSY_WAIT_S = 30.0  # longest wait, in all, for a server answering 503 (busy) before giving up


class BackendError(Exception):
    """Anything that went wrong talking to the server; str() is a sentence for the user."""


class ServerUnreachable(BackendError):
    pass


class BackendTimeout(BackendError):
    pass


class AuthError(BackendError):
    pass


class VolumeTooLarge(BackendError):
    pass


class BadRequest(BackendError):
    pass


class ServerError(BackendError):
    pass


class RetryLater(BackendError):
    """The server asked to be asked again; `retry_after` says in how many seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    """Too many requests for this token."""


class ServerBusy(RetryLater):
    """The server stayed at its limit of uploads or connections (HTTP 503) for `busy_wait_s`."""


class StreamInterrupted(BackendError):
    """The connection dropped mid-answer; the events already yielded stay valid."""


class MedMLLMClient:
    """`MedMLLMClient("http://127.0.0.1:8765", token=...)`; `timeout` = (connect, read) seconds."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: Timeout = (5.0, 300.0),
        busy_wait_s: float = BUSY_WAIT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.busy_wait_s = busy_wait_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.last_upload_bytes = 0

    def __repr__(self) -> str:
        return f"MedMLLMClient({self.base_url!r})"

    def health(self) -> Dict[str, Any]:
        """Server version info; raises BackendError if its API major version differs from ours."""
        info = self._request("GET", "/healthz").json()
        if str(info.get("api_version", "")).split(".")[0] != API_VERSION:
            raise BackendError(
                f"the server speaks API version {info.get('api_version')}, this client {API_VERSION}: "
                "update one of them"
            )
        return info

    def models(self) -> List[Dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["models"]

    def ensure_volume(self, voxels: np.ndarray, ijk_to_ras: np.ndarray, compress: bool = False) -> str:
        """Volume id for (voxels [k, j, i], 4x4 IJK->RAS), uploading only if the server lacks it.

        `compress` gzips the upload: worth it only where the link is slower than the codec
        (not on loopback or a LAN). `last_upload_bytes` says what went over the wire.
        """
        from medmllm.geometry.wire import encode_volume_parts, volume_sha256

        volume_id = volume_sha256(voxels, ijk_to_ras)
        self.last_upload_bytes = 0
        route = {ROUTING_HEADER: volume_id}
        if self._request("HEAD", volume_path(volume_id), ok=(200, 404), headers=route).status_code == 200:
            return volume_id
        parts = encode_volume_parts((voxels, ijk_to_ras))
        headers = {"Content-Type": "application/octet-stream", **route}
        if compress:
            parts = (gzip.compress(b"".join(parts), compresslevel=1),)
            headers["Content-Encoding"] = UPLOAD_ENCODING
        body = _BodyReader(parts)  # iterated afresh if the upload is sent again after a 503
        self._request("PUT", volume_path(volume_id), data=body, headers=headers)
        self.last_upload_bytes = len(body)
        return volume_id

    def chat(
        self,
        volume_id: str,
        question: Optional[str] = None,
        session_id: Optional[str] = None,
        **options: Any,
    ) -> Iterator[Dict[str, Any]]:
        """Stream the answer as event dicts (`type` in token/box/mask/report/warning/error/done).

        `session_id` defaults to a new one (read it from the `done` event, or pass your own to
        be able to cancel before the first event). Options: messages, view, roi, model,
        max_new_tokens, temperature (see `medmllm.protocol.chat_request`).
        """
        body = chat_request(volume_id, question, session_id=session_id or uuid.uuid4().hex, **options)
        headers = {"Accept": "text/event-stream", ROUTING_HEADER: volume_id}
        response = self._request("POST", "/v1/chat", json=body, stream=True, headers=headers)
        return self._events(response)

    def cancel(self, session_id: str) -> None:
        self._request("POST", f"/v1/sessions/{session_id}/cancel")

    def result_files(self, result_id: str) -> List[str]:
        return self._request("GET", results_path(result_id)).json()["files"]

    def download_results(self, result_id: str, folder: Union[str, Path]) -> List[Path]:
        """Every file of an answer into `folder` (names checked: nothing lands outside it)."""
        paths = []
        for name in self.result_files(result_id):
            try:
                safe = plain_file_name(str(name))
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            paths.append(self.download(results_path(result_id, safe), Path(folder) / safe))
        return paths

    def download(self, url: str, path: Union[str, Path]) -> Path:
        """Save a result file (absolute URL or server path like /v1/results/...) atomically."""
        path = Path(path)
        response = self._request("GET", url, stream=True)
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_content(1 << 20):
                    out.write(chunk)
            os.replace(tmp, path)
        except (requests.RequestException, OSError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StreamInterrupted(f"download of {url} failed: {exc}") from None
        return path

    def _url(self, path_or_url: str) -> str:
        return (
            urljoin(self.base_url + "/", path_or_url.lstrip("/")) if "://" not in path_or_url else path_or_url
        )

    def _request(self, method: str, path: str, ok=(200, 201, 204), **kwargs: Any) -> requests.Response:
        """One request; after a 503 it is sent again, after the server's Retry-After, until
        `busy_wait_s` is spent (a body must be re-iterable, like `_BodyReader`)."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            response = self._send(method, path, **kwargs)
            if response.status_code != 503:
                break
            wait = _retry_after(response)
            if time.monotonic() + wait > deadline:
                raise ServerBusy(f"the server at {self.base_url} stayed busy: {_detail(response)}", wait)
            response.close()
            time.sleep(wait)
        if response.status_code not in ok:
            raise _http_error(response)
        return response

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self._url(path)
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            if isinstance(exc, requests.exceptions.ConnectTimeout):
                raise BackendTimeout(f"no answer from {self.base_url} within {self._connect_s()} s") from None
            raise ServerUnreachable(f"no server at {self.base_url} — is it running?") from None
        except requests.exceptions.Timeout:
            raise BackendTimeout(f"the server at {self.base_url} did not answer in time") from None

    def _connect_s(self) -> float:
        return self.timeout[0] if isinstance(self.timeout, tuple) else self.timeout

    def _read_s(self) -> float:
        return self.timeout[1] if isinstance(self.timeout, tuple) else self.timeout

    def _events(self, response: requests.Response) -> Iterator[Dict[str, Any]]:
        done = False
        try:
            for event in parse_sse(response.iter_content(chunk_size=None)):
                done = done or event.get("type") == "done"
                yield event
        except (requests.exceptions.RequestException, OSError) as exc:
            if _is_read_timeout(exc):
                raise StreamInterrupted(
                    f"the server at {self.base_url} sent nothing for {self._read_s()} s mid-answer"
                ) from None
            raise StreamInterrupted(
                f"the connection to {self.base_url} was lost mid-answer ({exc})"
            ) from None
        finally:
            response.close()
        if not done:
            raise StreamInterrupted(
                f"the server at {self.base_url} closed the stream before the answer finished"
            )


def _is_read_timeout(exc: BaseException) -> bool:
    """requests reports a stalled stream as a ConnectionError wrapping urllib3's ReadTimeoutError."""
    from urllib3.exceptions import ReadTimeoutError

    return isinstance(exc, requests.exceptions.Timeout) or any(
        isinstance(arg, ReadTimeoutError) for arg in getattr(exc, "args", ())
    )


def _http_error(response: requests.Response) -> BackendError:
    detail = _detail(response)
    code = response.status_code
    if code == 401:
        return AuthError("the server rejected the token")
    if code == 413:
        return VolumeTooLarge(f"the volume is too large for this server: {detail}")
    if code == 429:
        return RateLimited(f"the server is rate-limiting this token: {detail}", _retry_after(response))
    if code == 507:
        return ServerError(f"the server has no disk space left for this volume: {detail}")
    if code >= 500:
        return ServerError(f"the server failed (HTTP {code}): {detail}")
    return BadRequest(f"the server refused the request (HTTP {code}): {detail}")


def _retry_after(response: requests.Response) -> float:
    """The server's Retry-After in seconds (1 if absent or an HTTP date), at most a minute."""
    retry = response.headers.get("Retry-After", "")
    return min(float(retry), 60.0) if retry.isdigit() else 1.0


def _detail(response: requests.Response) -> str:
    """The server's message from its error body (see `error_detail`)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason
    return error_detail(body)


def error_detail(body: Any) -> str:
    """One line from a JSON error body: OpenAI's `{"error": {"message": ...}}`, FastAPI's `detail`
    (a string, or validation errors as `loc: msg`), a bare `message`, else the body itself."""
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body and body[key] not in (None, ""):
                return error_detail(body[key])
        return json.dumps(body, ensure_ascii=False)[:300]
    if isinstance(body, list):
        return "; ".join(_validation_error(item) for item in body)
    return str(body).strip()[:300]


def _validation_error(item: Any) -> str:
    if isinstance(item, dict) and "msg" in item:
        where = ".".join(str(p) for p in item.get("loc", [])[1:])
        return f"{where}: {item['msg']}" if where else str(item["msg"])
    return error_detail(item)


def parse_sse(chunks) -> Iterator[Dict[str, Any]]:
    """Server-sent events -> dicts, from byte chunks split anywhere (even inside a CR LF pair).

    requests' `iter_lines` can invent an empty line when a CR LF pair straddles two chunks,
    which would end an event early, so lines are split here. Comment lines (pings) are skipped.
    """
    data: List[str] = []
    kind = "message"
    for line in _lines(chunks):
        if not line:
            if data:
                yield _event(kind, "\n".join(data))
            data, kind = [], "message"
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
    if data:
        yield _event(kind, "\n".join(data))


def _event(kind: str, data: str) -> Dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise StreamInterrupted(f"the server sent an unreadable {kind!r} event") from None
    if not isinstance(event, dict):
        raise StreamInterrupted(f"the server sent an unreadable {kind!r} event")
    event.setdefault("type", kind)
    return event


def _lines(chunks) -> Iterator[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while True:
            cut = min((i for i in (buffer.find(b"\r"), buffer.find(b"\n")) if i >= 0), default=-1)
            if cut < 0 or (buffer[cut : cut + 1] == b"\r" and cut + 1 == len(buffer)):
                break
            step = 2 if buffer[cut : cut + 2] == b"\r\n" else 1
            yield buffer[:cut].decode("utf-8")
            buffer = buffer[cut + step :]
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8")


class _BodyReader:
    """Byte strings/views sent as one request body without joining them: a 157 MB volume is
    streamed from the array itself, in large views, instead of first being copied into one `bytes`
    (requests sends an iterable with a length as a plain body of that Content-Length)."""

    CHUNK = 4 << 20

    def __init__(self, parts: Tuple[Union[bytes, memoryview], ...]) -> None:
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._size = sum(p.nbytes for p in self._parts)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[memoryview]:
        for part in self._parts:
            for start in range(0, part.nbytes, self.CHUNK):
                yield part[start : start + self.CHUNK]
