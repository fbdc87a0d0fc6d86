"""A fake OpenAI-compatible vision server for tests: records what it was sent, answers in real formats.

Wire format (what `vllm serve` sends back, and what the `openai` SDK parses):
- streaming `POST /v1/chat/completions`: `text/event-stream`, one `data: {chat.completion.chunk}` per
  delta (first delta carries `role`, the last one `finish_reason`), then `data: [DONE]`
  (OpenAI API reference "The chat completion chunk object"; vllm/entrypoints/openai/serving_chat.py).
- special tokens: vLLM decodes with `skip_special_tokens=True` unless the request says
  `"skip_special_tokens": false` (a vLLM/SGLang sampling field, vllm/entrypoints/openai/protocol.py
  ChatCompletionRequest); `special_tokens` lists the markup the served tokenizer treats as special
  (InternVL/MedRegA: `<ref>`, `</ref>`, `<box>`, `</box>`, xmed-lab/MedRegA
  src/internvl/train/constants.py), removed from the answer unless asked to keep them. A server
  that knows no such field answers 400 "Unrecognized request argument supplied:
  skip_special_tokens" (OpenAI's own API; `strict_fields=True`).
- errors: `{"error": {"message", "type", "param", "code"}}` (vLLM's ErrorResponse, same shape as OpenAI's);
  a text-only model given an image answers 400 "<model> is not a multimodal model" (vLLM's message,
  quoted in vllm-project/vllm#23402 and #19144); a wrong key gets 401 `{"error": "Unauthorized"}`
  (vLLM's --api-key middleware).

Model answers: `grounded_answer` asks the dialect for its `example_answer` (each dialect cites
the real output its example follows; the corpus in Testing/data/model_outputs holds the real ones).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from medmllm.grounding.registry import get_dialect
from PIL import Image

Answer = Callable[[Dict[str, Any], List[Image.Image]], str]
INTERNVL_SPECIAL_TOKENS = ("<ref>", "</ref>", "<box>", "</box>")


@dataclass
class Recorded:
    """One request as the server saw it."""

    headers: Dict[str, str]
    body: Dict[str, Any]
    images: List[Image.Image] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        """The text parts of the last user message, joined."""
        content = self.body["messages"][-1]["content"]
        if isinstance(content, str):
            return content
        return "\n".join(part["text"] for part in content if part["type"] == "text")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


def _decode_images(body: Dict[str, Any]) -> List[Image.Image]:
    images = []
    for message in body.get("messages", []):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                header, _, data = url.partition(",")
                if not header.startswith("data:image/") or ";base64" not in header:
                    raise ValueError(f"not a base64 image data URL: {url[:40]!r}")
                images.append(Image.open(io.BytesIO(base64.b64decode(data, validate=True))))
    return images


class FakeOpenAIServer:
    """A `/v1` server on a free loopback port, in a background thread; use as a context manager."""

    def __init__(
        self,
        answer: Answer,
        model: str = "fake-vlm",
        api_key: Optional[str] = None,
        vision: bool = True,
        chunk_size: int = 3,
        first_delay: float = 0.0,
        chunk_delay: float = 0.0,
        models: Optional[List[str]] = None,
        raw_stream: Optional[str] = None,
        special_tokens: Tuple[str, ...] = INTERNVL_SPECIAL_TOKENS,
        strict_fields: bool = False,
        cut_after: Optional[int] = None,
        error_body: Optional[Tuple[int, Any]] = None,
    ) -> None:
        self.answer = answer
        self.model = model
        self.api_key = api_key
        self.vision = vision
        self.chunk_size = chunk_size
        self.first_delay = first_delay
        self.chunk_delay = chunk_delay
        self.served = models or [model]
        self.raw_stream = raw_stream  # sent verbatim as the event stream body, to imitate broken servers
        self.special_tokens = special_tokens
        self.strict_fields = strict_fields
        self.cut_after = cut_after  # drop the connection after this many content chunks
        self.error_body = error_body  # (status, JSON body) answered to every chat request
        self.requests: List[Recorded] = []
        self.chunks_sent = 0
        self.app = self._build()
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def check_key(request: Request, call_next: Any) -> Any:
            if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        @app.get("/v1/models")
        async def models() -> Dict[str, Any]:
            now = int(time.time())
            data = [{"id": m, "object": "model", "created": now, "owned_by": "vllm"} for m in self.served]
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            try:
                images = _decode_images(body)
            except Exception as exc:
                return _error(400, f"invalid image: {exc}", "BadRequestError")
            self.requests.append(Recorded(dict(request.headers), body, images))
            if body.get("model") not in self.served:
                return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
            if images and not self.vision:
                return _error(400, f"{body['model']} is not a multimodal model", "BadRequestError")
            if self.strict_fields and "skip_special_tokens" in body:
                message = "Unrecognized request argument supplied: skip_special_tokens"
                return _error(400, message, "invalid_request_error")
            if self.error_body is not None:
                return JSONResponse(self.error_body[1], status_code=self.error_body[0])
            text = self.answer(body, images)
            if body.get("skip_special_tokens", True) is not False:
                for token in self.special_tokens:
                    text = text.replace(token, "")
            await asyncio.sleep(self.first_delay)  # a busy server: not even the response headers yet
            if self.raw_stream is not None:
                return StreamingResponse(iter([self.raw_stream]), media_type="text/event-stream")
            return StreamingResponse(self._chunks(body["model"], text), media_type="text/event-stream")

        return app

    async def _chunks(self, model: str, text: str) -> Any:
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: Dict[str, Any], finish: Optional[str] = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            chunk["choices"] = [choice]
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        yield event({"role": "assistant", "content": ""})
        for start in range(0, len(text), self.chunk_size):
            await asyncio.sleep(self.chunk_delay)
            if self.chunks_sent == self.cut_after:
                raise ConnectionResetError("fake server dropped the connection mid-answer")
            self.chunks_sent += 1
            yield event({"content": text[start : start + self.chunk_size]})
        yield event({"content": ""}, finish="stop")
        yield "data: [DONE]\n\n"

    def __enter__(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)


def bright_box(image: Image.Image) -> Tuple[float, float, float, float]:
    """Edge fractions (x0, y0, x1, y1) of the brightest structure, as a perfect model would see it."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    rows, cols = np.nonzero(pixels >= 0.75 * pixels.max())
    height, width = pixels.shape
    return (cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height)


def grounded_answer(dialect: str, image: Image.Image, label: str) -> str:
    """The answer a perfect model of the family would give for the bright structure, in its grammar."""
    answer = get_dialect(dialect).example_answer(bright_box(image), label, image.size)
    if answer is None:
        raise ValueError(f"dialect {dialect!r} writes no boxes")
    return answer
