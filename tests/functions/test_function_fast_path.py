"""Remote functions, the sync fast path: a lone call from a sync thread to an idle warm sandbox is
written to its worker from the caller's own thread. Each test checks that the fast path took the
call (a spy on the pool) and that the outcome is the loop's path's: the same results, errors,
cancellation, retries and cleanup (the autouse leak check runs after each test)."""

from __future__ import annotations

import os
import sys
import threading
import time

import cloudpickle
import psutil
import pytest
import trio
from service_helpers import wait_until

from sandpool import OperationCancelled, SandboxDiedError, Session
from sandpool._functions import pool as _pool

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLEEP = 600.0  # no cancel takes this long


def inc(x):
    return x + 1


def fail(key):
    return {}[key]


def block():
    """Wait far longer than any cancel takes (interrupted by the cancel's SIGINT)."""
    time.sleep(SLEEP)
    return "woke"


def die_once(path):
    """Kill this worker the first time (a marker says it happened), answer the second time."""
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(3)
    return "survived"


@pytest.fixture
def fast(monkeypatch):
    """How many calls the fast path placed (True) or left to the loop (False)."""
    taken = {True: 0, False: 0}
    original = _pool.Pool._send_now

    def spy(self, call, loop):
        placed = original(self, call, loop)
        taken[placed] += 1
        return placed

    monkeypatch.setattr(_pool.Pool, "_send_now", spy)
    return taken


def test_results_are_the_loops_results(fast):
    """Sequential sync calls go the fast path and return what the same calls return from trio."""
    with Session() as s:
        f = s.function(inc, max_concurrency=1)
        f.remote(0).result()  # the first call starts the sandbox: the loop places it
        got = [f.remote(i).result() for i in range(50)]
        assert fast[True] >= 50
        assert got == [i + 1 for i in range(50)]

    async def main():
        async with Session() as s:
            f = s.function(inc, max_concurrency=1)
            return [await f.remote(i) for i in range(50)]

    before = fast[True]
    assert trio.run(main) == got
    assert fast[True] == before  # from trio the loop places every call


def test_errors_are_the_users_own_with_the_remote_traceback(fast):
    """A fast-path call's exception is the user's KeyError with its remote traceback, as via the loop."""
    with Session() as s:
        f, g = s.function(fail, max_concurrency=1), s.function(inc, max_concurrency=1)
        g.remote(0).result()
        placed = fast[True]
        with pytest.raises(KeyError) as info:
            f.remote("missing").result()
        assert fast[True] == placed + 1
        assert "missing" in str(info.value.__cause__)
        assert g.remote(1).result() == 2  # the sandbox keeps working


def test_cancel_interrupts_a_fast_path_call_in_the_sandbox(fast):
    """ref.cancel() on a running fast-path call interrupts it: OperationCancelled, and the
    sandbox's one worker (which takes one call at a time) answers the next call, so the cancelled
    one has left it (had the cancel failed, the next call would wait SLEEP seconds)."""
    with Session() as s:
        hold = s.function(block, max_concurrency=1)
        f = s.function(inc, max_concurrency=1)
        assert f.remote(0).result() == 1
        placed = fast[True]
        ref = hold.remote()
        assert fast[True] == placed + 1
        assert wait_until(lambda: s.statistics().calls_running == 1)
        assert ref.cancel()
        with pytest.raises(OperationCancelled):
            ref.result()
        assert f.remote(1).result(timeout=60) == 2
        assert wait_until(lambda: s.statistics().calls_cancelled == 1), s.statistics()


def test_a_busy_sandbox_sends_the_call_through_the_loop_in_order(fast):
    """With its one sandbox busy, a sync call is left to the loop; calls behind it keep their order."""
    with Session() as s:
        hold = s.function(block, max_concurrency=1)
        f = s.function(inc, max_concurrency=1)
        f.remote(0).result()
        running = hold.remote()
        placed = fast[True]
        behind = [f.remote(i) for i in range(5)]
        assert fast[True] == placed  # none went at once
        finished = []
        for ref in behind:
            ref.add_done_callback(lambda r: finished.append(r.result()))
        assert running.cancel()
        assert [r.result(timeout=60) for r in behind] == [1, 2, 3, 4, 5]
        assert finished == [1, 2, 3, 4, 5]  # they ran in the order submitted


def test_a_worker_dying_under_a_fast_path_call_is_retried(fast, tmp_path):
    """A fast-path call whose worker dies is an infrastructure failure: retried on a new worker
    with retries=1, SandboxDiedError without."""
    with Session() as s:
        f = s.function(die_once, max_concurrency=1, retries=1)
        g = s.function(inc, max_concurrency=1, retries=1)
        g.remote(0).result()
        placed = fast[True]
        assert f.remote("/tmp/died").result(timeout=60) == "survived"
        assert fast[True] == placed + 1
        strict = s.function(die_once, max_concurrency=1)
        with pytest.raises(SandboxDiedError):
            strict.remote("/tmp/died2").result(timeout=60)
        assert fast[True] == placed + 2
        assert g.remote(1).result(timeout=60) == 2


# -- the answer read by the blocked caller itself (Pool.read_answer) ---------------------------


def nap(seconds):
    time.sleep(seconds)
    return seconds


def my_pid():
    return os.getpid()


@pytest.fixture
def read_here(monkeypatch):
    """How many answers a blocked caller settled itself, in its own thread."""
    settled = []
    original = _pool.Pool._answer

    def spy(self, slot, frame):
        if threading.current_thread() is threading.main_thread():
            settled.append(frame["id"])
        return original(self, slot, frame)

    monkeypatch.setattr(_pool.Pool, "_answer", spy)
    return settled


def test_a_blocked_caller_reads_its_own_answer(fast, read_here):
    """A sync caller blocked on its lone call settles the answer in its own thread; the pool's
    counters and the sandbox's state are what the loop would leave."""
    with Session() as s:
        f = s.function(inc, max_concurrency=1)
        f.remote(0).result()
        got = [f.remote(i).result() for i in range(50)]
        assert got == [i + 1 for i in range(50)]
        # (not all 50: the first is read by the loop, which parks its reader then, and a caller that
        # comes while the reader is still in a read waits for it; 48 were seen at a load of 28)
        assert len(read_here) >= 40
        stats = s.statistics()
        assert (stats.calls_done, stats.calls_running, stats.sandboxes_idle) == (51, 0, 1)


def test_cancel_from_another_thread_wakes_a_reading_caller(fast):
    """A caller reading its own answer sees a cancel made in another thread: OperationCancelled,
    and the sandbox answers the next call."""
    with Session() as s:
        hold = s.function(block, max_concurrency=1)
        f = s.function(inc, max_concurrency=1)
        assert f.remote(0).result() == 1
        ref = hold.remote()
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(_outcome(ref)))
        waiter.start()
        assert wait_until(lambda: s.statistics().calls_running == 1)
        assert ref.cancel()
        waiter.join(timeout=60)
        assert outcome == ["cancelled"]
        assert f.remote(1).result(timeout=60) == 2


def _outcome(ref):
    try:
        return ref.result()
    except OperationCancelled:
        return "cancelled"


def test_a_caller_that_stops_waiting_leaves_the_answer_to_the_loop(fast):
    """result(timeout=) gives up reading; the loop's reader then reads the answer, which a done
    callback (no blocking) receives; the next call goes the fast path again."""
    with Session() as s:
        f = s.function(nap, max_concurrency=1)
        assert f.remote(0).result() == 0
        ref = f.remote(0.5)
        with pytest.raises(TimeoutError):
            ref.result(timeout=0.05)
        done = threading.Event()
        ref.add_done_callback(lambda r: done.set())
        assert done.wait(60) and ref.result() == 0.5
        placed = fast[True]
        assert f.remote(0).result(timeout=60) == 0
        assert fast[True] == placed + 1


def test_a_call_waited_for_by_callback_after_a_blocking_one_is_answered(fast):
    """After a blocking call the loop's reader is parked; a call waited for only through a done
    callback (as await and sandpool.wait do) wakes it, and is answered."""
    with Session() as s:
        f = s.function(inc, max_concurrency=1)
        assert f.remote(0).result() == 1
        ref = f.remote(1)
        done = threading.Event()
        ref.add_done_callback(lambda r: done.set())
        assert done.wait(60) and ref.result() == 2

        async def from_trio():
            return await f.remote(2)

        assert f.remote(3).result() == 4  # parked again
        assert trio.run(from_trio) == 3


def test_a_worker_dying_while_idle_is_noticed_with_the_reader_parked(fast, monkeypatch):
    """The worker of an idle sandbox dies after a blocking call (its reader parked): the pool
    hears of it at once, starts another worker, and the next call runs there unharmed (no
    retries: it must not be sent to the dead one)."""
    lost = []
    original = _pool.Pool.worker_lost
    monkeypatch.setattr(_pool.Pool, "worker_lost", lambda self, slot, info: (lost.append(info), original(self, slot, info)))
    with Session() as s:
        f = s.function(my_pid, max_concurrency=1, retries=0)
        f.remote().result()  # starts the sandbox
        placed = fast[True]
        inner = f.remote().result()  # the fast path, read by this thread: the reader stays parked
        assert fast[True] == placed + 1
        agent = running_or_idle_agent_pid(s)
        worker = next(p for p in psutil.Process(agent).children(recursive=True) if ns_pid(p.pid) == inner)
        worker.kill()
        assert wait_until(lambda: lost, timeout=60)
        assert f.remote().result(timeout=60) != inner


def running_or_idle_agent_pid(session):
    (pool,) = session._pools.values()
    (slot,) = pool.slots
    return slot.sandbox.sandbox.link.record().agent_pid


def ns_pid(pid):
    """A process's pid in its innermost pid namespace."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("NSpid:"))
    return int(line.split()[-1])


def test_threads_calling_at_once_each_get_their_own_answers(fast):
    """Eight threads calling at once on two sandboxes (some read their answers, some wait for the
    loop, some are pipelined behind another): every call gets its own answer, and the pool ends
    idle with every call counted."""
    with Session() as s:
        f = s.function(inc, max_concurrency=2)
        f.remote(0).result()
        results: dict[int, list[int]] = {}

        def caller(k):
            results[k] = [f.remote(k * 1000 + i).result(timeout=60) for i in range(150)]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert all(results[k] == [k * 1000 + i + 1 for i in range(150)] for k in range(8))
        assert wait_until(lambda: s.statistics().calls_running == 0)
        assert s.statistics().calls_done == 1 + 8 * 150


def test_done_callbacks_run_in_the_loops_thread_when_the_caller_read_the_answer(fast):
    """A caller that reads its own answer settles its ref in its own thread; the ref's done
    callbacks (which may touch trio, as map's and imap's do) still run in the loop's thread (but
    for one added to a ref already done, which runs at once, where it was added)."""
    with Session() as s:
        f = s.function(inc, max_concurrency=1)
        f.remote(0).result()
        later: list[threading.Thread] = []
        for i in range(50):
            ran: list[threading.Thread] = []
            called = threading.Event()
            ref = f.remote(i)
            ref.add_done_callback(lambda r, ran=ran, called=called: (ran.append(threading.current_thread()), called.set()))
            at_once = bool(ran)
            assert ref.result(timeout=60) == i + 1
            assert called.wait(60)
            if not at_once:
                later += ran
        assert later and threading.main_thread() not in later
