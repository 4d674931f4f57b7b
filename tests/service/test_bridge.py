"""The one trio<->gRPC bridge (``sandpool._grpc.bridge``), without a gRPC server: its handler threads
are worker threads, an RPC context is a stand-in whose end the test triggers."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import trio
import trio.testing

from sandpool._errors import SandboxUnavailableError
from sandpool._grpc import bridge


class Context:
    """What the bridge uses of a ``grpc.ServicerContext``: ``add_callback``, run when the RPC ends."""

    def __init__(self) -> None:
        self.callbacks: list = []
        self.over = False

    def add_callback(self, callback) -> bool:
        if self.over:
            return False
        self.callbacks.append(callback)
        return True

    def end(self) -> None:  # the client cancelled, or went away
        self.over = True
        for callback in self.callbacks:
            callback()


def test_run_returns_the_result_and_raises_the_error_in_the_handler_thread():
    """run() awaits the coroutine in the loop; its value, or its own exception, reaches the thread."""
    async def double(x):
        await trio.lowlevel.checkpoint()
        return 2 * x

    async def fail():
        raise KeyError("k")

    async def main():
        async with trio.open_nursery() as nursery:
            b = bridge.ServerBridge(trio.lowlevel.current_trio_token(), nursery)
            assert await trio.to_thread.run_sync(b.run, Context(), double, 21) == 42
            with pytest.raises(KeyError):
                await trio.to_thread.run_sync(b.run, Context(), fail)
    trio.run(main)


def test_run_is_cancelled_when_the_rpc_ends_first():
    """The RPC's end cancels its work in the loop, and the handler gets RpcEnded."""
    ctx = Context()
    started = threading.Event()

    async def forever():
        started.set()
        await trio.sleep_forever()

    async def main():
        async with trio.open_nursery() as nursery:
            b = bridge.ServerBridge(trio.lowlevel.current_trio_token(), nursery)

            def handler():
                with pytest.raises(bridge.RpcEnded):
                    b.run(ctx, forever)

            async def end_it():
                await trio.to_thread.run_sync(started.wait)
                ctx.end()

            nursery.start_soon(end_it)
            await trio.to_thread.run_sync(handler)
    trio.run(main)


def test_a_loop_that_has_ended_is_the_server_shutting_down():
    """Calls into a finished loop fail with SandboxUnavailableError, not trio's RunFinishedError."""
    async def grab():
        return bridge.ServerBridge(trio.lowlevel.current_trio_token(), None)

    b = trio.run(grab)
    with pytest.raises(SandboxUnavailableError, match="shutting down"):
        b.run_sync(len, "x")
    b.soon(len, "x")  # nothing to do, nothing raised
    with pytest.raises(SandboxUnavailableError, match="shutting down"):
        list(b.stream(Context(), trio.sleep_forever))


def test_stream_yields_batches_then_the_producers_error():
    """Messages arrive in order, in batches, and the producer's exception follows them."""
    async def produce(count, outbox):
        for i in range(count):
            await outbox.send(i)
        raise ValueError("bad request")

    async def main():
        async with trio.open_nursery() as nursery:
            b = bridge.ServerBridge(trio.lowlevel.current_trio_token(), nursery)

            def handler():
                got = []
                with pytest.raises(ValueError, match="bad request"):
                    for batch in b.stream(Context(), produce, 200, buffer=8):
                        assert 1 <= len(batch) <= bridge.BATCH
                        got += batch
                return got

            assert await trio.to_thread.run_sync(handler) == list(range(200))
    trio.run(main)


def test_stream_stops_its_producer_when_the_rpc_ends_or_the_reader_leaves():
    """The RPC's end cancels the producer; a reader that stops makes its next send fail."""
    ctx = Context()
    outcomes = []
    both_ended = trio.Event()

    async def produce(outbox):
        try:
            while True:
                await outbox.send(b"x")
        except BaseException as exc:
            outcomes.append(type(exc))
            if len(outcomes) == 2:
                both_ended.set()
            raise

    async def main():
        async with trio.open_nursery() as nursery:
            b = bridge.ServerBridge(trio.lowlevel.current_trio_token(), nursery)

            def reader_leaves():
                batches = b.stream(Context(), produce)
                next(batches)
                batches.close()

            def rpc_ends():
                batches = b.stream(ctx, produce)
                next(batches)
                ctx.end()
                for _ in batches:  # what was queued, then the end
                    pass

            await trio.to_thread.run_sync(reader_leaves)
            await trio.to_thread.run_sync(rpc_ends)
            await both_ended.wait()  # each producer ends in the loop, soon after
    trio.run(main)
    assert sorted(o.__name__ for o in outcomes) == ["BrokenResourceError", "Cancelled"]


def test_outbox_holds_its_producer_at_the_limit():
    """send waits while `limit` messages are queued, and resumes when the thread takes them."""
    async def main():
        outbox = bridge.Outbox(limit=3)
        sent = 0

        async def producer():
            nonlocal sent
            for i in range(10):
                await outbox.send(i)
                sent += 1
            outbox.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == 3
            got = []
            while batch := await trio.to_thread.run_sync(outbox.get_batch):
                got += batch
        assert got == list(range(10))
    trio.run(main)


def test_result_of_a_future_and_its_cancellation():
    """result_of returns a call's result from another thread; cancelling the awaiting task cancels it."""
    async def main():
        done = concurrent.futures.Future()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, done.set_result, "reply")  # a gRPC thread completes it
            assert await bridge.result_of(done) == "reply"
        failed = concurrent.futures.Future()
        failed.set_exception(OSError("gone"))
        with pytest.raises(OSError, match="gone"):
            await bridge.result_of(failed)
        pending = concurrent.futures.Future()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.result_of, pending)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert pending.cancelled()
    trio.run(main)


def test_pump_moves_requests_into_a_pipe_and_closes_it():
    """pump() feeds a request iterator to a ThreadPipe from its own thread, then ends the pipe."""
    async def main():
        pipe = bridge.ThreadPipe()
        bridge.ServerBridge.pump(iter([b"a", b"b", b"c"]), pipe, "test-pump")
        data = b""
        while chunk := await pipe.receive():
            data += chunk
        assert data == b"abc"
    trio.run(main)
