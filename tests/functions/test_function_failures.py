"""Remote functions, failures: remote exceptions as themselves, dead sandboxes, retries, timeouts."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle
import pytest

from service_helpers import wait_until

from sandpool import RemoteError, Retries, SandboxDiedError, SandboxTimeoutError, SerializationError, Session
from sandpool._functions.serialize import RemoteTraceback

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class NeedsTwo(Exception):
    """Pickles, but cannot be rebuilt from its args (a classic unpicklable exception)."""

    def __init__(self, a, b):
        super().__init__(a)


def running_agent_pid(session: Session) -> int:
    """The agent pid of the sandbox holding a sent call (polls until one does)."""
    def sent_in() -> int | None:
        for pool in list(session._pools.values()):
            for slot in list(pool.slots):
                if any(call.sent for call in slot.inflight.values()):
                    return slot.sandbox.sandbox.link.record().agent_pid
        return None

    pid = wait_until(sent_in, timeout=30)  # a bound for a hang: a call is sent within milliseconds
    assert pid, "no call was sent"
    return pid


def test_remote_key_error_is_caught_as_key_error_with_the_remote_frame():
    """KeyError raised in the sandbox is a KeyError here; its __cause__ holds the remote traceback
    (the function's frame and source line) and the sandbox id."""
    with Session() as s:
        @s.function
        def lookup(table, key):
            return table[key]

        with pytest.raises(KeyError) as info:
            lookup.remote({"a": 1}, "zzz").result()
        assert info.value.args == ("zzz",)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert cause.sandbox_id and cause.sandbox_id.startswith("sb-")
        assert "in lookup" in cause.traceback and "return table[key]" in cause.traceback
        assert "KeyError: 'zzz'" in cause.traceback and cause.sandbox_id in str(cause)


def test_unrebuildable_exceptions_become_remote_error():
    """An exception whose class cannot be rebuilt from its args here, and SystemExit, arrive as
    RemoteError with type name, message and traceback; an exception holding an attribute that is
    not plain data (a lock) comes back as itself, without that attribute."""
    with Session() as s:
        @s.function
        def raise_needs_two():
            raise NeedsTwo("first", "second")

        @s.function
        def raise_with_lock():
            err = ValueError("holds a lock")
            err.lock = threading.Lock()
            raise err

        @s.function
        def exits():
            sys.exit(3)

        with pytest.raises(RemoteError) as info:
            raise_needs_two.remote().result()
        assert info.value.type_name.endswith("NeedsTwo") and "first" in str(info.value)
        assert "raise NeedsTwo" in info.value.remote_traceback and info.value.sandbox_id
        with pytest.raises(ValueError, match="holds a lock") as lock_info:
            raise_with_lock.remote().result()
        assert not hasattr(lock_info.value, "lock")
        with pytest.raises(RemoteError, match="SystemExit: 3"):
            exits.remote().result()


def test_unpicklable_result_is_a_serialization_error():
    """A result that is not plain data fails in the sandbox with SerializationError naming its type
    and the opt-in; with the opt-in, one that cannot be pickled names its type too."""
    with Session() as s:
        @s.function
        def make_lock():
            return threading.Lock()

        @s.function(unsafe_pickle_results=True)
        def make_lock_pickled():
            return threading.Lock()

        with pytest.raises(SerializationError, match=r"result \(_thread.lock\) is not plain data.*unsafe_pickle"):
            make_lock.remote().result()
        with pytest.raises(SerializationError, match=r"result \(_thread.lock\) could not be pickled"):
            make_lock_pickled.remote().result()


def test_sigkilled_sandbox_is_retried_on_a_fresh_one_and_replaced():
    """A sandbox SIGKILLed mid-call: the call runs again on a new sandbox (retries=1); the dead
    one is stopped and never used again."""
    with Session() as s:
        @s.function(retries=1, max_concurrency=1)
        def where(secs, in_sandbox=None):
            if os.environ["SANDPOOL_SANDBOX_ID"] == in_sandbox:  # the retry elsewhere returns at once
                time.sleep(secs)
            return os.environ["SANDPOOL_SANDBOX_ID"]

        first = where.remote(0).result()
        ref = where.remote(600, first)  # still running when the kill lands, however slow the machine
        os.kill(running_agent_pid(s), signal.SIGKILL)
        second = ref.result(timeout=30)
        assert second != first
        assert where.remote(0).result() == second
        stats = s.statistics()
        assert stats.calls_retried == 1 and stats.calls_failed == 0
        assert s.sandbox_count == 1


def test_dead_sandbox_without_retries_says_how_it_died_and_spares_queued_calls():
    """Without retries the running call fails with SandboxDiedError (signal 9); the calls queued
    behind it never started, so they run on the replacement without being charged."""
    with Session() as s:
        @s.function(max_concurrency=1)
        def nap(secs, tag):
            time.sleep(secs)
            return tag

        assert nap.remote(0, "warm").result() == "warm"
        victim = nap.remote(600, "victim")  # still running when the kill lands, however slow the machine
        behind = [nap.remote(0, f"b{i}") for i in range(3)]
        os.kill(running_agent_pid(s), signal.SIGKILL)
        with pytest.raises(SandboxDiedError, match="SIGKILL.*retries=N") as info:
            victim.result(timeout=30)
        assert info.value.signal == signal.SIGKILL and info.value.sandbox_id
        assert [r.result(timeout=30) for r in behind] == ["b0", "b1", "b2"]
        assert s.statistics().calls_retried == 0


def test_out_of_memory_sandbox_fails_the_call_and_is_replaced(memory_limits_enforced):
    """A call that blows the sandbox's memory limit fails with SandboxDiedError (OOM, signal 9);
    the next call runs on a fresh sandbox. (Skips only where no memory limit can be enforced.)"""
    with Session() as s:
        @s.function(max_concurrency=1, resources={"memory": "64Mi"})
        def hog(mb):
            blocks = [bytearray(1 << 20) for _ in range(mb)]
            return len(blocks)

        assert hog.remote(4).result() == 4
        with pytest.raises(SandboxDiedError) as info:  # the machine enforces limits: so must sandpool
            hog.remote(400).result(timeout=30)
        assert info.value.signal == signal.SIGKILL and "memory" in str(info.value)
        assert hog.remote(4).result() == 4
        assert s.sandbox_count == 1


def test_worker_process_death_is_an_infrastructure_failure():
    """A function that kills its own worker (os._exit) fails with SandboxDiedError carrying the
    exit code; retries re-run it; the sandbox goes on serving calls."""
    with Session() as s:
        @s.function(max_concurrency=1, retries=1)
        def die(code):
            os._exit(code)

        @s.function(max_concurrency=1)
        def ok():
            return "ok"

        with pytest.raises(SandboxDiedError, match="worker process exited with code 7") as info:
            die.remote(7).result(timeout=10)
        assert info.value.exit_code == 7
        assert s.statistics().calls_retried == 1
        assert ok.remote().result() == "ok"


def test_user_exceptions_are_retried_only_when_retries_names_them():
    """Retries(n, on=(ValueError,)) re-runs a flaky function; other exceptions fail at once."""
    with Session() as s:
        state = {"calls": 0}  # a global of the function: one copy per worker, kept between calls

        @s.function(max_concurrency=1, retries=Retries(2, on=(ValueError,), initial_delay=0.01))
        def flaky():
            state["calls"] += 1
            if state["calls"] < 3:
                raise ValueError(f"attempt {state['calls']}")
            return state["calls"]

        @s.function(max_concurrency=1, retries=Retries(5, on=(ValueError,)))
        def wrong_kind():
            raise KeyError("not retried")

        assert flaky.remote().result() == 3
        assert s.statistics().calls_retried == 2
        with pytest.raises(KeyError):
            wrong_kind.remote().result()
        assert s.statistics().calls_retried == 2


def test_retries_values():
    """Retries validates its fields and computes capped exponential delays."""
    r = Retries(3, on=ValueError, initial_delay=0.5, backoff_coefficient=2, max_delay=1.5)
    assert r.on == (ValueError,) and [r.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
    assert r.retry_on(ValueError()) and not r.retry_on(KeyError())
    assert Retries.coerce(2) == Retries(2) and Retries.coerce(None) == Retries(0)
    with pytest.raises(ValueError, match="max_retries"):
        Retries(-1)
    with pytest.raises(TypeError, match="exception classes"):
        Retries(1, on=("ValueError",))


def test_timeout_interrupts_the_call_even_if_it_swallows_the_interrupt():
    """timeout_seconds raises SandboxTimeoutError; a function that swallows the interruption is
    killed a grace second later; the sandbox goes on serving."""
    with Session() as s:
        @s.function(max_concurrency=1, timeout_seconds=0.2)
        def sleepy():
            time.sleep(120)

        @s.function(max_concurrency=1, timeout_seconds=0.2)
        def stubborn():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    time.sleep(0.05)
                except BaseException:
                    pass

        @s.function(max_concurrency=1)
        def ok():
            return "ok"

        start = time.monotonic()
        with pytest.raises(SandboxTimeoutError, match="0.2 s"):
            sleepy.remote().result()
        assert time.monotonic() - start < 60  # interrupted, not slept out (its sleep is 120 s)
        start = time.monotonic()
        with pytest.raises(SandboxTimeoutError):
            stubborn.remote().result()
        assert time.monotonic() - start < 60  # killed after 0.2 s + a grace second, not after 120 s
        assert ok.remote().result() == "ok"
