"""Actors, the sync fast path: a sync caller's actor call that the loop would send at once is
written to the actor's worker from the caller's own thread (the fast path remote functions take).
Each test checks which path took the call (a spy on the actor's link) and that the outcome is the
loop's path's: order per actor, errors, ActorDiedError, cancellation and cleanup (the autouse leak
check runs after each test)."""

from __future__ import annotations

import os
import sys
import threading
import time

import cloudpickle
import pytest
import trio
from service_helpers import wait_until

from sandpool import ActorDiedError, OperationCancelled, Session
from sandpool._functions import actor_link as _link
from sandpool._functions.actor import state_of

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.seen: list[tuple[int, int]] = []

    def incr(self, who: int = 0) -> int:
        self.n += 1
        self.seen.append((who, self.n))
        return self.n

    def log(self) -> list[tuple[int, int]]:
        return list(self.seen)

    def fail(self) -> None:
        raise KeyError("missing")

    def block(self) -> str:
        time.sleep(600)  # interrupted by the cancel's SIGINT
        return "woke"

    def exit_worker(self) -> None:
        os._exit(3)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> dict[bool, int]:
    """How many actor calls the fast path sent (True) or left to the loop (False)."""
    taken = {True: 0, False: 0}
    original = _link.ActorLink._send_now

    def spy(self: _link.ActorLink, call: _link.ActorCall, loop: object) -> bool:
        placed = original(self, call, loop)
        taken[placed] += 1
        return placed

    monkeypatch.setattr(_link.ActorLink, "_send_now", spy)
    return taken


def test_sync_calls_take_the_fast_path_and_keep_their_order(fast: dict[bool, int]) -> None:
    """Calls from 4 threads at once: each runs once, each thread's in the order it made them, and
    the fast path sent most of them (the rest went through the loop, in order behind them)."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1  # ready: later calls can go at once
        placed = fast[True]
        assert counter.incr() == 2
        assert fast[True] == placed + 1
        got: dict[int, list[int]] = {}

        def caller(who: int) -> None:
            refs = [counter.incr.remote(who) for _ in range(100)]
            got[who] = [r.result(timeout=60) for r in refs]

        threads = [threading.Thread(target=caller, args=(who,)) for who in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(v for values in got.values() for v in values) == list(range(3, 403))
        log = counter.log()
        for who, values in got.items():
            assert values == sorted(values)
            assert [n for w, n in log if w == who] == values  # ran in the order that thread made them
        assert fast[True] >= placed + 50


def test_fast_path_errors_and_cancellation_match_the_loops(fast: dict[bool, int]) -> None:
    """A method's exception, a cancelled call (interrupted where it runs) and the calls behind it
    come out as through the loop; the actor keeps its state and works on."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        counter.incr()
        placed = fast[True]
        with pytest.raises(KeyError, match="missing"):
            counter.fail()
        assert fast[True] == placed + 1
        running = counter.block.remote()
        behind = [counter.incr.remote() for _ in range(3)]  # written behind it, in order
        assert fast[True] == placed + 5
        assert wait_until(lambda: bool(state_of(counter).link.inflight))
        assert running.cancel()
        with pytest.raises(OperationCancelled):
            running.result()
        assert [r.result(timeout=60) for r in behind] == [2, 3, 4]
        waiting = counter.block.remote()
        queued = counter.incr.remote()
        assert queued.cancel()  # taken back before the worker read it
        assert waiting.cancel()
        with pytest.raises(OperationCancelled):
            queued.result()
        assert counter.incr() == 5  # the cancelled incr never ran


def test_worker_dying_under_a_fast_path_call_raises_actor_died_then_restarts(fast: dict[bool, int]) -> None:
    """A fast-path call whose worker dies fails with ActorDiedError; with max_restarts the next
    call reaches the new instance (its state lost), again by the fast path once it is ready."""
    with Session() as s:
        counter = s.cls(Counter).options(max_restarts=1).remote()
        assert counter.incr() == 1
        placed = fast[True]
        with pytest.raises(ActorDiedError, match="died"):
            counter.exit_worker()
        assert fast[True] == placed + 1
        assert counter.incr() == 1  # the new instance
        assert wait_until(lambda: counter.incr() and fast[True] >= placed + 2)
        with pytest.raises(ActorDiedError):
            counter.exit_worker()
        with pytest.raises(ActorDiedError):
            counter.incr()  # no restart left: failed at once, nothing sent


def test_calls_from_trio_never_take_the_fast_path(fast: dict[bool, int]) -> None:
    async def main() -> None:
        async with Session() as s:
            counter = s.cls(Counter).remote()
            assert [await counter.incr.remote() for _ in range(20)] == list(range(1, 21))

    trio.run(main)
    assert fast[True] == 0


def test_a_call_after_kill_never_overtakes_it(fast: dict[bool, int]) -> None:
    """kill() from a sync caller is taken in the loop; a call the same thread makes right after
    waits behind it (never the fast path, which could reach the worker first) and fails as a
    killed actor's call."""
    import sandpool

    with Session() as s:
        Env = s.cls(Counter)
        for _ in range(4):
            counter = Env.remote()
            assert counter.incr() == 1  # ready, its worker idle: the fast path is open
            placed = fast[True]
            sandpool.kill(counter)
            ref = counter.incr.remote()
            assert fast[True] == placed, "a call after kill() took the fast path past it"
            with pytest.raises(ActorDiedError, match="killed"):
                ref.result(timeout=60)
