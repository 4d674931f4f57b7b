"""Remote functions through the agent's relay: what remote runtimes use, and the local fallback.

Local sandboxes normally reach their call worker directly and move large values as files in the
sandbox's /tmp. Here neither is possible (``_bulk.host_dir`` answers None), so every call, cancel,
large argument and worker death goes through the agent, as it does for a sandbox on another host;
the last test runs the same against a real ``sandpool serve`` server.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
from pool_helpers import assert_quick_calls_are_stolen
from service_helpers import wait_until

from sandpool import OperationCancelled, SandboxDiedError, SandboxTimeoutError, Session
from sandpool._functions import bulk as _bulk

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def relay_only(monkeypatch):
    monkeypatch.setattr(_bulk, "host_dir", lambda sandbox: None)


def write_later(path, secs):
    time.sleep(secs)
    with open(path, "w") as f:
        f.write("x")
    return "wrote"


def exists(path):
    return os.path.exists(path)


def test_calls_values_and_large_arguments_through_the_relay():
    """Calls, batches and a 2 MB argument and result all travel in frames through the agent."""
    with Session() as s:
        @s.function(max_concurrency=1)
        def echo(x):
            return x

        assert [r.result() for r in echo.map([(i,) for i in range(500)])] == list(range(500))
        blob = os.urandom(2 * 1024 * 1024)
        assert echo.remote(blob).result() == blob
        pool = next(iter(s._pools.values()))
        assert all(slot.direct is None for slot in pool.slots)


def test_cancel_timeout_and_worker_death_through_the_relay():
    """A cancelled call never writes its marker; a timeout interrupts; a dying worker is reported
    with its exit code and replaced, and calls queued behind it still run."""
    with Session() as s:
        write = s.function(write_later, max_concurrency=1)
        check = s.function(exists, max_concurrency=1)
        slow = s.function(write_later, max_concurrency=1, timeout_seconds=0.2)

        @s.function(max_concurrency=1)
        def die():
            os._exit(5)

        ref = write.remote("/tmp/marker", 60)
        assert wait_until(lambda: s.statistics().calls_running == 1), s.statistics()
        assert ref.cancel() is True  # a 60 s call cannot have finished
        with pytest.raises(OperationCancelled):
            ref.result()
        with pytest.raises(SandboxTimeoutError):
            slow.remote("/tmp/slow", 1.0).result()
        # One sandbox, one worker, one call at a time: `check` runs only once the cancelled and the
        # timed-out call have left the worker; had either gone on, its marker would be there.
        assert check.remote("/tmp/marker").result() is False
        assert check.remote("/tmp/slow").result() is False
        dying = die.remote()
        behind = write.remote("/tmp/after", 0)
        with pytest.raises(SandboxDiedError, match="exited with code 5"):
            dying.result()
        assert behind.result() == "wrote"


def test_work_stealing_through_the_relay():
    """Calls waiting behind a long one are given back by the agent (or its worker) and run on the
    idle sandbox."""
    with Session() as s:
        @s.function(max_concurrency=2)
        def nap(secs):
            time.sleep(secs)
            return secs

        assert sum(r.result() for r in nap.map([(0,)] * 40)) == 0
        assert_quick_calls_are_stolen(s, nap)


def test_remote_functions_through_a_sandpool_server(tmp_path):
    """Against a ``sandpool serve`` server (sandboxes the client cannot reach directly), calls,
    maps, remote exceptions, large values and cancellation all go through the relay."""
    from service_helpers import ServerProcess

    with ServerProcess(str(tmp_path)) as server, Session(address=server.address) as s:
        write = s.function(write_later, max_concurrency=1)
        check = s.function(exists, max_concurrency=1)

        @s.function(max_concurrency=1)
        def lookup(key):
            return {"a": 1}[key]

        assert [r.result() for r in lookup.map([("a",)] * 50)] == [1] * 50
        with pytest.raises(KeyError):
            lookup.remote("b").result()
        blob = os.urandom(1 << 20)
        assert s.function(bytes.upper, max_concurrency=1).remote(blob).result() == blob.upper()
        ref = write.remote("/tmp/marker", 60)
        assert wait_until(lambda: s.statistics().calls_running == 1), s.statistics()
        assert ref.cancel() is True
        with pytest.raises(OperationCancelled):
            ref.result()
        assert check.remote("/tmp/marker").result() is False  # runs after the cancelled call left
