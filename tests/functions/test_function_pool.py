"""Remote functions, scheduling: the pool's decisions as plain functions, then the pool at work."""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
from pool_helpers import assert_quick_calls_are_stolen
from service_helpers import wait_until

from sandpool import Session
from sandpool._functions.pool import MAX_DEPTH, choose_slot, choose_steals, pipeline_depth, sandboxes_to_start
from sandpool._core.channel import FrameChannel
from sandpool._functions.direct import DirectChannel

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sandbox_id(secs=0.0):
    time.sleep(secs)
    return os.environ["SANDPOOL_SANDBOX_ID"]


# -- decisions --------------------------------------------------------------------------------------


def test_pipeline_depth_follows_the_call_duration():
    """Unknown length: 2 per sandbox; short calls: up to MAX_DEPTH; reuse=False: exactly 1."""
    assert pipeline_depth(None, True) == 2
    assert pipeline_depth(0.05, True) == 2
    assert pipeline_depth(0.0001, True) == 20
    assert pipeline_depth(1e-9, True) == MAX_DEPTH
    assert pipeline_depth(None, False) == pipeline_depth(1e-9, False) == 1


def test_choose_slot_prefers_idle_then_least_loaded_and_spreads_long_calls():
    """An idle sandbox wins; pipelining goes to the least loaded below depth, and only when more
    calls wait than the starting sandboxes will take."""
    assert choose_slot([(1, 0), (0, 0)], waiting=5, starting=0, depth=4) == 1
    assert choose_slot([(3, 0), (1, 0), None], waiting=5, starting=0, depth=4) == 1
    assert choose_slot([(4, 0), (4, 0)], waiting=5, starting=0, depth=4) is None
    assert choose_slot([(1, 0)], waiting=3, starting=3, depth=4) is None  # the starting ones take them
    assert choose_slot([(1, 0)], waiting=4, starting=3, depth=4) == 0
    assert choose_slot([(1, 64 << 20)], waiting=9, starting=0, depth=4) is None  # bytes cap
    assert choose_slot([None, None], waiting=1, starting=2, depth=4) is None


def test_sandboxes_to_start_covers_waiting_calls_up_to_the_limit():
    """Start one sandbox per waiting call not covered by idle or starting ones, within the limit."""
    assert sandboxes_to_start(waiting=5, idle=1, starting=1, live=2, limit=8) == 3
    assert sandboxes_to_start(waiting=5, idle=0, starting=0, live=6, limit=8) == 2
    assert sandboxes_to_start(waiting=1, idle=1, starting=0, live=1, limit=8) == 0
    assert sandboxes_to_start(waiting=100, idle=0, starting=0, live=8, limit=8) == 0


def test_choose_steals_takes_half_of_what_waits_behind_a_stalled_sandbox():
    """Only with an idle sandbox; only from sandboxes silent for STEAL_AFTER; half, rounded up."""
    assert choose_steals([(True, 0, 0.0), (False, 5, 0.0)], now=1.0) == {1: 3}
    assert choose_steals([(False, 0, 0.0), (False, 5, 0.0)], now=1.0) == {}  # nobody idle
    assert choose_steals([(True, 0, 0.0), (False, 5, 0.995)], now=1.0) == {}  # answered just now
    assert choose_steals([(True, 0, 0.0), (False, 1, 0.0), (False, 0, 0.0)], now=1.0) == {1: 1}


# -- the pool at work ----------------------------------------------------------------------------------


def test_sandboxes_start_lazily_up_to_max_concurrency_and_are_reused():
    """Nothing starts before the first call; N long calls spread over N sandboxes (never more than
    max_concurrency); later calls reuse the same warm sandboxes."""
    with Session() as s:
        where = s.function(sandbox_id, max_concurrency=3)
        assert s.sandbox_count == 0
        first = {r.result() for r in where.map([(0.3,)] * 3)}
        assert len(first) == 3 and s.sandbox_count == 3
        again = {r.result() for r in where.map([(0.05,)] * 9)}
        assert again == first and s.sandbox_count == 3
        assert s.statistics().sandboxes_idle == 3


def test_reuse_false_gives_every_call_a_fresh_sandbox():
    """reuse=False: one sandbox per call, stopped afterwards (cwsandbox's isolation)."""
    with Session() as s:
        fresh = s.function(sandbox_id, reuse=False, max_concurrency=2)
        ids = [r.result() for r in fresh.map([()] * 4)]
        assert len(set(ids)) == 4
        assert wait_until(lambda: s.sandbox_count == 0, timeout=30), s.sandbox_count  # each stopped after its call


def test_one_warm_pool_per_sandbox_spec():
    """Functions with the same resolved spec share sandboxes; different overrides get their own."""
    with Session() as s:
        a = s.function(sandbox_id, max_concurrency=1)
        b = s.function(sandbox_id, max_concurrency=1)
        other = s.function(sandbox_id, max_concurrency=1, environment_variables={"STAGE": "x"})
        assert a.remote().result() == b.remote().result() != other.remote().result()
        assert len(s._pools) == 2


def test_function_is_sent_once_per_sandbox_and_small_calls_are_batched(monkeypatch):
    """The pickled function travels with the first call to each sandbox only; when the queue is
    deep, many call frames go out in one write."""
    sent: list[list[dict]] = []
    to_agent, to_worker = FrameChannel.send_many, DirectChannel.send_now

    async def spy_agent(self, frames):
        sent.append([f for f in frames if f["t"] == "call"])
        await to_agent(self, frames)

    def spy_worker(self, frames):
        sent.append([f for f in frames if f["t"] == "call"])
        to_worker(self, frames)

    monkeypatch.setattr(FrameChannel, "send_many", spy_agent)  # calls relayed by the agent
    monkeypatch.setattr(DirectChannel, "send_now", spy_worker)  # calls straight to the worker
    with Session() as s:
        @s.function(max_concurrency=1)
        def inc(x):
            return x + 1

        assert inc.remote(0).result() == 1
        assert [r.result() for r in inc.map([(i,) for i in range(2000)])] == list(range(1, 2001))
    calls = [f for batch in sent for f in batch]
    assert len(calls) == 2001
    assert sum(1 for f in calls if f["fn"]) == 1 and calls[0]["fn"]
    assert max(len(batch) for batch in sent) >= 50


def test_calls_reach_the_worker_directly_and_large_values_leave_no_files():
    """Local sandboxes get a direct connection to their worker; a large argument and result go as
    files in the sandbox's /tmp, removed once read, and the worker's socket is gone from there."""
    with Session() as s:
        @s.function(max_concurrency=1)
        def double(data):
            return data * 2

        @s.function(max_concurrency=1)
        def leftovers():
            return sorted(name for name in os.listdir("/tmp") if name.startswith(".sandpool"))

        blob = os.urandom(1 << 20)
        assert double.remote(blob).result() == blob * 2
        assert leftovers.remote().result() == []
        assert all(slot.direct is not None for pool in s._pools.values() for slot in pool.slots)


def test_an_idle_sandbox_takes_over_calls_stuck_behind_a_long_one():
    """Work stealing: short calls pipelined behind an unexpectedly long one are taken back and run
    on the idle sandbox, instead of waiting for it."""
    with Session() as s:
        @s.function(max_concurrency=2)
        def nap(secs):
            time.sleep(secs)
            return secs

        assert sum(r.result() for r in nap.map([(0,)] * 40)) == 0  # warm: the function looks short
        assert_quick_calls_are_stolen(s, nap)


def test_an_idle_sandbox_takes_over_large_calls_whose_frames_wait_behind_a_long_one():
    """Work stealing when the calls behind the long one are large (inline, 100 kB each): the stalled
    worker reads no calls while one runs, so its connection holds what its socket cannot take;
    those not begun are taken back at once, the others by asking the worker (they were once never
    taken back: a call counted as sent only once all of them were written)."""
    with Session() as s:
        @s.function(max_concurrency=2)
        def nap(secs, blob=b""):
            time.sleep(secs)
            return secs

        assert sum(r.result() for r in nap.map([(0,)] * 40)) == 0  # warm: the function looks short
        assert_quick_calls_are_stolen(s, nap, b"x" * 100_000)


@pytest.mark.slow
def test_a_100_mb_argument_round_trips():
    """Arguments (and results) of 100 MB work."""
    with Session() as s:
        @s.function
        def size_and_tail(data):
            return len(data), data[-3:]

        blob = os.urandom(100 * 1024 * 1024)
        assert size_and_tail.remote(blob).result(timeout=60) == (len(blob), blob[-3:])
