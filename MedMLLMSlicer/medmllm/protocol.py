"""The HTTP API's shared vocabulary: routes, event types and JSON shapes used by server and client.

Plain constants and dicts (stdlib only) because the client runs inside Slicer, where pydantic is not
available; the server validates the same shapes with pydantic models in `medmllm.server.models`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

API_VERSION = "1"

#: Content-Encoding accepted on `PUT /v1/volumes/{id}` (the only codec: cheap to decode everywhere).
UPLOAD_ENCODING = "gzip"

#: Routing key sent with every request about one volume (its id): Ray Serve's proxy reads this
#: header, and deploy/ray_serve.py routes by it so a volume stays on the replica that has it cached.
#: A single `medmllm serve` ignores it.
ROUTING_HEADER = "serve_multiplexed_model_id"

EVENT_TYPES = ("token", "box", "mask", "report", "warning", "error", "done")
ORIENTATIONS = ("axial", "coronal", "sagittal")

_VOLUME_ID = re.compile(r"^[0-9a-f]{64}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_volume_id(text: str) -> bool:
    """A volume id is the sha256 of the wire bytes: exactly 64 lowercase hex digits."""
    return bool(_VOLUME_ID.match(text))


def is_session_id(text: str) -> bool:
    return bool(_SESSION_ID.match(text))


def volume_path(volume_id: str) -> str:
    return f"/v1/volumes/{volume_id}"


def results_path(result_id: str, filename: str = "") -> str:
    """Server path of a result (file): names come from model text, so they are URL-quoted."""
    return f"/v1/results/{quote(result_id, safe='')}" + (f"/{quote(filename, safe='')}" if filename else "")


def plain_file_name(name: str) -> str:
    """`name` if it is a bare file name; a server-sent name with a folder part or `..` is refused,
    so a hostile server cannot make a client write outside the results folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"refusing the result file name {name!r}: not a plain file name")
    return name


def chat_request(
    volume_id: str,
    question: Optional[str] = None,
    *,
    session_id: Optional[str] = None,
    messages: Optional[Sequence[Dict[str, str]]] = None,
    view: Optional[Dict[str, Any]] = None,
    roi: Optional[Any] = None,
    model: Optional[str] = None,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
) -> Dict[str, Any]:
    """Body of `POST /v1/chat`, leaving out what is not set so the server's defaults apply.

    `question` appends a user turn to the session's conversation; `messages` (list of
    {role, content}) replaces it. `roi` is RAS: 6 numbers (r1, a1, s1, r2, a2, s2) or
    {center, size, axes}. `view` is {orientation, index, window: [centre, width]}.
    """
    body: Dict[str, Any] = {"volume_id": volume_id}
    optional = {
        "question": question,
        "session_id": session_id,
        "messages": list(messages) if messages is not None else None,
        "view": view,
        "roi": roi,
        "model": model,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def roi_from_bounds(values: Sequence[float]) -> List[float]:
    """Check a 6-number RAS ROI (two opposite corners) and return it as floats."""
    if len(values) != 6:
        raise ValueError(f"an ROI needs 6 numbers r1,a1,s1,r2,a2,s2 (got {len(values)})")
    out = [float(v) for v in values]
    if any(v != v or v in (float("inf"), float("-inf")) for v in out):
        raise ValueError("ROI numbers must be finite")
    return out
