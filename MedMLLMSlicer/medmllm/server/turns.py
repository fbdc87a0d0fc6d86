"""First come, first served access to the engine, which answers `capacity` questions at a time
(1 for most engines; engines that batch concurrent questions themselves admit more).

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

    def __init__(self, capacity: int = 1) -> None:
        self._lock = threading.Lock()
        self._waiting: deque = deque()
        self._capacity = max(1, capacity)
        self._active = 0

    def join(self) -> threading.Event:
        turn = threading.Event()
        with self._lock:
            if self._active >= self._capacity:
                self._waiting.append(turn)
            else:
                self._active += 1
                turn.set()
        return turn

    def leave(self, turn: threading.Event) -> None:
        with self._lock:
            if not turn.is_set():
                self._waiting.remove(turn)
            elif self._waiting:
                self._waiting.popleft().set()
            else:
                self._active -= 1

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)
