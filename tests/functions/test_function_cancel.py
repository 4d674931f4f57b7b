"""Remote functions, cancellation: it reaches the running call in the sandbox, however it comes.

Each test calls ``write_later(path, secs)``, which sleeps and then writes a marker file, and checks
afterwards (with a second function in the same sandbox, or on the host for isolation="process")
that the marker was never written. No clock decides: the sleep is far longer than any cancel takes,
and the check runs in the same sandbox's one worker, which takes one call at a time, so it runs only
once the cancelled call has left it (had the cancel failed, the check would wait for the marker).
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest
import trio
from service_helpers import wait_until

from sandpool import OperationCancelled, SandboxTimeoutError, Session, testing

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLEEP = 600.0  # how long write_later sleeps before writing its marker: no cancel takes this long


def write_later(path, secs):
    with open(f"{path}.started", "w"):
        pass
    time.sleep(secs)
    with open(path, "w") as f:
        f.write("written")
    return "wrote"


def exists(path):
    return os.path.exists(path)


def where():
    return os.environ["SANDPOOL_SANDBOX_ID"]


def stubborn_write_later(path, secs):
    with open(f"{path}.started", "w"):
        pass
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            time.sleep(0.02)
        except KeyboardInterrupt:
            pass  # swallows the interruption: the agent kills the worker after a grace second
    with open(path, "w") as f:
        f.write("written")


def one_sandbox(session, *fns, **options):
    """The functions as RemoteFunctions sharing one sandbox (one pool of max_concurrency=1)."""
    return [session.function(fn, max_concurrency=1, **options) for fn in fns]


def test_cancelled_in_flight_call_never_writes_its_marker():
    """ref.cancel() on a running call interrupts it in the sandbox: the marker never appears,
    while an uncancelled call's marker does (so the check can see markers)."""
    with Session() as s:
        write, check, sandbox = one_sandbox(s, write_later, exists, where)
        assert write.remote("/tmp/control", 0).result() == "wrote" and check("/tmp/control")
        first = sandbox.remote().result()
        ref = write.remote("/tmp/marker", SLEEP)
        assert wait_until(lambda: s.statistics().calls_running == 1 and s.statistics().sandboxes_busy == 1)
        assert ref.cancel()
        with pytest.raises(OperationCancelled):
            ref.result()
        assert check("/tmp/marker") is False
        assert sandbox.remote().result() == first  # the check looked in the sandbox the call ran in
        assert wait_until(lambda: s.statistics().calls_cancelled == 1), s.statistics()



def test_a_cancel_reaches_a_call_while_a_large_call_behind_it_waits_to_be_sent():
    """A call queued behind a running one whose frame the worker's connection cannot take (its
    worker reads no calls while one runs) does not hold up the cancel of the running call: the
    cancel goes to the agent at once, the worker is interrupted, then reads and runs the next call
    (the cancel once waited for that frame to be written, so for the running call to end)."""
    with Session() as s:
        write, size = one_sandbox(s, write_later, len)
        first = write.remote("/tmp/first", SLEEP)
        assert wait_until(lambda: s.statistics().calls_running == 1)
        behind = size.remote(b"x" * 400_000)  # inline (below the file threshold), above the socket's buffer
        assert wait_until(lambda: s.statistics().calls_running == 2)
        assert first.cancel()
        assert behind.result(timeout=30) == 400_000
        with pytest.raises(OperationCancelled):
            first.result()

def test_leaving_a_trio_cancel_scope_interrupts_the_remote_call():
    """A move_on_after around 'await f.remote(...)' interrupts the call in the sandbox."""
    async def main():
        async with Session() as s:
            write, check = one_sandbox(s, write_later, exists)
            await write.remote("/tmp/warm", 0)
            with trio.move_on_after(0.2) as scope:
                await write.remote("/tmp/marker", SLEEP)
            assert scope.cancelled_caught
            assert await check.remote("/tmp/marker.started") is True  # it did run, in this sandbox
            assert await check.remote("/tmp/marker") is False
    trio.run(main)


def test_leaving_a_cancel_scope_during_async_for_cancels_the_stream():
    """A move_on_after around 'async for' over starmap interrupts every call still in flight."""
    async def main():
        async with Session() as s:
            write, check = one_sandbox(s, write_later, exists)
            await write.remote("/tmp/warm", 0)
            got = []
            with trio.move_on_after(0.3):
                async for value in write.starmap([(f"/tmp/m{i}", 0 if i == 0 else SLEEP) for i in range(4)]):
                    got.append(value)
            assert got in ([], ["wrote"])  # the quick first call, unless the machine is very busy
            assert [await check.remote(f"/tmp/m{i}") for i in range(1, 4)] == [False, False, False]
    trio.run(main)


def test_timeout_seconds_interrupts_before_the_marker():
    """A call past timeout_seconds is interrupted in the sandbox; its marker never appears."""
    with Session() as s:
        (check,) = one_sandbox(s, exists)
        (write,) = one_sandbox(s, write_later, timeout_seconds=0.2)
        with pytest.raises(SandboxTimeoutError, match="did not finish within 0.2 s"):
            write.remote("/tmp/marker", SLEEP).result()
        assert check.remote("/tmp/marker.started").result() is True  # the same sandbox, where it ran
        assert check.remote("/tmp/marker").result() is False


def test_a_call_that_swallows_the_interrupt_is_killed_and_the_queue_survives(tmp_path):
    """A cancelled call that ignores KeyboardInterrupt dies with its worker a grace second later;
    the call queued behind it is resubmitted and runs (isolation='process': the host sees the
    call start, so the cancel surely meets it running)."""
    marker = str(tmp_path / "marker")
    with Session() as s:
        stubborn, write, check = one_sandbox(s, stubborn_write_later, write_later, exists, isolation="process")
        assert check.remote("/").result()
        ref = stubborn.remote(marker, SLEEP)
        queued = write.remote(str(tmp_path / "after"), 0)
        assert wait_until(lambda: os.path.exists(f"{marker}.started"))
        assert ref.cancel()
        assert queued.result(timeout=30) == "wrote"  # its worker was killed: nothing of it runs now
        assert check.remote(marker).result() is False and not os.path.exists(marker)


def test_leaving_the_session_stops_every_call(tmp_path, state_dir):
    """Leaving the session block cancels the calls still running; nothing of them runs afterwards
    (the marker, written on the host with isolation='process', never appears)."""
    marker = tmp_path / "marker"
    with Session() as s:
        (write,) = one_sandbox(s, write_later, isolation="process")
        ref = write.remote(str(marker), SLEEP)
        assert wait_until(lambda: os.path.exists(f"{marker}.started"))
        queued = [write.remote(str(marker), 0) for _ in range(3)]
    with pytest.raises(OperationCancelled):
        ref.result()
    assert all(r.done() for r in queued)
    assert testing.wait_for_no_leftovers(state_dir, timeout=10).processes == []  # nothing left to write it
    assert not marker.exists()


def test_first_error_of_imap_cancels_the_calls_in_flight():
    """The first failure raised by imap cancels the other calls: their markers never appear."""
    with Session() as s:
        @s.function(max_concurrency=1)
        def fail_or_write(i):
            if i < 0:  # the check, in the same sandbox
                return [os.path.exists(f"/tmp/marker{j}") for j in range(1, 6)]
            if i == 0:
                raise ValueError("first")
            return write_later(f"/tmp/marker{i}", SLEEP)

        with pytest.raises(ValueError, match="first"):
            for _ in fail_or_write.imap(range(6)):
                pass
        # counted in the session's loop thread, soon after the cancel
        assert wait_until(lambda: s.statistics().calls_cancelled == 5 and s.statistics().calls_running == 0)
        assert s.statistics().calls_failed == 1
        assert fail_or_write.remote(-1).result() == [False] * 5


def test_return_exceptions_yields_errors_and_goes_on():
    """With return_exceptions=True every item gives a value or its exception, in order."""
    with Session() as s:
        @s.function
        def inverse(x):
            return 1 / x

        out = list(inverse.imap([1, 0, 2], return_exceptions=True))
        assert out[0] == 1.0 and isinstance(out[1], ZeroDivisionError) and out[2] == 0.5


def test_a_first_call_cancelled_before_it_started_leaves_its_function_with_the_worker():
    """A function's first call carries its pickle; cancelled while it waits in the worker behind a
    running call, it never runs, yet the worker keeps the function: the next call of it, sent
    without the pickle, runs (the worker once dropped the pickle with the call, and that call
    failed with SerializationError naming an unknown fn_key)."""
    with Session() as s:
        write, check = one_sandbox(s, write_later, exists)
        running = write.remote("/tmp/running", SLEEP)
        first = check.remote("/tmp/running")  # check's first call: its frame carries the pickle
        assert wait_until(lambda: [c.sent for pool in s._pools.values() for slot in pool.slots
                                   for c in slot.inflight.values()] == [True, True]), s.statistics()
        assert first.cancel()
        with pytest.raises(OperationCancelled):
            first.result()
        assert running.cancel()
        assert check.remote("/tmp/running").result(timeout=30) is False
        assert s.statistics().sandboxes_idle == 1  # the same sandbox served it


def test_cancelled_queued_calls_never_run():
    """Calls cancelled while still queued (behind a busy sandbox) never start."""
    with Session() as s:
        write, check = one_sandbox(s, write_later, exists)
        first = write.remote("/tmp/first", 0.3)
        queued = [write.remote(f"/tmp/q{i}", 0) for i in range(5)]
        for ref in queued:
            ref.cancel()
        assert first.result() == "wrote"
        assert [check.remote(f"/tmp/q{i}").result() for i in range(5)] == [False] * 5


def test_worker_survives_a_steal_that_takes_every_pending_call():
    """A steal (cancel with ``steal``) noticed between calls that gives back every call the worker
    still held leaves it with nothing to run: it answers them "lost" and keeps serving (it once
    died popping an empty queue, failing the pool's next call with SandboxDiedError)."""
    def prepare(worker):
        worker.pending.append({"t": "call", "id": 7, "fn": b"", "args": b""})
        worker.steals.add(7)
        worker.signalled = True  # as the agent's SIGINT after the steal frame leaves it

    answers = _answers_of_worker(prepare)
    assert [(a["t"], a["id"], a["kind"]) for a in answers] == [("error", 7, "lost")]


def _answers_of_worker(prepare):
    """Run a call worker in this thread over a socket pair after ``prepare(worker)``, with no more
    frames to read (it returns at EOF); the frames it answered. Signal handlers are put back."""
    import signal
    import socket

    from _sandpool_agent import wire as _wire
    from _sandpool_agent.worker import Worker

    ours, theirs = socket.socketpair()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGALRM)}
    try:
        worker = Worker(theirs, cloudpickle, "/")
        prepare(worker)
        ours.shutdown(socket.SHUT_WR)  # then no more frames: the worker returns at EOF
        worker.run()
        return _wire.FrameBuffer().feed(ours.recv(1 << 16))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ours.close()
        theirs.close()




def wait_readable(fd, secs):
    import select

    return bool(select.select([fd], [], [], secs)[0])


def send_then_interrupt_self(client_fd, calls, agent_fd, steals, given_back_fd, secs):
    import signal

    os.write(client_fd, calls)
    os.write(agent_fd, steals)
    signal.raise_signal(signal.SIGINT)  # as the agent does after its steal frames
    return wait_readable(given_back_fd, secs)


def _call(call_id, fn, *args):
    from _sandpool_agent import wire as _wire

    return _wire.encode({"t": "call", "id": call_id, "fn_key": fn.__name__.encode(),
                         "fn": cloudpickle.dumps(fn), "args": cloudpickle.dumps((args, {}))})


def _steals(*call_ids):
    from _sandpool_agent import wire as _wire

    return b"".join(_wire.encode({"t": "cancel", "id": i, "call": True, "steal": True}) for i in call_ids)


def _serve_direct(prepare, count, given_back):
    """Run a direct-mode call worker in this thread after ``prepare(worker, client, agent)`` (the
    test's ends of its two sockets) until ``count`` answers came; a thread reads them and writes to
    the pipe ``given_back`` once every call answered "lost" so far is all it will get back. Returns
    (type, id, kind, data) of each answer, in order."""
    import signal
    import socket
    import threading

    from _sandpool_agent import wire as _wire
    from _sandpool_agent.worker import Worker

    client, client_theirs = socket.socketpair()
    agent, agent_theirs = socket.socketpair()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGALRM)}
    answers: list[dict] = []

    def read_answers(buf=_wire.FrameBuffer()):
        while len(answers) < count and (data := client.recv(1 << 16)):
            answers.extend(buf.feed(data))
            if sum(a.get("kind") == "lost" for a in answers) == count - 1:
                os.write(given_back, b"x")
        client.shutdown(socket.SHUT_WR)  # the worker returns at this EOF

    reader = threading.Thread(target=read_answers)
    try:
        worker = Worker(agent_theirs, cloudpickle, "/", client_theirs)
        prepare(worker, client, agent)
        reader.start()
        worker.run()
        reader.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sock in (client, client_theirs, agent, agent_theirs):
            sock.close()
    return [(a["t"], a["id"], a.get("kind"), a.get("data")) for a in answers]


def test_a_direct_worker_gives_back_a_call_whose_steal_came_before_the_call_was_read():
    """Direct mode: a steal comes on the agent's socket, its call on the client's; a worker slow to
    wake reads the steal first (it once forgot it then: calls marked for stealing, never given
    back, waited out the long call ahead of them). Call 1 waits (up to 30 s) until call 2 is given
    back: it returns True only if that happened while it ran."""
    from _sandpool_agent import plain as _plain

    given_back_r, given_back_w = os.pipe()

    def prepare(worker, client, agent):
        agent.sendall(_steals(2))
        client.sendall(_call(1, wait_readable, given_back_r, 30.0) + _call(2, wait_readable, given_back_r, 0))
        worker.signalled = True  # as the agent's SIGINT after the steal frame leaves it

    try:
        answers = _serve_direct(prepare, 2, given_back_w)
    finally:
        os.close(given_back_r)
        os.close(given_back_w)
    assert answers == [("error", 2, "lost", None), ("result", 1, None, _plain.encode(True))]


def test_a_sigint_during_the_steal_handler_loses_no_steal():
    """A second SIGINT (one comes per stolen call) arriving while the handler of the first has read
    the new calls but not yet decoded them is served after it, not inside it (run inside, it once
    took the steals before those calls, forgot them, and the calls stayed behind the running one).
    Call 1 sends calls 2 and 3 and their steals, signals itself as the agent does, then waits
    (up to 30 s) until both are given back."""
    import signal

    from _sandpool_agent import plain as _plain

    given_back_r, given_back_w = os.pipe()
    nested = []

    def prepare(worker, client, agent):
        feed = worker.buf.feed

        def feed_after_a_second_sigint(data):  # the calls are read, not yet decoded
            if worker.in_user and not nested:
                nested.append(True)
                worker._on_sigint(signal.SIGINT, None)
            return feed(data)

        worker.buf.feed = feed_after_a_second_sigint
        calls = _call(2, wait_readable, given_back_r, 0) + _call(3, wait_readable, given_back_r, 0)
        client.sendall(_call(1, send_then_interrupt_self, client.fileno(), calls, agent.fileno(), _steals(3, 2),
                             given_back_r, 30.0))

    try:
        answers = _serve_direct(prepare, 3, given_back_w)
    finally:
        os.close(given_back_r)
        os.close(given_back_w)
    assert nested, "the second SIGINT was never injected"
    assert answers == [("error", 2, "lost", None), ("error", 3, "lost", None), ("result", 1, None, _plain.encode(True))]


def add_one(x):
    return x + 1


def test_a_cancelled_call_that_carried_its_function_leaves_it_for_the_next_call():
    """The client counts a function as sent with the first call that carries it and sends the next
    calls of it without one; when that first call is cancelled (or stolen) before it starts, the
    worker keeps the function all the same, so the next call runs (it once failed with
    "the function could not be unpickled in the sandbox: KeyError" under load)."""
    key = b"add_one"

    def prepare(worker):
        worker.pending.append({"t": "call", "id": 7, "fn_key": key, "fn": cloudpickle.dumps(add_one),
                               "args": cloudpickle.dumps(((1,), {}))})
        worker.pending.append({"t": "call", "id": 8, "fn_key": key, "fn": b"", "args": cloudpickle.dumps(((41,), {}))})
        worker.cancelled.add(7)

    answers = _answers_of_worker(prepare)
    assert [(a["t"], a["id"], a.get("kind")) for a in answers] == [("error", 7, "cancelled"), ("result", 8, None)]
