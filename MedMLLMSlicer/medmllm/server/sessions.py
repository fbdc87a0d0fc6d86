"""Conversations kept per session id, so a follow-up question sees the earlier turns.

Each session answers one question at a time and owns the cancel flag of the answer in progress,
which `POST /v1/sessions/{id}/cancel` and a client disconnect both set.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

from medmllm.engines.base import ChatTurn
from medmllm.server.store import StoreError


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

    def __init__(self, max_sessions: int = 256) -> None:
        self.max_sessions = max_sessions
        self._sessions: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def start_turn(self, session_id: Optional[str], volume_id: str) -> Session:
        """Open (or create) the session and mark it busy; refuses a second concurrent question."""
        with self._lock:
            sid = session_id or uuid.uuid4().hex
            session = self._sessions.get(sid)
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

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise StoreError(404, f"unknown session {session_id}")
        return session

    def _prune(self) -> None:
        idle = [sid for sid, s in self._sessions.items() if not s.busy]
        for sid in idle[: max(0, len(self._sessions) - self.max_sessions)]:
            del self._sessions[sid]
