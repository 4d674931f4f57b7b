"""The pool and its slots without a Session: ``Pool`` built from a trio nursery and a sandbox factory
over ``sandpool.testing.FakeRuntime``, driven on trio's virtual clock (``MockClock``, autojump), so
every duration below is exact and no test sleeps.

The factory returns ``RuntimeSandbox``: a runtime's record and frame channel with request routing,
which is all a pool needs of a sandbox (``PoolSandbox``). Functions run in this process inside the
fake sandbox's task (after a real cloudpickle round trip), so they can note when they ran.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from sandpool import OperationCancelled, SandboxDefaults, SandboxDiedError, SandboxFailedError
from sandpool._config import resolve_spec
from sandpool._core.opref import TaskHost
from sandpool._core.routing import Requests
from sandpool._errors import ProtocolError, SandboxNotRunningError
from sandpool._functions.function import RemoteFunction
from sandpool._functions.host import Pools
from sandpool._functions.plan import STEAL_AFTER_SECONDS
from sandpool._functions.pool import Pool
from sandpool.testing import FakeCall, FakeRuntime

#: (argument, trio time) of each call as its function ran, in order; reset by every test.
RAN: list[tuple[object, float]] = []


def note(x):
    RAN.append((x, trio.current_time()))
    return x


class RuntimeSandbox:
    """A started sandbox straight on a runtime: its record's channel, requests routed by a reader."""

    bulk_dir = None  # no direct worker: calls go through the (fake) agent
    connect_worker = None

    def __init__(self, runtime, record, nursery: trio.Nursery) -> None:
        self.runtime, self.record, self.nursery = runtime, record, nursery
        self.requests = Requests()
        self.register, self.unregister = self.requests.register, self.requests.unregister
        self.stops = 0

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    def _channel(self):
        channel = self.record.channel
        if channel is None or channel.closed:
            raise SandboxNotRunningError(f"sandbox {self.sandbox_id} is not running", sandbox_id=self.sandbox_id)
        return channel

    async def send(self, frame: dict) -> None:
        await self._channel().send(frame)

    async def send_many(self, frames: list[dict]) -> None:
        await self._channel().send_many(frames)

    async def read(self) -> None:
        try:
            while (batch := await self.record.channel.receive_batch()) is not None:
                for frame in batch:
                    self.requests.route(frame)
        except ProtocolError:
            pass
        finally:
            self.requests.close(SandboxDiedError(f"sandbox {self.sandbox_id} died", sandbox_id=self.sandbox_id))

    def stop(self, *, graceful_shutdown_seconds: float) -> None:
        self.stops += 1
        self.nursery.start_soon(self.runtime.stop, self.record, graceful_shutdown_seconds)


@contextlib.asynccontextmanager
async def fake_pools(**fake):
    """``Pools`` (a session's registry, here without a session) over a fresh FakeRuntime; yields
    (pools, runtime, started) where ``started`` lists the RuntimeSandbox of each start."""
    RAN.clear()
    runtime = FakeRuntime(**fake)
    started: list[RuntimeSandbox] = []
    async with trio.open_nursery() as nursery:
        await runtime.open(nursery)
        host = TaskHost(nursery, trio.lowlevel.current_trio_token())

        async def factory(spec):
            record = runtime.create(spec)
            await runtime.start(record)
            sandbox = RuntimeSandbox(runtime, record, nursery)
            nursery.start_soon(sandbox.read)
            started.append(sandbox)
            return sandbox

        pools = Pools(SandboxDefaults(), lambda: host, factory, lambda: False)
        try:
            yield pools, runtime, started
        finally:
            for pool in pools.pools.values():
                pool.close()
            with trio.CancelScope(shield=True):
                await runtime.aclose()
            nursery.cancel_scope.cancel()


def pool_of(pools: Pools) -> Pool:
    (pool,) = pools.pools.values()
    return pool


def run(test):
    """Run ``test()`` on trio's virtual clock, which jumps whenever every task waits; a test that
    would wait forever fails at the virtual deadline instead (in milliseconds of real time)."""
    async def bounded():
        with trio.fail_after(24 * 3600):
            await test()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_pool_is_built_without_a_session_and_shows_its_state():
    """A Pool is made from a task starter and a sandbox factory alone; its repr and statistics
    follow its calls."""
    async def test():
        async with fake_pools() as (pools, runtime, started):
            f = RemoteFunction(note, pools, max_concurrency=1)
            pool = pools.pool_for(resolve_spec(SandboxDefaults()), 1, True)
            assert "sandboxes=0 idle/0 busy/0 starting" in repr(pool)
            assert await f.remote(7) == 7
            assert pool_of(pools) is pool
            assert "1 idle" in repr(pool) and "1 done" in repr(pool)
            assert pool.statistics().calls_done == 1
    run(test)


def test_calls_run_in_the_order_they_were_submitted():
    """On one sandbox, queued and pipelined calls reach the worker first in, first out."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=1)) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            refs = f.map([(i,) for i in range(12)])
            assert [await r for r in refs] == list(range(12))
            assert [x for x, _ in RAN] == list(range(12))
            assert len(runtime.sandboxes) == 1
    run(test)


def test_the_pool_never_runs_more_sandboxes_than_its_limit():
    """Twelve 10 s calls with max_concurrency=3 start exactly three sandboxes and take 40 s, the
    twelve calls spread evenly (four each, one after the other)."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=10)) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=3)
            start = trio.current_time()
            refs = f.map([(i,) for i in range(12)])
            peak = 0
            while not all(r.done() for r in refs):
                peak = max(peak, pool_of(pools).statistics().sandboxes_busy)
                await trio.sleep(1)
            assert [r.result() for r in refs] == list(range(12))
            assert trio.current_time() - start == pytest.approx(40, abs=1)
            assert len(runtime.sandboxes) == 3 and peak == 3
            assert sorted(len(box.calls) for box in runtime.sandboxes) == [4, 4, 4]
    run(test)


def test_a_call_whose_sandbox_dies_is_retried_on_a_fresh_one():
    """The sandbox dies under a call: with retries=1 it runs again on a new sandbox (charged as a
    retry), the dead one is stopped and never reused; without retries it fails SandboxDiedError."""
    deaths = []

    def hook(name, args, kwargs):
        if args == (1,) and not deaths:
            deaths.append(trio.current_time())
            return FakeCall(delay=2, kill_sandbox=True)
        return None

    async def test():
        async with fake_pools(calls=hook) as (pools, runtime, started):
            f = RemoteFunction(note, pools, max_concurrency=1, retries=1)
            assert await f.remote(1) == 1
            assert len(runtime.sandboxes) == 2 and not runtime.sandboxes[0].alive
            assert started[0].stops == 1  # the pool stops a dead sandbox
            assert [x for x, _ in RAN] == [1]
            stats = pool_of(pools).statistics()
            assert stats.calls_retried == 1 and stats.calls_done == 1
        deaths.clear()
        async with fake_pools(calls=hook) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            with pytest.raises(SandboxDiedError, match="pass retries=N"):
                await f.remote(1)
            assert pool_of(pools).statistics().calls_failed == 1
    run(test)


def test_a_sandbox_killed_mid_call_charges_only_the_running_call():
    """Killed while it runs one call with another queued behind it: the running one is retried
    (one retry charged), the one behind is resubmitted free; both finish on a fresh sandbox."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=5)) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1, retries=1)
            first, second = f.map([(1,), (2,)])
            await trio.sleep(2)
            assert pool_of(pools).statistics().calls_running == 2  # pipelined on one sandbox
            runtime.sandboxes[0].kill()
            assert [await first, await second] == [1, 2]
            assert pool_of(pools).statistics().calls_retried == 1
            assert len(runtime.sandboxes) == 2 and runtime.sandboxes[1].calls == ["note", "note"]
    run(test)


def test_a_worker_that_dies_mid_call_is_retried_in_the_same_sandbox():
    """Only the worker dies (not the sandbox): the call is an infrastructure failure, retried,
    and the sandbox keeps serving."""
    kills = []

    def hook(name, args, kwargs):
        if not kills:
            kills.append(args)
            return FakeCall(kill_worker=True)
        return None

    async def test():
        async with fake_pools(calls=hook) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1, retries=1)
            assert await f.remote(3) == 3
            assert kills == [(3,)] and len(runtime.sandboxes) == 1 and runtime.sandboxes[0].alive
            assert pool_of(pools).statistics().calls_retried == 1
    run(test)


def test_calls_stuck_behind_a_long_one_are_stolen_by_an_idle_sandbox():
    """A 600 s call with thirty short ones pipelined behind it on two sandboxes: the short ones
    waiting behind the long one are taken back as soon as it has not answered for
    STEAL_AFTER_SECONDS (trio time), and all of them are done within a second, long before it."""
    def hook(name, args, kwargs):
        return FakeCall(delay=600 if args == (-1,) else 0.001)

    async def test():
        async with fake_pools(calls=hook) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=2)
            warm = f.map([(0,), (0,)])  # two warm sandboxes, their function's duration known
            assert [await r for r in warm] == [0, 0]
            start = trio.current_time()
            long, *short = f.map([(-1,)] + [(i,) for i in range(1, 31)])
            for ref in short:
                await ref
            assert trio.current_time() - start < 1.0
            assert not long.done()
            assert pool_of(pools).statistics().calls_retried == 0  # taking calls back costs no retry
            long.cancel()
    run(test)


def test_stealing_waits_for_the_stall_on_the_virtual_clock():
    """No call is taken back before the busy sandbox has been silent for STEAL_AFTER_SECONDS: of
    three calls on two sandboxes, the second runs at once on the idle one, the third (pipelined
    behind the long first) runs there at that (virtual) moment, within one steal period more."""
    def hook(name, args, kwargs):
        return FakeCall(delay=100 if args == (-1,) else 0)

    async def test():
        async with fake_pools(calls=hook) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=2)
            assert [await r for r in f.map([(0,), (0,)])] == [0, 0]
            RAN.clear()
            start = trio.current_time()
            long, other, behind = f.map([(-1,), (1,), (2,)])
            assert await other == 1 and await behind == 2
            ran_at = {x: at - start for x, at in RAN}
            assert ran_at[1] == 0
            assert STEAL_AFTER_SECONDS <= ran_at[2] <= 2 * STEAL_AFTER_SECONDS, ran_at
            assert not long.done()
            long.cancel()
    run(test)


def test_cancelling_a_running_call_interrupts_it_and_frees_its_sandbox():
    """ref.cancel() on a running 100 s call: its ref is cancelled at once, the sandbox interrupts
    it (the next call runs at once, not after 100 s), and the sandbox is reused."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=100 if args == (1,) else 0)) as (
                pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            long = f.remote(1)
            await trio.sleep(5)
            start = trio.current_time()
            assert long.cancel() is True
            with pytest.raises(OperationCancelled):
                await long
            assert await f.remote(2) == 2
            assert trio.current_time() - start < 1
            assert [x for x, _ in RAN] == [2] and len(runtime.sandboxes) == 1
            assert pool_of(pools).statistics().calls_cancelled == 1
    run(test)


def test_cancelling_a_queued_call_never_runs_it():
    """A call cancelled while it waits for a sandbox is dropped: it never reaches one."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=10)) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            refs = f.map([(i,) for i in range(4)])
            await trio.sleep(1)
            assert refs[3].cancel() is True
            assert [await r for r in refs[:3]] == [0, 1, 2]
            assert [x for x, _ in RAN] == [0, 1, 2]
            assert sum(box.calls.count("note") for box in runtime.sandboxes) == 3
    run(test)


def test_a_sandbox_that_cannot_start_fails_the_calls_waiting_for_it():
    """The only sandbox the pool could start fails to start: the calls waiting fail with its error,
    and a later call starts a new sandbox, which works."""
    async def test():
        async with fake_pools(fail_starts=1) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            with pytest.raises(SandboxFailedError, match="scripted start failure"):
                await f.remote(1)
            assert await f.remote(2) == 2
            assert len(runtime.sandboxes) == 2
    run(test)


def test_closing_the_pool_cancels_every_call():
    """Pool.close() (the session closing) cancels queued and running calls alike."""
    async def test():
        async with fake_pools(calls=lambda name, args, kwargs: FakeCall(delay=3600)) as (pools, runtime, _):
            f = RemoteFunction(note, pools, max_concurrency=1)
            refs = f.map([(i,) for i in range(5)])
            await trio.sleep(1)
            pool_of(pools).close()
            for ref in refs:
                with pytest.raises(OperationCancelled):
                    await ref
            assert RAN == []
    run(test)
