"""One remote call as the pool holds it: its ref, its pickled function and arguments, its attempts."""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from _sandpool_agent import plain as _plain
from . import held as _held, serialize as _serialize
from .._core.opref import OperationRef

if TYPE_CHECKING:
    from .actor_link import ActorCall
    from .slot import Slot


#: Set while a call's arguments are resolved (``actor_refs``): a held result is taken as it is.
KEEP_HELD: contextvars.ContextVar[bool] = contextvars.ContextVar("sandpool_keep_held", default=False)


class CallRef(OperationRef[Any]):
    """The OperationRef of one remote call. No task per call: the pool settles it directly
    (``set_result``/``set_error``/``set_cancelled``, as an executor settles its futures), and
    ``cancel()`` settles it at once and tells the pool, which interrupts the remote side.

    A ref passed as an argument to another call before it finished is ``forwarded``: its result,
    if large and plain, is settled as a ``held.Held`` (its encoded bytes), which goes on to that
    call undecoded; ``result()`` decodes it on first use and keeps the value (a malformed one
    raises SerializationError there). Other results are decoded as they arrive."""

    __slots__ = ("loop", "pool", "call", "label", "forwarded", "unwaited")

    def __init__(self, loop: Any) -> None:
        super().__init__()
        self.loop = loop  # the session's TaskHost: where the pool runs
        self.pool: Any = None  # the pool that holds the Call, once the call exists: cancel() tells it
        self.call: Call | ActorCall | None = None
        self.label = ""  # the function's name, for a held result's decoding error
        self.forwarded = False
        # Made in a sync thread, and no thread blocked on it yet: its answer may wait behind a
        # reader parked for blocking callers (see ``readhere``), which a poll of done() wakes.
        self.unwaited = loop is not None and not loop.in_loop_thread()

    def done(self) -> bool:
        if super().done():
            return True
        if self.unwaited:
            needed = getattr(self.pool, "reader_needed", None)
            if needed is not None:
                needed(self)
        return False

    def _unwrap(self) -> Any:
        value = super()._unwrap()
        if type(value) is _held.Held and not KEEP_HELD.get():
            try:
                value = value.decode()
            except _plain.Malformed as exc:
                raise _serialize.decode_error(exc, self.label) from exc
            self._value = value  # the next result() answers at once
        return value

    def _block(self, timeout: float | None) -> None:
        # A sync caller may read its call's answer itself, rather than be woken by the loop's thread.
        read = getattr(self.pool, "read_answer", None)
        self.unwaited = False  # a blocked thread reads the answer, or has the loop's reader read it
        if read is not None:  # (result() checked that this thread runs no trio loop)
            deadline = time.monotonic() + timeout if timeout is not None else math.inf
            read(self, deadline)
            if self.done():
                return
            if timeout is not None:
                timeout = max(0.0, deadline - time.monotonic())
        super()._block(timeout)

    def _notify(self, event: Any, callbacks: list[Any] | None) -> None:
        # Done callbacks run in the loop's thread (OperationRef's contract), also when the ref was
        # settled in another (a sync caller that read its own answer, or cancelled the call).
        loop = self.loop
        if callbacks and loop is not None and not loop.in_loop_thread():
            if event is not None:
                event.set()
            try:
                loop.call_soon(super()._notify, None, callbacks)
                return
            except RuntimeError:  # the loop has ended: run them here, as a ref with no loop would
                event = None
        super()._notify(event, callbacks)

    def add_done_callback(self, fn: Any) -> None:
        super().add_done_callback(fn)
        # Waited for otherwise than by blocking: the loop's reader must read the answer.
        pool = self.pool
        if pool is not None and not self.done() and hasattr(pool, "reader_needed"):
            pool.reader_needed(self)

    def cancel(self) -> bool:
        pool, call = self.pool, self.call  # (settling lets go of them)
        if not super().cancel():  # never launched as a task: this settles it, cancelled
            return False
        if pool is not None and call is not None:  # interrupt it where it runs (in the loop's thread)
            self.loop.call_in_loop(pool.cancel, call)  # (a loop that ended took the call with it)
        return True

    def attach(self, pool: Any, call: Call | ActorCall, label: str) -> None:
        """Tie this ref to ``call``, held by ``pool`` (what ``cancel()`` interrupts); a ref settled
        meanwhile (cancelled before its call was made) keeps none of it."""
        self.pool, self.call, self.label = pool, call, label
        if self.done():
            self.pool = self.call = None

    def _settle(self, state: str, value: Any, error: BaseException | None) -> tuple[Any, Any]:
        # A settled ref keeps only its outcome: a million-call map holds its refs, and each kept
        # Call (with its pickled arguments) cost ~300 B and slowed the garbage collector. Let go
        # as it settles (under the settling lock), before any waiter wakes or callback runs: also
        # when cancel() settles it, after which the pool may never settle it again. The waiters'
        # event (~100 B with its lock, made when a thread blocked on the ref) goes too: it is set
        # once, from what this returns, and a blocked thread holds it itself.
        woken = super()._settle(state, value, error)
        self.pool = self.call = self._event = None
        return woken

    def set_result(self, value: Any) -> None:
        """Finish with ``value`` (no effect on a finished ref). For the pool."""
        self._set_result(value)

    def set_error(self, error: BaseException) -> None:
        """Fail with ``error`` (no effect on a finished ref). For the pool."""
        self._set_error(error)

    def set_cancelled(self) -> None:
        """Finish cancelled, without telling the pool (no effect on a finished ref). For the pool."""
        self._set_cancelled()


@dataclass(eq=False)
class Payload:
    """A pickled function, shared by its calls; ``estimate`` tracks its duration (s, EWMA).
    ``pickled``: its results and exceptions come back as cloudpickles (``unsafe_pickle_results``)."""

    name: str
    data: bytes
    key: bytes
    estimate: float | None = None
    pickled: bool = False

    def decode(self, data: Any) -> Any:
        """A result of this function from its bytes (SerializationError if they do not decode)."""
        return _serialize.loads_result(data, self.name, self.pickled)

    def decode_file(self, fd: int, size: int) -> Any:
        """A result of this function from a file (SerializationError, or OSError if unreadable)."""
        return _serialize.loads_result_file(fd, size, self.name, self.pickled)

    def hold_file(self, fd: int, size: int) -> Any:
        """``decode_file`` for a result that goes on to another call: a plain one is held as its
        encoded bytes (see ``held``), decoded only if asked."""
        return self.decode_file(fd, size) if self.pickled else _held.hold(fd, size)

    def observe(self, micros: int) -> None:
        seconds = micros / 1e6
        self.estimate = seconds if self.estimate is None else 0.8 * self.estimate + 0.2 * seconds


@dataclass(eq=False)
class Call:
    """A call and where it is: queued (``slot`` None), or held by a slot under ``req_id``."""

    payload: Payload
    args: bytes | list[bytes]  # a list of parts when large (see _serialize.dumps_parts)
    ref: CallRef
    retries: Any  # a Retries: .max_retries, .retry_on(exc), .delay(attempt)
    timeout: float | None = None
    attempts: int = 0
    slot: Slot | None = None
    req_id: int = 0
    sent: bool = False
    timed_out: bool = False  # the pool interrupted it for its timeout (direct mode's backstop)
    stealing: bool = False  # the pool asked for it back to run it on an idle sandbox
    size: int = 0

    def __post_init__(self) -> None:
        self.size = len(self.args) if isinstance(self.args, bytes) else sum(map(len, self.args))
