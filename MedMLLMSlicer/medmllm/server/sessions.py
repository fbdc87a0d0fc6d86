"""Conversations kept per session id, so a follow-up question sees the earlier turns.

Each session answers one question at a time and owns the cancel flag of the answer in progress,
which `POST /v1/sessions/{id}/cancel` and a client disconnect both set. With a `folder`, each
finished turn is also saved as `<folder>/<id>.json` (temporary file, then rename), so a follow-up
after a server restart resumes the conversation; the newest `max_sessions` files are kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from medmllm.atomic import write_atomic
from medmllm.engines.base import ChatTurn
from medmllm.protocol import is_session_id
from medmllm.server.store import StoreError

log = logging.getLogger("medmllm.server")


@dataclass
class Session:
    id: str
    volume_id: str
    messages: List[ChatTurn] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    """At most `max_sessions` conversations; the least recently used idle one is forgotten first."""

    def __init__(self, max_sessions: int = 256, folder: Optional[Path] = None) -> None:
        self.max_sessions = max_sessions
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._sessions: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def start_turn(self, session_id: Optional[str], volume_id: str) -> Session:
        """Open (or create) the session and mark it busy; refuses a second concurrent question."""
        with self._lock:
            sid = session_id or uuid.uuid4().hex
            session = self._sessions.get(sid) or self._load(sid)
            if session is None:
                session = Session(sid, volume_id)
                self._sessions[sid] = session
                self._prune()
            elif session.volume_id != volume_id:
                raise StoreError(409, f"session {sid} is about another volume; start a new session")
            if session.busy:
                raise StoreError(409, f"session {sid} is still answering; cancel it or wait")
            self._sessions.move_to_end(sid)
            session.busy = True
            session.cancel = threading.Event()
            session.last_used = time.monotonic()
            return session

    def end_turn(self, session: Session, question: List[ChatTurn], answer: str) -> None:
        """Record the turn (partial answers too, so a follow-up knows what was said)."""
        with self._lock:
            session.messages = list(question)
            if answer:
                session.messages.append(ChatTurn("assistant", answer))
            session.busy = False
            session.last_used = time.monotonic()
            self._save(session)

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id) or self._load(session_id)
        if session is None:
            raise StoreError(404, f"unknown session {session_id}")
        return session

    def _prune(self) -> None:
        idle = [sid for sid, s in self._sessions.items() if not s.busy]
        for sid in idle[: max(0, len(self._sessions) - self.max_sessions)]:
            del self._sessions[sid]

    def _file(self, session_id: str) -> Optional[Path]:
        if self.folder is None or not is_session_id(session_id):
            return None
        return self.folder / f"{session_id}.json"

    def _load(self, session_id: str) -> Optional[Session]:
        """A session saved before a restart, now back in memory; None if there is none (or unreadable)."""
        path = self._file(session_id)
        if path is None or not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text("utf-8"))
            turns = [ChatTurn(str(m["role"]), str(m["content"])) for m in doc["messages"]]
            session = Session(session_id, str(doc["volume_id"]), turns)
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("sessions: %s.json is unreadable; starting that conversation afresh", session_id)
            return None
        self._sessions[session_id] = session
        self._prune()
        return session

    def _save(self, session: Session) -> None:
        """Write the conversation atomically; a full disk loses only the ability to resume it."""
        path = self._file(session.id)
        if path is None:
            return
        doc = {"volume_id": session.volume_id, "messages": [vars(t) for t in session.messages]}
        try:
            write_atomic(path, json.dumps(doc, ensure_ascii=False))
            saved = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
            for old in saved[: max(0, len(saved) - self.max_sessions)]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("sessions: could not save %s (%s); it will not survive a restart", session.id, exc)
