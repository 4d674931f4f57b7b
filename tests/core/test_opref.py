"""Contract tests for OperationRef, TaskHost and the many-ref helpers, with real threads and trio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

import pytest
import trio
import trio.testing

from sandpool._errors import SandpoolError
from sandpool._core.opref import OperationCancelled, OperationRef, TaskHost
from sandpool._core.waiting import as_completed, gather, results, wait
from sandpool._core.portal import Portal


@pytest.fixture
def portal():
    with Portal("test-opref-portal") as portal:
        yield portal


async def echo(value):
    await trio.lowlevel.checkpoint()
    return value


async def raise_(exc):
    await trio.lowlevel.checkpoint()
    raise exc


async def sleep_until_cancelled(started: threading.Event, saw_cancel: threading.Event):
    started.set()
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        saw_cancel.set()
        raise


def gates(portal, count):
    """Trio events in the portal's loop, and a function that opens one from any thread."""
    events = [trio.Event() for _ in range(count)]

    def open_gate(i):
        trio.from_thread.run_sync(events[i].set, trio_token=portal.host.token)

    return events, open_gate


async def after(event, value):
    await event.wait()
    return value


def test_result_returns_value_in_a_plain_thread(portal):
    """result() called in a thread that is not running trio returns the operation's value."""
    ref = portal.spawn(echo, 42)
    got = []
    thread = threading.Thread(target=lambda: got.append(ref.result(timeout=5)))
    thread.start()
    thread.join(5)
    assert got == [42]
    assert ref.done()


def test_result_reraises_the_operations_own_exception_object(portal):
    """result() raises the very exception object the operation raised, every time."""
    error = KeyError("missing")
    ref = portal.spawn(raise_, error)
    for _ in range(2):
        with pytest.raises(KeyError) as info:
            ref.result(timeout=5)
        assert info.value is error
    assert ref.exception() is error


def test_result_timeout_raises_timeouterror_and_the_operation_keeps_running(portal):
    """A result() timeout raises builtin TimeoutError, and the operation runs on to completion."""
    (gate,), open_gate = gates(portal, 1)
    ref = portal.spawn(after, gate, "late")
    with pytest.raises(TimeoutError, match="did not finish within 0.05 s"):
        ref.result(timeout=0.05)
    assert not ref.done()
    open_gate(0)
    assert ref.result(timeout=5) == "late"


def test_cancel_stops_a_sleeping_operation(portal):
    """cancel() delivers trio.Cancelled to a running operation, and result() raises OperationCancelled."""
    started, saw_cancel = threading.Event(), threading.Event()
    ref = portal.spawn(sleep_until_cancelled, started, saw_cancel)
    assert started.wait(5)
    assert ref.cancel() is True
    with pytest.raises(OperationCancelled) as info:
        ref.result(timeout=5)
    assert isinstance(info.value, concurrent.futures.CancelledError)
    assert isinstance(info.value, SandpoolError)
    assert saw_cancel.is_set()
    assert repr(ref) == "<OperationRef cancelled>"


def test_cancel_of_a_done_operation_returns_false(portal):
    """cancel() of a finished operation returns False and leaves its value alone."""
    ref = portal.spawn(echo, 1)
    assert ref.result(timeout=5) == 1
    assert ref.cancel() is False
    assert ref.result() == 1


def test_cancel_before_launch_means_the_body_never_runs(portal):
    """A ref cancelled before its launch is done at once, and its body is never run."""
    ran = threading.Event()

    async def body():
        ran.set()

    ref = OperationRef()
    assert ref.cancel() is True
    assert ref.done()
    assert ref._launch(portal.host, body) is ref
    with pytest.raises(OperationCancelled):
        ref.result(timeout=1)
    portal.run(trio.testing.wait_all_tasks_blocked)  # the loop did all it had to: no body ran
    assert not ran.is_set()


def test_result_inside_trio_raises_runtimeerror_naming_await(portal):
    """result() of an unfinished op inside trio raises RuntimeError saying to use 'await ref';
    a finished op's result() answers at once, anywhere."""
    ref = portal.spawn(trio.sleep_forever)  # unfinished however slowly main() comes

    async def main():
        with pytest.raises(RuntimeError, match="await ref"):
            ref.result()
        assert OperationRef.completed(1).result() == 1

    trio.run(main)
    assert ref.cancel() is True
    with pytest.raises(OperationCancelled):
        ref.result(timeout=5)


def test_blocking_helpers_inside_trio_raise_runtimeerror_naming_the_fix():
    """results(), wait() and as_completed() inside trio raise RuntimeError naming the async fix."""

    async def main():
        refs = [OperationRef.completed(1)]
        for helper in (results, wait, as_completed):
            with pytest.raises(RuntimeError, match="inside trio use"):
                helper(refs)

    trio.run(main)


def test_await_in_the_same_loop():
    """await ref returns the value (or raises the exception) of an operation in the caller's own loop."""

    async def main():
        async with trio.open_nursery() as nursery:
            host = TaskHost(nursery, trio.lowlevel.current_trio_token())
            assert host.in_loop_thread()
            assert await OperationRef.spawn(host, echo, "same") == "same"
            with pytest.raises(KeyError):
                await OperationRef.spawn(host, raise_, KeyError("k"))
            assert await OperationRef.completed(3) == 3

    trio.run(main)


def test_await_from_another_trio_loop(portal):
    """await ref works in a trio loop other than the one running the operation."""
    (gate,), open_gate = gates(portal, 1)
    ref = portal.spawn(after, gate, "cross")

    async def main():
        assert not portal.host.in_loop_thread()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, open_gate, 0)
            return await ref

    assert trio.run(main) == "cross"


def test_cancelling_the_awaiter_in_another_loop_cancels_the_operation(portal):
    """When a task awaiting a ref from another loop is cancelled, the operation sees trio.Cancelled."""
    started, saw_cancel = threading.Event(), threading.Event()
    ref = portal.spawn(sleep_until_cancelled, started, saw_cancel)
    assert started.wait(5)

    async def main():
        with trio.move_on_after(0.05) as scope:
            await ref
        assert scope.cancelled_caught
        with pytest.raises(OperationCancelled):
            await ref

    trio.run(main)
    assert saw_cancel.is_set()


def test_cancelling_the_awaiter_in_the_same_loop_cancels_the_operation():
    """When a task awaiting a ref of its own loop is cancelled, the operation sees trio.Cancelled."""
    started, saw_cancel = threading.Event(), threading.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            host = TaskHost(nursery, trio.lowlevel.current_trio_token())
            ref = OperationRef.spawn(host, sleep_until_cancelled, started, saw_cancel)
            await trio.to_thread.run_sync(started.wait)
            with trio.move_on_after(0.05):
                await ref
            with pytest.raises(OperationCancelled):
                await ref

    trio.run(main)
    assert saw_cancel.is_set()


def test_await_from_asyncio(portal):
    """await ref works in an asyncio task, and cancelling that task cancels the operation."""
    started, saw_cancel = threading.Event(), threading.Event()
    sleeper = portal.spawn(sleep_until_cancelled, started, saw_cancel)
    assert started.wait(5)

    async def main():
        assert await portal.spawn(echo, "from asyncio") == "from asyncio"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sleeper, 0.05)

    asyncio.run(main())
    with pytest.raises(OperationCancelled):
        sleeper.result(timeout=5)
    assert saw_cancel.is_set()


def test_done_callbacks_run_once_in_order_in_the_loop_thread(portal):
    """Done callbacks run exactly once, in the order added, in the loop's thread; late ones at once here."""
    (gate,), open_gate = gates(portal, 1)
    ref = portal.spawn(after, gate, 1)
    calls = []
    for name in ("a", "b", "c"):
        ref.add_done_callback(lambda r, name=name: calls.append((name, r, threading.current_thread().name)))
    open_gate(0)
    ref.result(timeout=5)
    assert calls == [(name, ref, portal.name) for name in ("a", "b", "c")]
    ref.add_done_callback(lambda r: calls.append(("late", r, threading.current_thread().name)))
    assert calls[3:] == [("late", ref, threading.current_thread().name)]
    portal.run(trio.testing.wait_all_tasks_blocked)  # nothing more is scheduled to call one again
    assert len(calls) == 4


def test_done_callback_exceptions_are_logged_not_raised(portal, caplog):
    """An exception from a done callback is logged, and later callbacks still run."""
    ref = portal.spawn(echo, 1)
    ref.result(timeout=5)
    seen = []
    with caplog.at_level(logging.ERROR, logger="sandpool._core.opref"):
        ref.add_done_callback(lambda r: 1 / 0)
        ref.add_done_callback(seen.append)
    assert seen == [ref]
    assert "ZeroDivisionError" in caplog.text


def test_results_of_one_ref_and_of_a_sequence(portal):
    """results() gives one ref's value, or a list of values in the given order."""
    assert results(portal.spawn(echo, "one")) == "one"
    assert results([portal.spawn(echo, i) for i in range(5)]) == [0, 1, 2, 3, 4]


def test_results_raises_the_first_exception_in_order(portal):
    """results() of a sequence raises the first exception in list order."""
    first, second = KeyError("first"), ValueError("second")
    refs = [portal.spawn(echo, 0), portal.spawn(raise_, first), portal.spawn(raise_, second)]
    with pytest.raises(KeyError) as info:
        results(refs)
    assert info.value is first


def test_wait_rejects_num_returns_below_one():
    """wait() with num_returns < 1 raises ValueError naming `num_returns`."""
    with pytest.raises(ValueError, match="`num_returns` must be at least 1.*got 0"):
        wait([OperationRef.completed(1)], num_returns=0)


def test_wait_returns_the_original_done_and_pending_refs(portal):
    """wait() returns (done, pending) as the original objects, done trimmed to num_returns."""
    events, open_gate = gates(portal, 3)
    refs = [portal.spawn(after, event, i) for i, event in enumerate(events)]
    open_gate(2)
    done, pending = wait(refs, num_returns=1, timeout=5)
    assert done == [refs[2]] and done[0] is refs[2]
    assert pending == [refs[0], refs[1]]
    open_gate(0)
    open_gate(1)
    done, pending = wait(refs, timeout=5)
    assert done == refs and pending == []
    done, pending = wait(refs, num_returns=2)
    assert done == refs[:2] and pending == refs[2:]


def test_wait_timeout_returns_what_is_done(portal):
    """wait() that times out returns the refs done by then, not an error."""
    (gate,), open_gate = gates(portal, 1)
    slow, fast = portal.spawn(after, gate, "slow"), portal.spawn(echo, "fast")
    fast.result(timeout=5)
    done, pending = wait([slow, fast], timeout=0.05)
    assert done == [fast] and pending == [slow]
    open_gate(0)
    slow.result(timeout=5)


def test_as_completed_yields_refs_in_completion_order(portal):
    """as_completed() yields the original refs as they finish (those already done in the given order)."""
    events, open_gate = gates(portal, 3)
    refs = [portal.spawn(after, event, i) for i, event in enumerate(events)]
    stream = as_completed(refs)
    for i in (2, 0, 1):
        open_gate(i)
        assert next(stream) is refs[i]
    with pytest.raises(StopIteration):
        next(stream)
    assert list(as_completed(refs)) == refs


def test_as_completed_raises_timeouterror_once_its_timeout_passes(portal):
    """as_completed() raises TimeoutError, counting the unfinished refs, once its timeout (from the call) passes."""
    (gate,), open_gate = gates(portal, 1)
    refs = [OperationRef.completed(0), portal.spawn(after, gate, 1)]
    stream = as_completed(refs, timeout=0.05)
    assert next(stream) is refs[0]
    with pytest.raises(TimeoutError, match="1 of 2 operations did not finish within 0.05 s"):
        next(stream)
    open_gate(0)
    refs[1].result(timeout=5)


def test_gather_awaits_in_order_and_cancels_all_when_cancelled(portal):
    """gather() returns values in order; cancelling the awaiter cancels every pending ref."""
    started, saw_cancel = threading.Event(), threading.Event()

    async def main():
        assert await gather([portal.spawn(echo, i) for i in range(3)]) == [0, 1, 2]
        first = portal.spawn(echo, "first")
        sleeper = portal.spawn(sleep_until_cancelled, started, saw_cancel)
        await trio.to_thread.run_sync(started.wait)
        with trio.move_on_after(0.05):
            await gather([first, sleeper])
        with pytest.raises(OperationCancelled):
            await sleeper

    trio.run(main)
    assert saw_cancel.is_set()


def test_repr_tells_the_state(portal):
    """repr shows pending, done with the value, failed with the exception type, or cancelled."""
    (gate,), open_gate = gates(portal, 1)
    pending = portal.spawn(after, gate, None)
    assert repr(pending) == "<OperationRef pending>"
    open_gate(0)
    pending.result(timeout=5)
    assert repr(OperationRef.completed(7)) == "<OperationRef done value=7>"
    assert repr(OperationRef.failed(KeyError("k"))) == "<OperationRef failed KeyError>"


def test_host_call_soon_runs_in_the_loop_thread(portal):
    """TaskHost.call_soon() runs a sync function in the loop's thread, from any thread."""
    ran_in = []
    done = threading.Event()
    portal.host.call_soon(lambda: (ran_in.append(threading.current_thread().name), done.set()))
    assert done.wait(5)
    assert ran_in == [portal.name]


def test_spawn_into_a_finished_loop_raises_runtimeerror():
    """Spawning into (or calling soon in) a host whose trio loop has finished raises RuntimeError saying it is closed."""

    async def main():
        async with trio.open_nursery() as nursery:
            return TaskHost(nursery, trio.lowlevel.current_trio_token())

    host = trio.run(main)
    with pytest.raises(RuntimeError, match="closed"):
        OperationRef.spawn(host, echo, 1)
    with pytest.raises(RuntimeError, match="closed"):
        host.call_soon(print)


def test_spawn_from_a_thread_into_a_closed_nursery_fails_the_ref():
    """A spawn from another thread that reaches a closed nursery fails its ref instead of hanging."""

    async def main():
        async with trio.open_nursery() as nursery:
            host = TaskHost(nursery, trio.lowlevel.current_trio_token())
        ref = await trio.to_thread.run_sync(OperationRef.spawn, host, echo, 1)
        with pytest.raises(RuntimeError, match="closed"):
            await ref

    trio.run(main)



def test_current_host_tells_sync_trio_and_asyncio_apart():
    """One place decides who calls: a trio task, an asyncio coroutine, or sync code (a worker
    thread of either loop is sync too)."""
    from sandpool._core.hosts import current_host

    async def in_trio():
        return current_host(), await trio.to_thread.run_sync(current_host)

    async def in_asyncio():
        return current_host(), await asyncio.to_thread(current_host)

    assert current_host() == "sync"
    assert trio.run(in_trio) == ("trio", "sync")
    assert asyncio.run(in_asyncio()) == ("asyncio", "sync")


def test_settle_under_asyncio_holds_the_cancellation_until_the_ref_ends(portal):
    """settle(ref) (what the exits of async with use) never cancels ref; a cancellation of the
    waiting asyncio task is raised once ref has ended."""
    from sandpool._core.hosts import settle

    release = threading.Event()
    ref = portal.spawn(trio.to_thread.run_sync, release.wait)

    async def main():
        task = asyncio.create_task(settle(ref))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done() and not ref.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ref.result()

    assert asyncio.run(main()) is True


def test_asyncio_awaiter_gets_the_operations_own_exception(portal):
    """A failure in the trio loop is raised in the awaiting asyncio task as the very object."""
    error = KeyError("trio side")

    async def main():
        with pytest.raises(KeyError) as caught:
            await portal.spawn(raise_, error)
        return caught.value

    assert asyncio.run(main()) is error
