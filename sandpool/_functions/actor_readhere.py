"""An actor's part for a sync caller that reads its own call's answer (``readhere``): blocked on
a call that is the only one the actor's worker holds, the caller reads the worker's connection
itself, so the answer wakes the caller alone, as a remote function's does. ``ActorLink`` is built
on it.

An actor runs its calls one at a time, in order, so the lone call's answer is the next frame on
the connection; a caller reads only then, and settles only a ``result`` of the current sandbox's
worker (the actor's *incarnation*). An error, the worker's end, or anything of an earlier
incarnation goes to the loop, which may end or restart the actor (``actor_link``). Actors running
calls at once (``max_concurrency`` above 1) answer in steps, which the loop alone reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .call import CallRef
from .direct import DirectChannel
from .readhere import ReadsHere

if TYPE_CHECKING:
    from .actor_link import ActorCall


class ActorReadsOwnAnswers(ReadsHere):
    """Part of ``ActorLink``: its calls' place is the current incarnation. What it uses of the
    rest is declared below for type checkers only."""

    if TYPE_CHECKING:
        direct: DirectChannel | None
        inflight: dict[int, ActorCall]
        outbox: list[dict[str, Any]]
        concurrency: int
        incarnation: Any

        def on_answer(self, frame: dict[str, Any]) -> int: ...

    def _lone_place(self, ref: CallRef) -> tuple[Any, DirectChannel] | None:
        # ``direct`` is set only while a sandbox is the actor's and ready (``_end`` clears it).
        call, direct = ref.call, self.direct
        if (direct is None or call is None or self.concurrency > 1 or self.outbox or not direct.idle
                or len(self.inflight) != 1 or self.inflight.get(call.req_id) is not call):
            return None
        return self.incarnation, direct

    def _connection(self, ref: CallRef) -> DirectChannel | None:
        call = ref.call  # (one not sent yet is not waited for there: whoever sends it wakes the reader)
        return self.direct if call is not None and self.inflight.get(call.req_id) is call else None

    def _settle_read(self, place: Any, frame: dict[str, Any], loop: Any) -> bool | None:
        if place is not self.incarnation:  # the actor died or restarted meanwhile: the loop's to see
            return None
        self.on_answer(frame)
        return not self.inflight  # nothing more to read: the reader stays parked

    def _settle_batch(self, place: Any, frames: list[dict[str, Any]]) -> None:
        place.on_answers(frames)  # (an earlier incarnation's are dropped there)
