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


def test_a_batching_engine_gets_up_to_its_capacity_at_once_then_arrival_order():
    turns = EngineTurns(capacity=3)
    running = [turns.join() for _ in range(3)]
    queued = [turns.join() for _ in range(2)]
    assert all(t.is_set() for t in running) and not any(t.is_set() for t in queued)
    turns.leave(running[1])
    assert queued[0].is_set() and not queued[1].is_set()
    for turn in (running[0], running[2], queued[0]):
        turns.leave(turn)
    assert queued[1].is_set() and turns.waiting() == 0
    turns.leave(queued[1])
    assert all(turns.join().is_set() for _ in range(3)) and not turns.join().is_set()


def test_the_server_admits_as_many_questions_as_the_engine_batches(tmp_path):
    from conftest import ScriptedEngine
    from medmllm.engines.base import EngineOptions
    from medmllm.server.app import ServerState

    class Batching(ScriptedEngine):
        def max_concurrent_chats(self) -> int:
            return 4

    plain = ServerState(ScriptedEngine(EngineOptions()), None, None, tmp_path / "a", 1.0)
    batching = ServerState(Batching(EngineOptions()), None, None, tmp_path / "b", 1.0)
    assert [plain.engine_turns.join().is_set() for _ in range(2)] == [True, False]
    assert [batching.engine_turns.join().is_set() for _ in range(5)] == [True] * 4 + [False]
