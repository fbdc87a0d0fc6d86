"""The engine queue: questions get the engine in arrival order, and leaving the queue (a cancelled
question) neither blocks nor reorders the others."""

from __future__ import annotations

import threading

from conftest import wait_until
from medmllm.server.turns import EngineTurns


def test_turns_are_granted_in_arrival_order_and_passed_on_directly():
    turns = EngineTurns()
    first = turns.join()
    assert first.is_set()
    queued = [turns.join() for _ in range(5)]
    assert not any(t.is_set() for t in queued) and turns.waiting() == 5
    order = []
    for turn in [first, *queued]:
        assert turn.is_set()
        order.append(turn)
        turns.leave(turn)
    assert order == [first, *queued] and turns.waiting() == 0
    assert turns.join().is_set(), "free again once everyone left"


def test_leaving_the_queue_keeps_the_others_in_place():
    turns = EngineTurns()
    holder, a, b, c = turns.join(), turns.join(), turns.join(), turns.join()
    turns.leave(b)
    turns.leave(holder)
    assert a.is_set() and not c.is_set()
    turns.leave(a)
    assert c.is_set() and not b.is_set()


def test_many_threads_each_get_exactly_one_turn_and_never_two_at_once():
    turns = EngineTurns()
    inside, most, served = [0], [0], []
    lock = threading.Lock()

    def ask(n):
        turn = turns.join()
        turn.wait()
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        served.append(n)
        with lock:
            inside[0] -= 1
        turns.leave(turn)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert wait_until(lambda: len(served) == 40) and most[0] == 1
    assert sorted(served) == list(range(40))
