"""Counters: a sandbox's ``exec_stats`` and the pools' ``PoolStatistics`` (per pool, summed by the
session), read while calls wait, run, fail and are cancelled."""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest
from service_helpers import wait_until

from sandpool import OperationCancelled, Session
from sandpool._functions.pool import PoolStatistics

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nap(seconds):
    time.sleep(seconds)
    return seconds


def fail(message):
    raise KeyError(message)


def test_exec_stats_counts_every_exec_of_the_sandbox():
    """exec_count goes up by one per exec at call time, whatever the command's outcome; each
    sandbox counts its own."""
    with Session() as s:
        a, b = s.sandbox(), s.sandbox()
        assert a.exec_stats["exec_count"] == 0
        assert a.exec(["true"]).result().returncode == 0
        assert a.exec(["sh", "-c", "exit 3"]).result().returncode == 3
        a.exec(["no-such-program-here"]).result()
        assert a.exec_stats["exec_count"] == 3
        assert b.exec_stats["exec_count"] == 0
        b.exec(["true"]).result()
        assert (a.exec_stats["exec_count"], b.exec_stats["exec_count"]) == (3, 1)


def test_pool_statistics_add_up_field_by_field():
    """PoolStatistics + PoolStatistics sums every counter (how the session totals its pools)."""
    one = PoolStatistics(sandboxes_starting=1, sandboxes_idle=2, sandboxes_busy=3, calls_queued=4, calls_running=5,
                         calls_done=6, calls_failed=7, calls_cancelled=8, calls_retried=9)
    two = PoolStatistics(calls_done=10, calls_retried=1)
    assert one + two == PoolStatistics(1, 2, 3, 4, 5, 16, 7, 8, 10)
    assert PoolStatistics() + PoolStatistics() == PoolStatistics()


def test_statistics_follow_calls_through_queued_running_failed_cancelled_and_done():
    """One sandbox, calls of unknown length (two in flight on it): three long calls are 2 running
    and 1 queued on 1 busy sandbox; cancelling them counts 3 cancelled; a raising call counts
    failed; a returning one done; two functions of one spec share one pool, so one sandbox."""
    with Session() as s:
        assert s.statistics() == PoolStatistics()
        slow = s.function(nap, max_concurrency=1)
        broken = s.function(fail, max_concurrency=1)
        refs = [slow.remote(600) for _ in range(3)]
        assert wait_until(lambda: s.statistics().calls_running == 2, timeout=30), s.statistics()
        stats = s.statistics()
        assert (stats.sandboxes_busy, stats.sandboxes_idle, stats.calls_queued) == (1, 0, 1), stats
        for ref in refs:
            assert ref.cancel() is True
        for ref in refs:
            with pytest.raises(OperationCancelled):
                ref.result()
        assert wait_until(lambda: s.statistics().calls_cancelled == 3, timeout=30), s.statistics()
        with pytest.raises(KeyError):
            broken.remote("no").result()
        assert slow.remote(0).result() == 0
        stats = s.statistics()
        assert (stats.calls_failed, stats.calls_done, stats.calls_running, stats.calls_queued) == (1, 1, 0, 0), stats
        assert stats.sandboxes_starting + stats.sandboxes_idle + stats.sandboxes_busy == 1, stats
        assert stats.calls_retried == 0
