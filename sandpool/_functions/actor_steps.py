"""An actor that runs calls at once (``max_concurrency`` above 1, for async methods): its calls
go out in *steps*, one frame at a time, each starting the ready calls that fit under the limit
and cancelling running ones; a step's answer reports the calls that ended meanwhile (by ticket).
``ActorLink`` is built on this part; the sandbox side is ``_sandpool_agent.actors.invoke_many``.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from . import serialize as _serialize
from .._errors import SerializationError

if TYPE_CHECKING:
    import collections

    from .actor_link import ActorCall
    from .direct import DirectChannel
    from .._session.sandbox import Sandbox

#: An actor running calls at once through the agent's relay reports every so often (s): the agent
#: hands the worker no next step while one runs, so the step cannot see that calls wait.
POLL_SECONDS = 0.005


class RunsSteps:
    """Part of ``ActorLink``: its steps. What it uses of the rest is declared below for type
    checkers only."""

    if TYPE_CHECKING:
        label: str
        actor_id: str
        pickled: bool
        concurrency: int
        sandbox: Sandbox | None
        direct: DirectChannel | None
        queue: collections.deque[ActorCall]
        inflight: dict[int, ActorCall]
        running: dict[int, ActorCall]  # calls a step started, by ticket
        cancels: list[int]  # tickets of running calls to cancel with the next step
        tickets: int

    def _step(self) -> tuple[list[ActorCall], bytes] | None:
        """The next step of an actor running calls at once, if one is due: the ready calls that
        fit under ``concurrency`` (started at once there) and the cancels of running ones; or, when
        calls run and no step is out, a step that only waits for one of them to end. The calls it
        starts and its pickled arguments, or None."""
        if any(c.construct for c in self.inflight.values()):
            return None
        new: list[ActorCall] = []
        queue = self.queue
        while queue and (queue[0].args is not None or queue[0].ref.done()) and \
                len(self.running) + len(new) < self.concurrency:
            call = queue.popleft()
            if not call.ref.done():
                self.tickets += 1
                call.ticket = self.tickets
                new.append(call)
        if not new and not self.cancels and (self.inflight or not self.running):
            return None
        for call in new:
            self.running[call.ticket] = call
        cancels, self.cancels = self.cancels, []
        poll = None if self.direct is not None else POLL_SECONDS  # the agent relays one step at a time
        data = pickle.dumps(((self.actor_id, [(c.ticket, c.args) for c in new], cancels, self.pickled, poll), {}),
                            protocol=5)
        return new, data

    def _settle_step(self, outcomes: Any) -> None:
        """Settle the calls a step reports ended: ``[(ticket, ok, value or error fields), ...]``."""
        if not (type(outcomes) is list and all(type(o) is tuple and len(o) == 3 and type(o[0]) is int
                                               and type(o[1]) is bool for o in outcomes)):
            error = SerializationError(f"the answer of a step of actor {self.label} is malformed; the sandbox "
                                       "sent something else than (ticket, ok, value) outcomes")
            for pending in self.running.values():
                pending.ref.set_error(error)
            self.running.clear()
            return
        sandbox_id = self.sandbox.sandbox_id if self.sandbox else None
        for ticket, ok, value in outcomes:
            call = self.running.pop(ticket, None)
            if call is None or call.ref.done():
                continue
            fields = value if type(value) is dict else {}
            if ok:
                call.ref.set_result(value)
            elif fields.get("kind") == "serialization":
                call.ref.set_error(SerializationError(f"call to {call.label!r}: {fields.get('message')}"))
            elif fields.get("kind") == "cancelled":
                call.ref.set_cancelled()
            else:
                call.ref.set_error(_serialize.remote_exception(fields, sandbox_id, False))
