"""A ref polled with done(), never blocked on: after a sync caller read its own answer, the loop's
reader of that worker's connection is parked (``readhere``); a later call's answer must still be
read when its ref is only polled, for remote functions and actors alike."""

from __future__ import annotations

import sys
import threading

import cloudpickle
import pytest
from service_helpers import wait_until

from sandpool import Session
from sandpool._functions import pool as _pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inc(x: int) -> int:
    return x + 1


class Counter:
    """Counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def incr(self) -> int:
        self.count += 1
        return self.count


@pytest.fixture
def read_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The function answers the main thread settled itself."""
    settled: list[int] = []
    original = _pool.Pool._answer

    def spy(self: _pool.Pool, slot: object, frame: dict) -> None:
        if threading.current_thread() is threading.main_thread():
            settled.append(frame["id"])
        original(self, slot, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(_pool.Pool, "_answer", spy)
    return settled


def test_a_polled_function_call_is_answered_after_a_blocking_one(read_here: list[int]) -> None:
    """A call after blocking calls whose answers the caller read, polled with done() only,
    finishes, and the next blocking call is read by its caller again."""
    with Session() as s:
        f = s.function(inc, max_concurrency=1)
        f.remote(0).result()
        assert [f.remote(i).result() for i in range(3)] == [1, 2, 3]
        assert read_here  # the loop's reader is parked
        ref = f.remote(10)
        assert wait_until(ref.done, timeout=30)
        assert ref.result() == 11
        read = len(read_here)
        assert [f.remote(i).result() for i in range(5)] == [1, 2, 3, 4, 5]
        assert len(read_here) > read


def test_a_polled_actor_call_is_answered_after_a_blocking_one() -> None:
    """The same for an actor: a polled call finishes, and the actor keeps its order."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert [counter.incr() for _ in range(3)] == [1, 2, 3]  # the later ones read by the caller
        ref = counter.incr.remote()
        assert wait_until(ref.done, timeout=30)
        assert ref.result() == 4
        assert counter.incr() == 5
