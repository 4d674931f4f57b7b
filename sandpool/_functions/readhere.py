"""A sync caller that reads its own call's answer (see ``direct``: a DirectChannel's reading is
borrowed, and its reader parked): ``read_answer`` from the caller's thread, ``reader_needed`` when
a call is waited for otherwise.

``ReadsHere`` is the reading itself, shared by the owners of direct connections; each says, through
four small methods, where a call's answer comes and how it settles one. ``ReadsOwnAnswers`` is the
pool's part (``Pool`` is built on it); an actor's link has its own (``actor_readhere``).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

from .call import Call, CallRef
from .direct import DirectChannel, locked

if TYPE_CHECKING:
    from .slot import Slot


class ReadsHere:
    """The reading of a blocked caller's answer, for an owner of direct connections (under its
    ``lock``). The owner says where a call's answer comes (a *place*, its own key: a pool's slot,
    an actor's incarnation) and how it settles what a caller read."""

    if TYPE_CHECKING:
        lock: threading.RLock

    def _lone_place(self, ref: CallRef) -> tuple[Any, DirectChannel] | None:
        """Under the lock: the place and connection of ``ref``'s call if it was wholly sent and is
        the only call that connection holds (its answer is the next frame), else None."""
        raise NotImplementedError

    def _connection(self, ref: CallRef) -> DirectChannel | None:
        """The connection ``ref``'s answer comes on, if any."""
        raise NotImplementedError

    def _settle_read(self, place: Any, frame: dict[str, Any], loop: Any) -> bool | None:
        """Under the lock, in the reading thread: settle a lone ``result`` frame read at ``place``
        as the loop would (``loop``: the session's TaskHost, for work that follows); whether the reader may stay parked (the connection holds no call), or
        None if it is not settled here (the loop then settles it)."""
        raise NotImplementedError

    def _settle_batch(self, place: Any, frames: list[dict[str, Any]]) -> None:
        """Under the lock, in the loop's thread: settle frames read at ``place`` as its reader would."""
        raise NotImplementedError

    def read_answer(self, ref: CallRef, deadline: float) -> None:
        """From a sync caller's thread blocked on ``ref`` (until ``deadline``, a time.monotonic()
        value): if its call was sent and is the only one its connection holds, read the
        connection here rather than wait for the loop's thread to (see
        ``direct.DirectChannel.borrow``). A lone result is settled here as the loop would settle
        it; anything else (an error, other answers, the worker's end) goes to the loop, in order,
        before its reader reads again. Returns when ``ref`` is done, at the deadline, or when the
        loop has taken over; the caller then waits for ``ref`` as usual."""
        with self.lock:
            lone = None if ref.done() else self._lone_place(ref)
            borrowed = lone is not None and lone[1].borrow()
        if lone is None or not borrowed:  # not ours to read: the loop's reader must (it may be parked)
            self.reader_needed(ref)
            return
        self._read_here(ref, *lone, deadline)

    def _read_here(self, ref: CallRef, place: Any, direct: DirectChannel, deadline: float) -> None:
        loop, handed, stay = ref.loop, False, False
        try:
            while not ref.done() and not handed:
                frames = direct.read_borrowed(deadline)
                if frames is None or (not frames and time.monotonic() >= deadline):
                    break  # EOF or a malformed frame, left for the loop's reader; or time is up
                if not frames:
                    continue  # 50 ms passed: look at the call again (cancelled meanwhile?)
                with self.lock:
                    if len(frames) == 1 and frames[0]["t"] == "result":
                        settled = self._settle_read(place, frames[0], loop)
                        if settled is not None:
                            stay = settled
                            continue
                loop.call_soon(self._settle_handed, place, frames, direct)
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
    def _settle_handed(self, place: Any, frames: list[dict[str, Any]], direct: DirectChannel) -> None:
        """In the loop's thread: settle what a borrower read, then let the loop's reader read on."""
        self._settle_batch(place, frames)
        direct.give_back(False)
        direct.wake_reader()

    def reader_needed(self, ref: CallRef) -> None:
        """``ref`` is waited for otherwise than by a thread blocking on it: if its answer would go
        unread (its connection's reader is parked), the loop's reader reads again."""
        direct = self._connection(ref)
        if direct is not None and direct.parked:
            ref.loop.call_in_loop(direct.unpark)


class ReadsOwnAnswers(ReadsHere):
    """Part of ``Pool``: its calls' places are its slots. What it uses of the rest is declared
    below for type checkers only."""

    if TYPE_CHECKING:
        queue: collections.deque[Call]
        slots: list[Slot]
        closed: bool
        reuse: bool

        def _answer(self, slot: Slot, frame: dict[str, Any]) -> None: ...
        def _may_steal(self) -> bool: ...
        def _reschedule(self) -> None: ...
        def calls_answered(self, slot: Slot, frames: list[dict[str, Any]]) -> None: ...

    def _lone_place(self, ref: CallRef) -> tuple[Any, DirectChannel] | None:
        call = ref.call
        if not isinstance(call, Call):
            return None
        slot = call.slot
        direct = slot.direct if slot is not None else None
        if (slot is None or direct is None or not call.sent or not self.reuse or len(slot.inflight) != 1
                or slot.inflight.get(call.req_id) is not call):
            return None
        return slot, direct

    def _connection(self, ref: CallRef) -> DirectChannel | None:
        call = ref.call
        return call.slot.direct if isinstance(call, Call) and call.slot is not None else None

    def _settle_read(self, place: Any, frame: dict[str, Any], loop: Any) -> bool | None:
        if self.closed:
            return None
        slot: Slot = place
        self._answer(slot, frame)
        if self.queue or self._may_steal():  # work for the loop's _reschedule
            loop.call_soon(self._reschedule)
        return not slot.inflight  # nothing more to read: the reader stays parked

    def _settle_batch(self, place: Any, frames: list[dict[str, Any]]) -> None:
        self.calls_answered(place, frames)
