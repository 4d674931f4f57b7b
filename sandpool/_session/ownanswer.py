"""The process's part for a caller that reads its own exec's answer (see ``FrameChannel.borrow``:
the agent connection's reading is borrowed, and its loop reader parked). A sync caller blocked in
``result()`` reads the connection itself (``SandboxLink.read_answer``) and settles the process from
its frames in its own thread; a task of the sandbox's loop awaiting it does the same in the loop
(``SandboxLink.await_answer``). Neither does while a task of the loop waits on the process otherwise
(a live reader of its output, its kill): those frames go to the loop. ``Process`` is built on it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import trio

from _sandpool_agent import wire as _wire
from .._core.opref import OperationRef
from .._core.output import OutputBuffer

if TYPE_CHECKING:
    from .._core.opref import TaskHost
    from .process import ProcessResult, SandboxLink
    from .streams import StreamWriter

#: What a caller reading its own answer takes (``_take_answer``): the frames of a running exec, with
#: at most this much output it cannot acknowledge (an exited process needs no credit).
_TAKES = frozenset({"started", "output", "exit"})
_TAKEN_BYTES = _wire.OUTPUT_WINDOW_BYTES // 2


class LiveOutput(OutputBuffer):
    """A process's output buffer, which tells its process when a live reader begins (in the loop's
    thread), before that reader may wait on the buffer's events."""

    def __init__(self, cap: int, began: Callable[[], None]) -> None:
        super().__init__(cap)
        self._began = began

    async def next_chunk(self) -> tuple[bytes | None, int]:
        if self.read_at is None:
            self._began()
        return await super().next_chunk()


class ReadsOwnAnswer(OperationRef["ProcessResult"]):
    """Part of ``Process``; what it uses of the rest is declared below for type checkers only."""

    if TYPE_CHECKING:
        _link: SandboxLink
        _loop: TaskHost
        _req_id: int
        _detached: bool
        _ending: bool
        _exited: trio.Event
        stdin: StreamWriter | None

        def _on_frame(self, frame: dict[str, Any]) -> int: ...
        def _end_streams(self) -> None: ...
        async def _ack(self, n: int) -> None: ...

    def _init_reading(self, on_done: Callable[[Self], None] | None) -> None:
        # A sync caller may settle it from its own thread (``_take_answer``) unless a task of the loop
        # waits on it: a live reader of its output (``_live``) or its kill (``_ending``).
        self._guard = threading.RLock()
        self._live = False
        self._taken = 0  # output bytes a sync caller took and has not acknowledged
        self._on_done: Callable[[Any], None] | None = on_done
        self._own_wait: trio.CancelScope | None = None  # a task of the loop reads its answer in it

    def add_done_callback(self, fn: Callable[[Self], None]) -> None:
        super().add_done_callback(fn)
        if not self.done():  # waited for otherwise than by a thread blocking on it: the loop reads its answer
            self._link.reader_needed()

    def _block(self, timeout: float | None) -> None:
        # A sync caller reads its exec's answer itself when it can, rather than be woken by the
        # loop's thread once that has read it (``SandboxLink.read_answer``).
        if self._detached and self.stdin is None and timeout != 0 and self._waiting():
            deadline = math.inf if timeout is None else time.monotonic() + timeout
            self._link.read_answer(self._req_id, self._take_answer, self._waiting, deadline)
            self._ack_taken()
            if self.done():
                return
            if timeout is not None:
                timeout = max(0.0, deadline - time.monotonic())
        else:
            self._link.reader_needed()
        super()._block(timeout)

    def _ack_taken(self) -> None:
        """After its caller read its answer: the loop reads on, so acknowledge the output taken
        there, or the agent stalls."""
        with self._guard:  # (another thread may be taking its frames now)
            taken, self._taken = self._taken, 0
        if taken:
            try:
                self._loop.start_soon(self._ack, taken, on_refused=lambda error: None)
            except RuntimeError:  # the loop has ended, and the sandbox with it
                pass

    async def _await(self) -> ProcessResult:
        # A task of its sandbox's loop reads its exec's answer itself when it can (the loop's
        # ``_block``: ``SandboxLink.await_answer``), rather than be woken by the loop's reader once
        # that has read it; in a scope the process cancels when it stops waiting for its answer
        # alone (``_stop_own_wait``).
        if self._detached and self.stdin is None and self._waiting() and self._loop.in_loop_thread():
            self._own_wait = trio.CancelScope()
            try:
                with self._own_wait:
                    await self._link.await_answer(self._req_id, self._take_answer, self._waiting)
            except BaseException:  # the awaiting task was cancelled: so is the process, as awaited otherwise
                self.cancel()
                raise
            finally:
                self._own_wait = None
            self._ack_taken()
            if self.done():
                return self._unwrap()
        return await super()._await()

    def _stop_own_wait(self) -> None:
        """In the loop's thread: a task reading its own answer (``_await``) stops, and waits as usual
        (its process ends otherwise: frames may never come)."""
        if self._own_wait is not None:
            self._own_wait.cancel()

    def _waiting(self) -> bool:
        """Nothing but its answer is awaited: a sync caller may read it (``_take_answer``)."""
        return not (self.done() or self._live or self._ending)

    def _take_answer(self, frames: list[dict[str, Any]]) -> bool:
        """In a sync caller's thread that read its sandbox's connection: handle ``frames`` (all this
        process's) as the loop's reader would, unless a task of the loop waits on it (a live reader,
        its kill), they are not a running exec's or their output would take it over ``_TAKEN_BYTES``
        unacknowledged; False leaves them to the loop, which routes them as usual."""
        if any(frame["t"] not in _TAKES for frame in frames):
            return False
        size = sum(len(frame["data"]) for frame in frames if frame["t"] == "output")
        if self._taken + size > _TAKEN_BYTES:
            return False
        with self._guard:
            if self._live or self._ending or self._exited.is_set():
                return False
            for frame in frames:
                self._on_frame(frame)
            if not self._exited.is_set():  # (the agent forgets an exited process: no credit is owed)
                self._taken += size
        return True

    def _live_reader(self) -> None:
        """A live reader of its output begins (in the loop's thread): only the loop settles it now."""
        with self._guard:
            self._live = True
        self._link.reader_needed()

    def _notify(self, event: Any, callbacks: list[Any] | None) -> None:
        # An exec cancelled before its task ran, or refused by a closing session, never runs _body:
        # its streams must end all the same, or a reader would wait for ever.
        self._end_streams()
        with self._guard:
            on_done, self._on_done = self._on_done, None
        if on_done is not None:
            self._call(on_done)
        # Done callbacks run in the loop's thread (OperationRef's contract), also when a sync caller
        # settled it in its own (``_take_answer``).
        if callbacks and not self._loop.in_loop_thread():
            if event is not None:
                event.set()
            try:
                self._loop.call_soon(super()._notify, None, callbacks)
                return
            except RuntimeError:  # the loop has ended: run them here
                event = None
        super()._notify(event, callbacks)
