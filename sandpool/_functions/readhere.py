"""The pool's part for a sync caller that reads its own call's answer (see ``direct``: a
DirectChannel's reading is borrowed, and its reader parked): ``read_answer`` from the caller's
thread, ``reader_needed`` when a call is waited for otherwise. ``Pool`` is built on it.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

from .call import Call, CallRef
from .direct import locked

if TYPE_CHECKING:
    from .slot import Slot


class ReadsOwnAnswers:
    """Part of ``Pool``; what it uses of the rest is declared below for type checkers only."""

    if TYPE_CHECKING:
        lock: threading.RLock
        queue: collections.deque[Call]
        slots: list[Slot]
        closed: bool
        reuse: bool

        def _answer(self, slot: Slot, frame: dict[str, Any]) -> None: ...
        def _may_steal(self) -> bool: ...
        def _reschedule(self) -> None: ...
        def calls_answered(self, slot: Slot, frames: list[dict[str, Any]]) -> None: ...

    def read_answer(self, ref: CallRef, deadline: float) -> None:
        """From a sync caller's thread blocked on ``ref`` (until ``deadline``, a time.monotonic()
        value): if its call was sent and is the only one its sandbox's direct worker holds, read
        the worker's connection here rather than wait for the loop's thread to (see
        ``direct.DirectChannel.borrow``). A lone result is settled here as the loop would settle
        it; anything else (an error, other answers, the worker's end) goes to the loop, in order,
        before its reader reads again. Returns when ``ref`` is done, at the deadline, or when the
        loop has taken over; the caller then waits for ``ref`` as usual."""
        loop = ref.loop
        with self.lock:
            call = ref.call
            slot = call.slot if isinstance(call, Call) else None
            direct = slot.direct if slot is not None else None
            if slot is None or direct is None or ref.done():
                return
            borrowed = (call.sent and self.reuse and len(slot.inflight) == 1  # type: ignore[union-attr]
                        and slot.inflight.get(call.req_id) is call  # type: ignore[union-attr]
                        and direct.borrow())
        if not borrowed:  # not ours to read: the loop's reader must (it may be parked)
            self.reader_needed(ref)
            return
        self._read_here(ref, slot, direct, deadline)

    def _read_here(self, ref: CallRef, slot: Slot, direct: Any, deadline: float) -> None:
        loop, handed, stay = ref.loop, False, False
        try:
            while not ref.done() and not handed:
                frames = direct.read_borrowed(deadline)
                if frames is None or (not frames and time.monotonic() >= deadline):
                    break  # EOF or a malformed frame, left for the loop's reader; or time is up
                if not frames:
                    continue  # 50 ms passed: look at the call again (cancelled meanwhile?)
                with self.lock:
                    if len(frames) == 1 and frames[0]["t"] == "result" and not self.closed:
                        self._answer(slot, frames[0])
                        stay = not slot.inflight  # nothing more to read: the reader stays parked
                        if self.queue or self._may_steal():  # work for the loop's _reschedule
                            loop.call_soon(self._reschedule)
                        continue
                loop.call_soon(self._settle_handed, slot, frames, direct)
                handed = True  # the loop settles them, then lets its reader read on
        except RuntimeError:  # the loop has ended, and every call with it
            pass
        finally:
            if not handed and direct.give_back(stay):
                try:
                    loop.call_soon(direct.wake_reader)
                except RuntimeError:
                    pass

    @locked
    def _settle_handed(self, slot: Slot, frames: list[dict[str, Any]], direct: Any) -> None:
        """In the loop's thread: settle what a borrower read, then let the loop's reader read on."""
        self.calls_answered(slot, frames)
        direct.give_back(False)
        direct.wake_reader()

    def reader_needed(self, ref: CallRef) -> None:
        """``ref`` is waited for otherwise than by a thread blocking on it: if its answer would go
        unread (its connection's reader is parked), the loop's reader reads again."""
        call = ref.call
        slot = call.slot if isinstance(call, Call) else None
        direct = slot.direct if slot is not None else None
        if direct is not None and direct.parked:
            ref.loop.call_in_loop(direct.unpark)
