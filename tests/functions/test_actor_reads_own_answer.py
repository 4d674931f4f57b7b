"""Actors, the answer's way back without the loop: a sync caller blocked on an actor call that is
the only one the actor's worker holds reads the answer itself (``actor_readhere``), as a remote
function's caller does. Each test checks who settled the answer (a spy on the actor's link) and
that the outcome is the loop's path's: results, errors, cancellation, timeouts, the actor's death
and restart, order, and done callbacks in the loop's thread (the autouse leak check runs after each)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import cloudpickle
import psutil
import pytest
import trio
from service_helpers import wait_until

import sandpool
from sandpool import ActorDiedError, OperationCancelled, Session
from sandpool._functions import actor_link as _link
from sandpool._functions.actor import state_of

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter:
    """Counts the calls of ``incr`` and who made each."""

    def __init__(self) -> None:
        self.callers: list[int] = []

    def incr(self, who: int = 0) -> int:
        self.callers.append(who)
        return len(self.callers)

    def log(self) -> list[tuple[int, int]]:
        """(caller, count after its call) of every ``incr``, in the order they ran."""
        return [(who, n) for n, who in enumerate(self.callers, 1)]

    def fail(self, key: str) -> None:
        raise KeyError(key)

    def nap(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def block(self) -> str:
        time.sleep(600)  # interrupted by the cancel's SIGINT
        return "woke"

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture
def read_here(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads that settled an actor's answers other than the loop's (a caller's own)."""
    settled: list[threading.Thread] = []
    original = _link.ActorLink.on_answer

    def spy(self: _link.ActorLink, frame: dict) -> int:
        if not self.session._ensure_open().in_loop_thread():
            settled.append(threading.current_thread())
        return original(self, frame)

    monkeypatch.setattr(_link.ActorLink, "on_answer", spy)
    return settled


def assert_read_again(call: Callable[[], object], read_here: list[threading.Thread], expected: list[object]) -> None:
    """The next five calls (``call()``) answer ``expected``, and their caller read at least one
    answer itself again (the first after the loop's reader read may meet it reading, and wait)."""
    read = len(read_here)
    assert [call() for _ in expected] == expected
    assert len(read_here) > read


def link_of(handle: object) -> _link.ActorLink:
    return state_of(handle).link  # type: ignore[arg-type]


def test_a_blocked_caller_reads_its_own_answer_with_the_loops_results(read_here: list[threading.Thread]) -> None:
    """Sequential sync calls are settled in the caller's thread and return what the same calls
    return from trio; the actor ends idle, as the loop would leave it."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1  # ready: the fast path is open
        got = [counter.incr() for _ in range(50)]
        assert got == list(range(2, 52))
        assert read_here.count(threading.main_thread()) >= 40  # (a few may meet the loop's reader reading)
        link = link_of(counter)
        assert (link.inflight, list(link.queue), link.outbox) == ({}, [], [])

    async def main() -> list[int]:
        async with Session() as s:
            counter = s.cls(Counter).remote()
            await counter.incr.remote()
            return [await counter.incr.remote() for _ in range(50)]

    before = len(read_here)
    assert trio.run(main) == got
    assert len(read_here) == before  # from trio the loop reads every answer


def test_errors_are_the_users_own_as_through_the_loop(read_here: list[threading.Thread]) -> None:
    """A method's exception reaching a reading caller is the user's KeyError with the remote
    traceback, as from trio; the actor keeps its state and its next answer is read here again."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1
        with pytest.raises(KeyError) as sync_info:
            counter.fail("missing")
        assert_read_again(counter.incr, read_here, [2, 3, 4, 5, 6])

    async def main() -> BaseException:
        async with Session() as s:
            counter = s.cls(Counter).remote()
            with pytest.raises(KeyError) as info:
                await counter.fail.remote("missing")
            return info.value

    trio_error = trio.run(main)
    assert type(sync_info.value) is type(trio_error) and sync_info.value.args == trio_error.args
    assert "missing" in str(sync_info.value.__cause__) and "fail" in str(sync_info.value.__cause__)


def test_cancel_from_another_thread_wakes_a_reading_caller(read_here: list[threading.Thread]) -> None:
    """A caller reading its own answer sees a cancel made in another thread: OperationCancelled,
    the call is interrupted in the sandbox (the actor answers the next call) and the actor's
    next answer is read by its caller again."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1
        ref = counter.block.remote()
        outcome: list[object] = []
        reading = threading.Thread(target=lambda: outcome.append(_outcome(ref)))
        reading.start()
        assert wait_until(lambda: link_of(counter).direct is not None and link_of(counter).direct.borrowed)
        assert ref.cancel()
        reading.join(timeout=60)
        assert outcome == ["cancelled"]
        assert wait_until(lambda: not link_of(counter).inflight)  # its worker answered the cancel
        assert_read_again(lambda: counter.incr(7), read_here, [2, 3, 4, 5, 6])
        assert counter.log()[0:2] == [(0, 1), (7, 2)]  # block() never finished


def test_a_cancelled_calls_answer_is_read_with_the_reader_parked(read_here: list[threading.Thread]) -> None:
    """A call sent from a sync thread and cancelled before anyone waited for it: its worker's
    answer is read although the loop's reader was parked by an earlier caller, so the actor holds
    no call afterwards and its next caller reads its own answer."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1  # (the loop sends and reads the first: the actor was starting)
        assert counter.incr() == 2 and read_here  # read here: the loop's reader stays parked
        ref = counter.block.remote()
        link = link_of(counter)
        assert wait_until(lambda: bool(link.inflight) and link.direct is not None and link.direct.idle)
        assert ref.cancel()
        assert wait_until(lambda: not link.inflight, timeout=30)
        assert_read_again(counter.incr, read_here, [3, 4, 5, 6, 7])


def _outcome(ref: sandpool.OperationRef) -> object:
    try:
        return ref.result()
    except OperationCancelled:
        return "cancelled"
    except ActorDiedError as exc:
        return exc


def test_a_caller_that_stops_waiting_leaves_the_answer_to_the_loop(read_here: list[threading.Thread]) -> None:
    """result(timeout=) gives up reading at its deadline; the loop's reader then reads the
    answer, which a done callback receives; the next call is read by its caller again."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.nap(0) == 0
        ref = counter.nap.remote(0.5)
        with pytest.raises(TimeoutError):
            ref.result(timeout=0.05)
        done = threading.Event()
        ref.add_done_callback(lambda r: done.set())
        assert done.wait(60) and ref.result() == 0.5
        assert_read_again(lambda: counter.nap(0), read_here, [0] * 5)


def test_a_worker_killed_with_the_reader_parked_is_noticed_and_restarted(read_here: list[threading.Thread]) -> None:
    """The worker of an idle actor dies after a caller read its own answer (the loop's reader
    parked): the actor hears of it at once and restarts (its state lost); the next call reaches
    the new instance (no retries: it must not be sent to the dead worker)."""
    with Session() as s:
        counter = s.cls(Counter).options(max_restarts=1).remote()
        assert counter.incr() == 1
        inner = counter.pid()
        assert read_here  # read here: the reader is parked
        link, first = link_of(counter), counter.sandbox_id
        agent = link.sandbox.link.record().agent_pid  # type: ignore[union-attr]
        worker = next(p for p in psutil.Process(agent).children(recursive=True) if _ns_pid(p.pid) == inner)
        worker.kill()
        assert wait_until(lambda: link.restarts == 1, timeout=60)
        assert counter.incr() == 1  # the new instance, in a new sandbox
        assert counter.sandbox_id not in (None, first)


def test_kill_wakes_a_reading_caller_with_actor_died(read_here: list[threading.Thread]) -> None:
    """sandpool.kill() while a caller reads its own answer: the caller gets ActorDiedError
    ("killed") promptly, the actor is dead, and another actor of the session works on."""
    with Session() as s:
        Env = s.cls(Counter)
        counter, other = Env.remote(), Env.remote()
        assert counter.incr() == 1 and other.incr() == 1
        ref = counter.block.remote()
        outcome: list[object] = []
        reading = threading.Thread(target=lambda: outcome.append(_outcome(ref)))
        reading.start()
        assert wait_until(lambda: link_of(counter).direct is not None and link_of(counter).direct.borrowed)
        sandpool.kill(counter)
        reading.join(timeout=60)
        assert isinstance(outcome[0], ActorDiedError) and "killed" in str(outcome[0])
        assert not counter.alive
        assert other.incr() == 2


def _ns_pid(pid: int) -> int:
    """A process's pid in its innermost pid namespace."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("NSpid:"))
    return int(line.split()[-1])


def test_threads_calling_one_actor_at_once_keep_its_order(read_here: list[threading.Thread]) -> None:
    """Four threads calling one actor at once (some read their answers, some wait for the loop,
    some are behind another's call), then in turns (each call alone: read by its caller): every
    call runs once, each thread's in the order it made them, each gets its own answer, and the
    actor ends holding no call."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        assert counter.incr() == 1
        got: dict[int, list[int]] = {}
        all_done, turn = threading.Barrier(4), threading.Lock()
        read_alone: dict[int, int] = {}

        def caller(who: int) -> None:
            got[who] = [counter.incr(who) for _ in range(100)]
            all_done.wait(timeout=60)
            with turn:
                read = read_here.count(threading.current_thread())
                got[who] += [counter.incr(who) for _ in range(5)]
                read_alone[who] = read_here.count(threading.current_thread()) - read

        threads = [threading.Thread(target=caller, args=(who,)) for who in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(v for values in got.values() for v in values) == list(range(2, 422))
        log = counter.log()
        for who, values in got.items():
            assert [n for w, n in log if w == who] == values  # its answers, in the order run
            assert values == sorted(values)
        assert all(read_alone[who] for who in range(1, 5)), read_alone
        assert wait_until(lambda: not link_of(counter).inflight)


def test_done_callbacks_run_in_the_loops_thread_when_the_caller_read_the_answer(
        read_here: list[threading.Thread]) -> None:
    """A caller that reads its own answer settles the ref in its own thread; the ref's done
    callbacks still run in the loop's thread (but for one added to a ref already done, which
    runs at once, where it was added)."""
    with Session() as s:
        counter = s.cls(Counter).remote()
        counter.incr()
        host = s._ensure_open()
        in_loop: list[bool] = []  # where the callbacks of answers read by the caller ran
        for i in range(20):
            ran: list[bool] = []
            called = threading.Event()
            ref = counter.incr.remote()
            ref.add_done_callback(lambda r, ran=ran, called=called: (ran.append(host.in_loop_thread()), called.set()))
            at_once = bool(ran)
            read = len(read_here)
            assert ref.result(timeout=60) == i + 2
            assert called.wait(60)
            if not at_once and len(read_here) > read:
                in_loop += ran
        assert in_loop and all(in_loop)
