"""The FastAPI app: volumes by content hash, chat as a server-sent-event stream, result files.

The engine's blocking generator runs in a worker thread (one question at a time per engine: a GPU
model is not re-entrant); its events cross into the event loop through an asyncio queue. Closing
the stream (Stop, client gone) sets the session's cancel flag, which the engine polls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

import medmllm
from medmllm.engines.base import ChatContext, ChatTurn, Engine, ViewState
from medmllm.protocol import ROUTING_HEADER, UPLOAD_ENCODING, results_path
from medmllm.results import ResultWriter, answer_events, roi_to_ijk
from medmllm.server.auth import BearerAuth
from medmllm.server.guard import AUDIT_SCOPE_KEY, DEFAULT_CLIENT_TIMEOUT_S, AuditLog, Guard, TokenBucket
from medmllm.server.models import ChatRequest, Health, ModelsOut, ResultOut, RoiBox, VolumeOut
from medmllm.server.sessions import SessionStore
from medmllm.server.store import DEFAULT_MAX_UPLOADS, ResultStore, StoreError, VolumeStore
from medmllm.server.turns import EngineTurns

log = logging.getLogger("medmllm.server")

GiB = 1 << 30
DEFAULT_MAX_VOLUME_BYTES = 2 * GiB
DEFAULT_ANSWER_TIMEOUT_S = 300.0
#: An upload body is handed to the store (off the event loop) in blocks of about this size.
UPLOAD_BLOCK_BYTES = 1 << 20
#: Worker -> stream marker: the engine has the lock now, so from here on its silence is timed.
_ENGINE_STARTED = {"type": "_engine_started"}


class ServerState:
    """Everything the routes share; one per app."""

    def __init__(
        self, engine: Engine, volumes: VolumeStore, results: ResultStore, root: Path, answer_timeout_s: float
    ) -> None:
        self.engine = engine
        self.volumes = volumes
        self.results = results
        self.sessions = SessionStore(folder=root / "sessions")
        self.answer_timeout_s = answer_timeout_s
        self.engine_turns = EngineTurns(engine.max_concurrent_chats())
        self.prepared: Dict[str, bool] = {}


def create_app(
    engine: Engine,
    store_dir: Path,
    token: Optional[str] = None,
    max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
    max_store_bytes: int = 20 * GiB,
    max_memory_bytes: int = 4 * GiB,
    max_results: int = 64,
    cors_origins: Sequence[str] = (),
    rate_limit_per_minute: float = 0.0,
    rate_burst: int = 30,
    audit_log: Optional[Path] = None,
    audit_questions: bool = False,
    answer_timeout_s: float = DEFAULT_ANSWER_TIMEOUT_S,
    max_request_bytes: int = 8 << 20,
    max_uploads: int = DEFAULT_MAX_UPLOADS,
    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
) -> FastAPI:
    """Build the app around one engine instance; `token` turns on bearer auth for all but /healthz.

    CORS stays closed unless `cors_origins` names the browser origins allowed; `rate_limit_per_minute`
    (0 = off) is a token bucket per token (per address without auth); `audit_log` appends one JSON
    line per request; an answer whose engine stays silent for `answer_timeout_s` ends with an error;
    a request body that stalls for `client_timeout_s` gets 408; without a token only requests
    addressed to a loopback Host name are answered (DNS rebinding); see docs/security.md.
    """
    volumes = VolumeStore(Path(store_dir), max_volume_bytes, max_store_bytes, max_memory_bytes, max_uploads)
    results = ResultStore(Path(store_dir), max_results)
    state = ServerState(engine, volumes, results, Path(store_dir), answer_timeout_s)
    engine.use_store(Path(store_dir) / "engines" / engine.name)
    volumes.on_remove = engine.forget
    engine.sweep(lambda volume_id: volumes.path(volume_id).is_file())
    app = FastAPI(
        title="MedMLLMSlicer model server",
        version=medmllm.__version__,
        description="Chat with a medical multimodal model about a volume; see docs/api.md.",
    )
    app.state.medmllm = state
    if token:
        app.add_middleware(BearerAuth, token=token)
    limiter = TokenBucket(rate_limit_per_minute / 60.0, rate_burst) if rate_limit_per_minute > 0 else None
    audit = AuditLog(audit_log, audit_questions) if audit_log else None
    app.add_middleware(
        Guard,
        engine=engine.name,
        token=token,
        limiter=limiter,
        audit=audit,
        max_body_bytes=max_request_bytes,
        body_timeout_s=client_timeout_s,
    )
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "HEAD", "PUT", "POST"],
            allow_headers=["Authorization", "Content-Type", "Content-Encoding", ROUTING_HEADER],
            expose_headers=["X-Session-Id", "Retry-After"],
        )

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_details(exc.errors())}, status_code=422)

    _volume_routes(app, state)
    _chat_routes(app, state)
    _info_routes(app, state, auth=bool(token))
    return app


def _info_routes(app: FastAPI, state: ServerState, auth: bool) -> None:
    @app.get("/healthz", response_model=Health, summary="Liveness and version handshake (no token needed)")
    def healthz() -> Health:
        return Health(
            server_version=medmllm.__version__,
            engine=state.engine.name,
            auth=auth,
            max_volume_bytes=state.volumes.max_volume_bytes,
        )

    @app.get("/v1/models", response_model=ModelsOut, summary="Models served, with capabilities and licence")
    def models() -> Dict[str, Any]:
        infos = []
        for m in state.engine.models():
            caps = dict(vars(m.capabilities), languages=list(m.capabilities.languages))
            infos.append(dict(vars(m), capabilities=caps))
        return {"engine": state.engine.name, "models": infos}


def _volume_routes(app: FastAPI, state: ServerState) -> None:
    @app.head("/v1/volumes/{volume_id}", summary="200 if the server already has this volume, else 404")
    def head_volume(volume_id: str) -> Response:
        if not state.volumes.has(volume_id):
            raise StoreError(404, "unknown volume")
        return Response(status_code=200)

    @app.put(
        "/v1/volumes/{volume_id}",
        status_code=201,
        response_model=VolumeOut,
        summary=f"Upload a volume in the wire format (optionally Content-Encoding: {UPLOAD_ENCODING})",
    )
    async def put_volume(volume_id: str, request: Request) -> Any:
        store = state.volumes
        length = request.headers.get("content-length", "")
        upload = store.begin(
            volume_id, request.headers.get("content-encoding"), int(length) if length.isdigit() else None
        )
        try:
            async for block in _blocks(request):
                await run_in_threadpool(upload.write, block)
            volume = await run_in_threadpool(upload.commit)
        except ClientDisconnect:  # the client left mid-upload: nothing to answer, nothing kept
            await run_in_threadpool(upload.discard)
            return Response(status_code=400)
        except BaseException:
            await run_in_threadpool(upload.discard)
            raise
        return {
            "volume_id": volume_id,
            "bytes": upload.size,
            "shape": list(volume.shape),
            "dtype": str(volume.voxels.dtype),
        }


async def _blocks(request: Request):
    """The body in blocks of about UPLOAD_BLOCK_BYTES: few hops to a worker thread, bounded memory."""
    parts: List[bytes] = []
    held = 0
    async for chunk in request.stream():
        parts.append(chunk)
        held += len(chunk)
        if held >= UPLOAD_BLOCK_BYTES:
            yield b"".join(parts)
            parts, held = [], 0
    if held:
        yield b"".join(parts)


def validation_details(errors: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pydantic's errors without the offending input (which may be NaN or a lone surrogate that no
    JSON encoder takes, or a patient's text): where, what kind, and the sentence."""
    return [
        {
            "type": str(e.get("type", "")),
            "loc": [p if isinstance(p, int) else _printable(str(p)) for p in e.get("loc", ())],
            "msg": _printable(str(e.get("msg", ""))),
        }
        for e in errors
    ]


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _chat_routes(app: FastAPI, state: ServerState) -> None:
    @app.post(
        "/v1/chat",
        summary="Ask a question; the answer streams as server-sent events (token, box, mask, report, "
        "warning, error, done)",
    )
    async def chat(req: ChatRequest, request: Request) -> EventSourceResponse:
        request.scope.get(AUDIT_SCOPE_KEY, {}).update(volume=req.volume_id, question=req.question)
        served = [m.model for m in state.engine.models()]
        if req.model and req.model not in served:
            raise StoreError(
                400, f"this server runs engine {state.engine.name} with {', '.join(served)}, not {req.model}"
            )
        volume = await run_in_threadpool(state.volumes.get, req.volume_id)
        roi = _roi_to_ijk(req, volume)
        view = ViewState(req.view.orientation, req.view.index, req.view.window)
        session = state.sessions.start_turn(req.session_id, req.volume_id)
        result_id = None
        try:
            messages = _conversation(req, session.messages)
            result_id = state.results.new()
            writer = ResultWriter(
                state.results.folder(result_id),
                volume,
                req.volume_id,
                messages,
                result_id=result_id,
                session_id=session.id,
                url_prefix=results_path(result_id),
            )
        except BaseException:
            if result_id is not None:
                state.results.finish(result_id)
            state.sessions.end_turn(session, session.messages, "")
            raise
        state.results.attach(result_id, writer)
        ctx = ChatContext(volume, req.volume_id, messages, view, roi, req.max_new_tokens, req.temperature)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        worker = threading.Thread(
            target=_run_turn,
            args=(state, ctx, writer, session, loop, queue),
            name=f"chat-{session.id}",
            daemon=True,
        )
        worker.start()
        return EventSourceResponse(
            _stream(queue, session.cancel, writer, state.answer_timeout_s),
            headers={"X-Session-Id": session.id},
            ping=10,
        )

    @app.post("/v1/sessions/{session_id}/cancel", summary="Stop the answer in progress in this session")
    def cancel(session_id: str) -> Dict[str, Any]:
        session = state.sessions.get(session_id)
        session.cancel.set()
        return {"session_id": session_id, "cancelled": session.busy}

    @app.get("/v1/results/{result_id}", response_model=ResultOut, summary="Files of one answer")
    def result(result_id: str) -> Dict[str, Any]:
        _flush(state, result_id)
        return {"result_id": result_id, "files": state.results.files(result_id)}

    @app.get("/v1/results/{result_id}/{name}", summary="One result file, e.g. segmentation.seg.nrrd")
    async def result_file(result_id: str, name: str) -> FileResponse:
        await run_in_threadpool(_flush, state, result_id)
        return FileResponse(state.results.file(result_id, name), filename=name)


def _flush(state: ServerState, result_id: str) -> None:
    """Make an answer's files current: while it streams, write the masks so far (so a mask URL
    works at once); once it is done, wait for the final files being written in the background."""
    state.results.folder(result_id)
    writer = state.results.writers.get(result_id)
    if writer is None:
        return
    if writer.answered:
        writer.finished.wait(120)
    else:
        writer.write_segmentation()


def _conversation(req: ChatRequest, history: List[ChatTurn]) -> List[ChatTurn]:
    turns = [ChatTurn(m.role, m.content) for m in req.messages] if req.messages else list(history)
    if req.question:
        turns.append(ChatTurn("user", req.question))
    return turns


def _roi_to_ijk(req: ChatRequest, volume):
    if req.roi is None:
        return None
    roi = req.roi.model_dump() if isinstance(req.roi, RoiBox) else req.roi
    try:
        return roi_to_ijk(roi, volume)
    except ValueError as exc:
        raise StoreError(400, f"bad ROI: {exc}") from None


def _run_turn(state: ServerState, ctx: ChatContext, writer: ResultWriter, session, loop, queue) -> None:
    """Worker thread: engine events -> queue; then record the turn and write the result files.

    The turn is recorded (session no longer busy) *before* `done` is sent, so a follow-up the
    client sends the moment it sees `done` is not refused as "still answering".
    """
    started = time.perf_counter()
    ended: List[bool] = []

    def end_turn() -> None:
        if not ended:
            ended.append(True)
            state.sessions.end_turn(session, ctx.messages, writer.answer)

    def emit(event: Dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    writer.on_done = end_turn  # whoever records `done` (this thread, or the stream's timeout) ends the turn

    turn = state.engine_turns.join()
    try:
        while not turn.wait(0.1):
            if session.cancel.is_set():
                break
        else:
            emit(_ENGINE_STARTED)
            _run_locked(state, ctx, writer, session, emit, started)
        if session.cancel.is_set() and not writer.events:
            total = time.perf_counter() - started
            for event in writer.done({"first_event_s": total, "total_s": total, "tokens": 0}, True):
                emit(event)
    finally:
        state.engine_turns.leave(turn)
        end_turn()
        try:
            writer.write_files()
        except Exception:
            log.exception("writing the result files of %s failed", writer.result_id)
        state.results.finish(writer.result_id)


def _run_locked(
    state: ServerState, ctx: ChatContext, writer: ResultWriter, session, emit, started: float
) -> None:
    prepare = ctx.volume_id not in state.prepared
    for event in answer_events(state.engine, ctx, writer, session.cancel, prepare=prepare, started=started):
        if prepare and event["type"] != "error":
            state.prepared[ctx.volume_id] = True
        emit(event)


async def _stream(queue: asyncio.Queue, cancel: threading.Event, writer: ResultWriter, timeout_s: float):
    """Queue -> SSE; leaving early (client gone, server shutdown) cancels the engine.

    Waiting for the engine (another question holds it) is not timed; once the engine runs, a
    silence of `timeout_s` ends the answer with an `error` and `done` and cancels the engine, so a
    hung model cannot hold a client forever.
    """
    started = time.perf_counter()
    timed = False
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), timeout_s if timed else None)
            except asyncio.TimeoutError:
                for event in _timed_out(writer, timeout_s, time.perf_counter() - started):
                    yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
                return
            if event is _ENGINE_STARTED:
                timed = True
                continue
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
            if event["type"] == "done":
                return
    finally:
        cancel.set()


def _timed_out(writer: ResultWriter, timeout_s: float, total: float) -> List[Dict[str, Any]]:
    message = (
        f"the model sent nothing for {timeout_s:g} s and was stopped; try again or simplify the question"
    )
    log.warning("answer %s: %s", writer.result_id, message)
    timings = {"first_event_s": total, "total_s": total, "tokens": 0}
    return [*writer.error(message), *writer.done(timings, True)]
