"""A sandbox's connection to its agent: requests, the frame reader, and how the end is settled.

:class:`AgentConnection` is a base class of ``Sandbox``: the reader routes the agent's frames to
the requests registered with it (processes, calls, file operations) and, when the connection
ends, settles the sandbox's state through its lifecycle's transition function.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import trio

from _sandpool_agent import wire as _wire
from .._core.lifecycle import Event, Phase
from .._errors import (
    ProtocolError,
    SandboxDiedError,
    SandboxError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxTimeoutError,
    SandboxUnavailableError,
)
from .parts import SandboxParts

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord

__all__ = ["AgentConnection"]

_EXIT_REPORT_SECONDS = 3.0


class _Reply:
    """A pending request/response exchange (file operations, pings)."""

    ACCEPTS = frozenset({"result", "error", "pong"})  # what an agent may answer; anything else fails the sandbox

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def _on_frame(self, frame: dict[str, Any]) -> int:
        self.frame = frame
        self.event.set()
        return 0

    def _on_sandbox_gone(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


class AgentConnection(SandboxParts):
    """Sandbox's side of the agent's connection (a base class of ``Sandbox``)."""

    def _register(self, handler: Any) -> int:
        return self._requests.register(handler)

    def _unregister(self, req_id: int) -> None:
        self._requests.unregister(req_id)

    async def _send(self, frame: dict[str, Any]) -> None:
        await self._open_channel().send(frame)

    def _send_now(self, handler: Any, make: Callable[[int], dict[str, Any]]) -> int:
        """The fast path of a request (any thread): when this sandbox runs and no task of its loop is
        writing to the agent, register ``handler``, write ``make(req_id)`` from this thread and
        return the id; else (or if that fails: the loop's path then meets the same error) do
        nothing and return 0. A frame the socket did not take whole is finished by a task of the loop.
        ``handler`` sees to its answer being read (it reads it itself, or calls ``_reader_needed``
        once it is awaited otherwise): a parked reader stays parked, also when the loop's thread sends."""
        record = self._record
        channel = record.channel if record is not None else None
        if channel is None or channel.closed or self._state.phase is not Phase.RUNNING:
            return 0
        req_id = self._register(handler)
        try:
            sent = channel.send_now(make(req_id), answer_seen_to=True)
        except SandboxError:  # too large (ProtocolError), or the socket broke
            sent = False
        if not sent:
            self._unregister(req_id)
            return 0
        if channel.backlogged:
            try:
                self._host.start_soon(channel.flush)
            except RuntimeError:  # the loop is gone, and the connection with it
                pass
        return req_id

    def _read_answer(self, req_id: int, take: Callable[[list[dict[str, Any]]], bool],
                     waiting: Callable[[], bool], deadline: float) -> None:
        """From a sync caller's thread blocked on request ``req_id`` (until ``deadline``, a
        time.monotonic() value): read the agent's connection here rather than wait for the loop's
        thread to (``FrameChannel.borrow``; what is done with the frames: ``_lent_reading``).
        Returns as ``_lent_reading`` ends (``waiting()`` is looked at after each take and every
        50 ms), or at the deadline; the caller then waits for its request as usual."""
        reading = self._lent_reading(req_id, take, waiting)
        try:
            channel = next(reading)
            while True:
                frames = channel.read_borrowed(deadline)
                if frames == [] and time.monotonic() >= deadline:
                    break
                channel = reading.send(frames)
        except StopIteration:
            pass
        finally:
            reading.close()

    async def _await_answer(self, req_id: int, take: Callable[[list[dict[str, Any]]], bool],
                            waiting: Callable[[], bool]) -> None:
        """``_read_answer`` for a task of this sandbox's loop awaiting request ``req_id``: it reads
        the agent's connection itself, so that the answer wakes it alone, rather than the loop's
        reader, which would then wake it, and go back to its wait before it may run. Returns as
        ``_lent_reading`` ends. Cancellation (of the task, or of a scope the request cancels when
        it stops waiting for its answer alone) lands while it waits, with nothing read; the reading
        is handed back either way."""
        reading = self._lent_reading(req_id, take, waiting)
        try:
            channel = next(reading)
            while True:
                channel = reading.send(await channel.receive_lent())
        except StopIteration:
            pass
        finally:
            reading.close()

    def _lent_reading(self, req_id: int, take: Callable[[list[dict[str, Any]]], bool],
                      waiting: Callable[[], bool]) -> Generator[Any, list[dict[str, Any]] | None, None]:
        """What a caller awaiting request ``req_id`` does with the agent's connection lent to it,
        whatever its way of reading: yields the channel once lent (nothing, and the loop's reader is
        told to read, if it is not to be had), then takes each read's frames (sent in: [] for none,
        None for the end or a malformed frame, which the loop's reader takes from here). Frames all
        for ``req_id`` go to ``take(frames)``, which handles them as the loop's reader would and
        returns True, or returns False: they go to the loop, as does anything else read (frames of
        other requests, the agent's end), in order, before its reader reads on. Ends once
        ``waiting()`` is False (the request was settled, or is awaited otherwise), or frames went
        to the loop; closed, it hands the reading back all the same."""
        record = self._record
        channel = record.channel if record is not None else None
        if channel is None or not channel.borrow():  # not ours to read: the loop's reader must
            self._reader_needed()
            return
        unread: list[dict[str, Any]] = []
        stay = False
        try:
            while waiting():
                frames = yield channel
                if frames is None:
                    break
                if frames and not (all(frame.get("id") == req_id for frame in frames) and take(frames)):
                    unread = frames
                    break
            stay = not self._requests.handlers  # nothing is awaited: the reader may stay parked
        finally:
            if channel.give_back(unread, stay):
                self._host.call_in_loop(channel.wake_reader)

    def _reader_needed(self) -> None:
        """An answer is awaited otherwise than by a thread that reads it: if the loop's reader is
        parked, it reads again. Any thread."""
        record = self._record
        channel = record.channel if record is not None else None
        if channel is not None and channel.parked:
            self._host.call_in_loop(channel.unpark)

    async def _send_many(self, frames: list[dict[str, Any]]) -> None:
        """Send several frames in one write (remote-function calls batch this way)."""
        await self._open_channel().send_many(frames)

    def _open_channel(self) -> Any:
        """The agent's channel, or the reason this sandbox no longer has one (SandboxNotRunningError,
        or its failure with the reason)."""
        channel = self._record.channel if self._record else None
        if channel is None or channel.closed or self._state.terminal:
            error = self._not_running_error()
            if error is None and channel is not None:  # running, but its connection ended first
                error = SandboxUnavailableError(f"sandbox {self.sandbox_id}: its connection is closed (its agent "
                                                f"or server is gone)", sandbox_id=self.sandbox_id)
            raise error or SandboxNotRunningError(
                f"sandbox {self.sandbox_id} is not running", sandbox_id=self.sandbox_id)
        return channel

    async def _reader(self) -> None:
        """Route frames to their requests until the agent's connection ends, then settle the state."""
        record = self._record
        assert record is not None and record.channel is not None
        farewell: dict[str, Any] | None = None
        protocol_error: ProtocolError | None = None
        self._host.nursery.start_soon(self._requests.send_credits, record.channel.send_many)
        try:
            while True:
                batch = await record.channel.receive_batch()
                if batch is None:
                    break
                for frame in batch:
                    mine = self._requests.route(frame)
                    if mine is None:
                        continue
                    if mine["t"] == "main_exit":
                        self._advance(Event.MAIN_EXIT, code=mine["code"])
                    elif mine["t"] == "bye":
                        farewell = mine
                    elif mine["t"] == "ask" and self._home.on_ask is not None:  # code inside calls an actor
                        self._home.on_ask(self, mine)
        except ProtocolError as exc:
            protocol_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await self._settle(record, farewell, protocol_error)

    async def _settle(self, record: SandboxRecord, farewell: dict[str, Any] | None,
                      protocol_error: ProtocolError | None) -> None:
        if protocol_error is not None:  # the stream is not to be trusted further: close it, then stop
            self._advance(Event.FAILED, reason=f"protocol error: {protocol_error}")
            assert record.channel is not None
            await record.channel.aclose()
            await self._runtime.stop(record, 0.0)
        with trio.move_on_after(_EXIT_REPORT_SECONDS):
            await record.exited.wait()
        if record.lost:  # the server became unreachable: its state is unknown here
            self._advance(Event.FAILED, reason=record.lost)
        if farewell is not None:
            self._advance(Event.FAREWELL, reason=farewell.get("reason"), code=farewell.get("code"))
        self._advance(Event.GONE, code=record.exit_code, signal=record.exit_signal, oom_killed=record.oom_killed)
        if record.channel is not None:
            await record.channel.aclose()
        self._requests.close(self._gone_error())
        self._terminal.set()

    def _gone_error(self) -> SandboxError:
        state = self._state
        if self._record is not None and self._record.lost:
            return SandboxUnavailableError(f"sandbox {self.sandbox_id}: {self._record.lost}",
                                           sandbox_id=self.sandbox_id)
        if state.stop_requested:
            return SandboxNotRunningError(f"sandbox {self.sandbox_id} was stopped", sandbox_id=self.sandbox_id)
        return SandboxDiedError(f"sandbox {self.sandbox_id} ended: {state.reason}", sandbox_id=self.sandbox_id,
                                exit_code=self._record.exit_code if self._record else None,
                                signal=self._record.exit_signal if self._record else None)

    async def _request(self, frame: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        await self._ensure_running()
        reply = _Reply()
        frame["id"] = self._register(reply)
        try:
            with trio.fail_after(self._spec.request_timeout_seconds if timeout is None else timeout):
                await self._send(frame)
                await reply.event.wait()
        except trio.TooSlowError:
            raise SandboxTimeoutError(f"{frame['t']} timed out", sandbox_id=self.sandbox_id) from None
        finally:
            self._unregister(frame["id"])
        if reply.error is not None:
            raise reply.error
        assert reply.frame is not None
        return reply.frame

    async def _file_request(self, frame: dict[str, Any], timeout: float | None) -> bytes | None:
        path = frame["path"]
        reply = await self._request(frame, timeout)
        if reply["t"] == "error" and reply["kind"] == "protocol":
            raise ProtocolError(f"the sandbox refused {frame['t']} of {path!r}: {reply['message']}")
        if reply["t"] == "error":
            raise SandboxFileError(reply["message"], sandbox_id=self.sandbox_id, filepath=path, reason=reply["kind"])
        data = reply.get("data")
        if reply["t"] != "result" or (frame["t"] == "read_file" and data is None):
            raise ProtocolError(f"the sandbox answered {frame['t']} of {path!r} with {_wire.summary(reply)}")
        return data if frame["t"] == "read_file" else None
