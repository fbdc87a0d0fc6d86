"""First come, first served access to the engine, which answers one question at a time.

`threading.Lock` grants a contended lock to whichever waiter the OS wakes, so with many users some
questions waited many times longer than others (p99 ~16x the median in scripts/load). Here each
question takes a turn in arrival order, and may leave the queue (cancelled) without losing others'
places.
"""

from __future__ import annotations

import threading
from collections import deque


class EngineTurns:
    """`turn = turns.join()`; wait on `turn` (an Event set when it is yours); `turns.leave(turn)`
    when done or given up; a finished turn passes the engine straight to the next in line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: deque = deque()
        self._busy = False

    def join(self) -> threading.Event:
        turn = threading.Event()
        with self._lock:
            if self._busy:
                self._waiting.append(turn)
            else:
                self._busy = True
                turn.set()
        return turn

    def leave(self, turn: threading.Event) -> None:
        with self._lock:
            if not turn.is_set():
                self._waiting.remove(turn)
            elif self._waiting:
                self._waiting.popleft().set()
            else:
                self._busy = False

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)
