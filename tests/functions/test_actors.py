"""Actors (``@session.cls``): an instance living in a sandbox of its own, its methods in call order.

Every test runs real sandboxes. Classes and functions of this module are pickled by value
(registered below), so the sandboxes never import this test module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import cloudpickle
import pytest
import trio

import sandpool
from sandpool import ActorDiedError, OperationCancelled, SerializationError, Session
from sandpool._functions import bulk as _bulk
from sandpool._functions.actor import state_of
from service_helpers import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    @sandpool.enter
    def setup(self):
        self.entered = getattr(self, "entered", 0) + 1

    def incr(self, k=1, *, caller=None):
        self.n += k
        self.log.append(caller)
        return self.n

    def get(self):
        return self.n

    def history(self):
        return list(self.log)

    def entered_count(self):
        return self.entered

    def pid(self):
        return os.getpid()

    def fail(self):
        raise KeyError("missing")

    def block(self):
        import time

        time.sleep(600)

    def exit_worker(self):
        os._exit(3)

    async def aincr(self, k):
        import asyncio

        await asyncio.sleep(0)
        self.n += k
        return self.n


class GridWorld:
    """An environment object (no trio, no asyncio) kept across steps; its generator and lock
    would not even pickle, so it can only live where it was made."""

    def __init__(self, size, seed):
        import random

        self.size, self.pos, self.rng = size, 0, random.Random(seed)
        self.lock = threading.Lock()
        self.ticks = iter(range(10**9))

    def step(self, action):
        with self.lock:
            self.pos = max(0, min(self.size - 1, self.pos + action))
            return self.pos, self.rng.random(), next(self.ticks)


class Broken:
    def __init__(self):
        raise ValueError("no config")

    def hello(self):
        return "hi"


@pytest.fixture(params=["direct", "relay"])
def session(request, monkeypatch):
    """A session whose actor calls reach the worker directly (local sandboxes), or through the
    agent's relay, as for sandboxes of a `sandpool serve` server or Slurm."""
    if request.param == "relay":
        monkeypatch.setattr(_bulk, "host_dir", lambda sandbox: None)
    with Session() as s:
        yield s


def agent_pid(handle) -> int:
    return state_of(handle).link.sandbox.link.record().agent_pid


def test_counter_increments_in_order_under_eight_concurrent_callers(session):
    """Calls from 8 threads at once each run exactly once, one at a time, each thread's in the
    order it made them."""
    counter = session.cls(Counter).remote()
    seen: dict[int, list[int]] = {}

    def caller(who: int) -> None:
        refs = [counter.incr.remote(1, caller=who) for _ in range(200)]
        seen[who] = [r.result(timeout=60) for r in refs]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for values in seen.values() for v in values) == list(range(1, 1601))
    assert all(values == sorted(values) for values in seen.values())
    history = counter.history()
    assert all([h for h in history if h == who] == [who] * 200 for who in range(8))
    assert counter.get() == 1600


def test_environment_object_lives_across_a_thousand_steps(session):
    """An environment that cannot leave its sandbox keeps its state across 1,000 steps: the
    trajectory equals the same environment's stepped here."""
    Env = session.cls(GridWorld)
    env = Env.remote(10, seed=7)
    actions = [(-1) ** (i // 3) for i in range(1000)]
    refs = [env.step.remote(a) for a in actions]
    remote = [r.result(timeout=60) for r in refs]
    here = GridWorld(10, seed=7)
    assert remote == [here.step(a) for a in actions]
    assert remote[-1][2] == 999


def test_handle_passed_into_a_map_of_100_tasks_reaches_the_same_actor(session):
    """A handle given to 100 remote function calls (and to another actor) calls the same actor:
    every increment lands on one counter."""
    counter = session.cls(Counter).remote()

    @session.function
    def bump(handle, i):
        return handle.incr(1, caller=i)

    refs = bump.map([(counter, i) for i in range(100)])
    assert sorted(r.result(timeout=60) for r in refs) == list(range(1, 101))
    assert sorted(counter.history()) == list(range(100))

    @session.cls
    class Relay:
        def __init__(self, target):
            self.target = target

        def push(self, n):
            refs = [self.target.incr.remote(1) for _ in range(n)]
            return [r.result() for r in refs]

    assert Relay.remote(counter).push(5) == [101, 102, 103, 104, 105]


def test_handle_inside_a_sandbox_reports_errors_and_refuses_non_plain_arguments(session):
    """Inside a sandbox, a method's own error comes back as ActorCallError naming its type; an
    argument that is not plain data is refused there; the actor goes on."""
    counter = session.cls(Counter).remote()

    @session.function
    def misuse(handle, what):
        from _sandpool_agent.actors import ActorCallError

        try:
            if what == "fail":
                handle.fail()
            else:
                handle.incr(object())
        except (ActorCallError, TypeError) as exc:
            return type(exc).__name__, str(exc)

    kind, message = misuse.remote(counter, "fail").result(timeout=60)
    assert kind == "ActorCallError" and "KeyError" in message and "missing" in message
    kind, message = misuse.remote(counter, "object").result(timeout=60)
    assert kind == "TypeError" and "plain data" in message
    assert counter.incr() == 1


def test_named_actor_is_found_from_another_part_of_the_program(session):
    """``options(name=...)`` registers the actor in its session; ``get_actor`` finds the same one
    (from another thread too); a second live actor of that name is refused; kill frees the name."""
    Env = session.cls(Counter)
    first = Env.options(name="env-3").remote(10)
    found: list = []
    thread = threading.Thread(target=lambda: found.append(session.get_actor("env-3").incr(5)))
    thread.start()
    thread.join()
    assert found == [15]
    assert first.get() == 15 and session.get_actor("env-3") is first
    with pytest.raises(ValueError, match="env-3.*runs in this session already"):
        Env.options(name="env-3").remote()
    with pytest.raises(ValueError, match="no live actor named 'nobody'"):
        session.get_actor("nobody")
    sandpool.kill(first)
    with pytest.raises(ActorDiedError, match="killed"):
        first.get.remote().result(timeout=60)
    second = Env.options(name="env-3").remote(1)
    assert second.get() == 1 and session.get_actor("env-3") is second


def test_sigkilled_actor_sandbox_raises_actor_died_on_pending_and_later_calls(session):
    """SIGKILL of the actor's sandbox: its pending call and every later call raise
    ActorDiedError, saying how it died."""
    counter = session.cls(Counter).remote()
    assert counter.incr() == 1
    pending = counter.block.remote()
    os.kill(agent_pid(counter), signal.SIGKILL)
    with pytest.raises(ActorDiedError) as info:
        pending.result(timeout=60)
    assert isinstance(info.value, sandpool.SandboxDiedError)
    with pytest.raises(ActorDiedError):
        counter.incr.remote().result(timeout=60)
    assert not counter.alive


def test_max_restarts_reconstructs_the_actor_in_a_new_sandbox(session):
    """With max_restarts=1, the actor comes back after its sandbox is SIGKILLed: later calls go
    to a new instance (state lost, setup hook run again) in a new sandbox; a second death is final."""
    counter = session.cls(Counter, max_restarts=1).remote(100)
    assert counter.incr() == 101 and counter.entered_count() == 1
    first_sandbox = counter.sandbox_id
    pending = counter.block.remote()
    os.kill(agent_pid(counter), signal.SIGKILL)
    with pytest.raises(ActorDiedError):
        pending.result(timeout=60)
    assert counter.incr() == 101  # constructed again from its arguments: the increments are lost
    assert counter.entered_count() == 1 and counter.sandbox_id != first_sandbox
    with pytest.raises(ActorDiedError):
        counter.exit_worker()  # its worker process dies: the instance with it, no restart left
    with pytest.raises(ActorDiedError):
        counter.get()


def test_retries_run_a_pending_call_again_on_the_restarted_actor(session):
    """retries=1: the call its actor's SIGKILL interrupted runs again on the restarted instance
    instead of failing; the call behind it follows it there, in order."""
    counter = session.cls(Counter, max_restarts=1, retries=1).remote()
    assert counter.incr() == 1
    first_sandbox = counter.sandbox_id
    blocked = counter.block.remote()
    after = counter.incr.remote()
    os.kill(agent_pid(counter), signal.SIGKILL)
    assert wait_until(lambda: counter.sandbox_id not in (None, first_sandbox), timeout=60)
    assert not blocked.done()  # it runs again, in the new sandbox
    blocked.cancel()
    assert after.result(timeout=60) == 1  # the new instance: the first increment was lost


def test_refs_as_arguments_are_resolved_three_deep(session):
    """An OperationRef passed to .remote() is replaced by its value before the call runs, for
    functions and actor methods, through 3 levels; an error in a dependency is the call's error."""
    @session.function
    def plus_one(x):
        return x + 1

    @session.function
    def boom(x):
        raise KeyError(x)

    assert plus_one.remote(plus_one.remote(plus_one.remote(1))).result(timeout=60) == 4
    counter = session.cls(Counter).remote()
    chained = counter.incr.remote(counter.incr.remote(plus_one.remote(plus_one.remote(1))))
    assert chained.result(timeout=60) == 3 + 3
    with pytest.raises(KeyError):
        plus_one.remote(plus_one.remote(boom.remote(1))).result(timeout=60)
    with pytest.raises(KeyError):
        counter.incr.remote(k=boom.remote(2)).result(timeout=60)
    assert counter.get() == 6  # the failed call never ran


def test_calls_wait_in_order_behind_a_call_whose_argument_is_pending(session):
    """A call whose argument is another call's result holds back the calls made after it, though
    they could have gone at once."""
    counter = session.cls(Counter).remote()

    @session.function
    def slow_ten():
        import time

        time.sleep(0.3)  # the value comes late: the call made after must still run second
        return 10

    ten = slow_ten.remote()
    first = counter.incr.remote(ten, caller="first")
    second = counter.incr.remote(1, caller="second")
    assert not ten.done(), "the argument came before the second call was made: nothing was held back"
    assert (first.result(timeout=60), second.result(timeout=60)) == (10, 11)
    assert counter.history() == ["first", "second"]


def test_constructor_error_makes_the_actor_dead_with_its_cause(session):
    """A constructor that raises: every call raises ActorDiedError caused by that exception."""
    broken = session.cls(Broken).remote()
    with pytest.raises(ActorDiedError, match="constructor raised") as info:
        broken.hello()
    assert isinstance(info.value.__cause__, ValueError)


def test_method_errors_results_and_async_methods(session):
    """A method's exception is its own type; a result that is not plain data fails that call
    only; an async method runs to completion; the actor goes on after each."""
    counter = session.cls(Counter).remote()
    with pytest.raises(KeyError, match="missing"):
        counter.fail()

    @session.cls
    class Maker:
        def thing(self):
            return threading.Lock()

        def ok(self):
            return "ok"

    maker = Maker.remote()
    with pytest.raises(SerializationError, match="not plain data"):
        maker.thing()
    assert maker.ok() == "ok"
    assert counter.aincr(5) == 5 and counter.incr() == 6


class Mailbox:
    """An async actor whose calls need each other: ``get`` waits for a ``put``."""

    def __init__(self):
        self.queue, self.active = None, 0

    def _queue(self):
        import asyncio

        if self.queue is None:  # made in the actor's event loop
            self.queue = asyncio.Queue()
        return self.queue

    async def get(self):
        return await self._queue().get()

    async def put(self, item):
        self._queue().put_nowait(item)
        return item

    async def hold(self):
        import asyncio

        self.active += 1
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self.active -= 1

    async def probe(self):
        return self.active

    def plain(self):
        return "plain"


def test_max_concurrency_runs_async_calls_at_once(session):
    """With max_concurrency=4, a get() waiting for a put() made after it does not block the put
    (run one at a time, it would wait forever); values and errors come back per call."""
    box = session.cls(Mailbox, max_concurrency=4).remote()
    waiting = [box.get.remote() for _ in range(3)]
    assert [box.put(i) for i in range(3)] == [0, 1, 2]
    assert sorted(r.result(timeout=60) for r in waiting) == [0, 1, 2]
    assert box.plain() == "plain"


def test_max_concurrency_caps_the_calls_running_at_once(session):
    """With max_concurrency=2 and two calls holding, a third waits until one is cancelled (it
    then sees one call active, not two); cancelling a running call leaves the actor working."""
    box = session.cls(Mailbox, max_concurrency=2).remote()
    first, second = box.hold.remote(), box.hold.remote()
    probe = box.probe.remote()
    first.cancel()
    assert probe.result(timeout=60) == 1
    second.cancel()
    assert box.probe() == 0


def test_bad_options_and_misuse_fail_at_the_call_site(session):
    """Bad options, calling the class itself, an unknown method and a bad kill argument raise
    clear errors at once."""
    with pytest.raises(ValueError, match="max_restarts"):
        session.cls(Counter, max_restarts=-1)
    with pytest.raises(ValueError, match="max_concurrency"):
        session.cls(Counter, max_concurrency=0)
    with pytest.raises(ValueError, match="retries only calls"):
        session.cls(Counter, retries=sandpool.Retries(2, on=(KeyError,)))
    with pytest.raises(TypeError):
        session.cls(Counter, no_such_option=1)
    Env = session.cls(Counter)
    with pytest.raises(TypeError, match=r"Counter.remote\(...\)"):
        Env()
    with pytest.raises(AttributeError, match="no method 'nope'"):
        Env.remote().nope
    with pytest.raises(TypeError, match="ActorHandle"):
        sandpool.kill("env")


def test_cancel_and_session_close(session):
    """A cancelled call raises OperationCancelled and the actor goes on; closing the session
    cancels what is pending and the actor ends with its session."""
    counter = session.cls(Counter).remote()
    blocked = counter.block.remote()
    after = counter.incr.remote()
    assert after.cancel() is True
    with pytest.raises(OperationCancelled):
        after.result()
    blocked.cancel()
    assert counter.incr() == 1
    stuck = counter.block.remote()
    session.close().result()
    with pytest.raises(OperationCancelled):
        stuck.result(timeout=60)


def test_actors_inside_trio():
    """Inside trio, actor calls are awaited; the blocking shortcut raises RuntimeError there."""
    async def main():
        async with Session() as s:
            counter = s.cls(Counter).remote()
            assert await counter.incr.remote(2) == 2
            results = await sandpool.gather([counter.incr.remote() for _ in range(10)])
            assert results == list(range(3, 13))
            with pytest.raises(RuntimeError, match="await handle.incr.remote"):
                counter.incr()

    trio.run(main)


def test_actors_through_sandpool_serve(tmp_path, monkeypatch):
    """Through a `sandpool serve` server: an actor's calls, a handle used inside a remote
    function (its calls routed back through the server to this client), a concurrent actor."""
    from service_helpers import ServerProcess

    with ServerProcess(str(tmp_path), "--min-isolation", "process") as server:
        monkeypatch.setenv("SANDPOOL_ADDRESS", server.address)
        with Session() as s:
            assert s._runtime.name == "remote"
            counter = s.cls(Counter).remote()
            assert counter.incr() == 1

            @s.function
            def bump(handle):
                return handle.incr(2)

            assert bump.remote(counter).result(timeout=60) == 3
            box = s.cls(Mailbox, max_concurrency=2).remote()
            waiting = box.get.remote()
            assert box.put(7) == 7 and waiting.result(timeout=60) == 7
