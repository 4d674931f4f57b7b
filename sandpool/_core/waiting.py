"""Helpers over many OperationRefs: ``results``, ``wait`` and ``as_completed`` block; ``gather`` awaits."""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable


from .opref import OperationRef, _deadline, _slices, check_not_in_trio

__all__ = ["as_completed", "gather", "results", "wait"]

T = TypeVar("T")


def _get(finished: queue.SimpleQueue[Any], deadline: float | None) -> Any:
    for seconds in _slices(deadline):
        try:
            return finished.get(timeout=seconds)
        except queue.Empty:
            pass
    raise TimeoutError


@runtime_checkable
class AsWaitable(Protocol):
    """What ``wait`` takes besides refs (a Sandbox): the ref that it waits for in its stead."""

    def _as_waitable(self) -> OperationRef[Any]: ...


#: What ``wait`` takes and hands back: refs, or Sandbox objects (each kind as given).
W = TypeVar("W", bound="OperationRef[Any] | AsWaitable")


def _finish_queue(refs: Sequence[OperationRef[Any]]) -> queue.SimpleQueue[OperationRef[Any]]:
    """A queue that receives each ref when it finishes (at once for those already done)."""
    finished: queue.SimpleQueue[OperationRef[Any]] = queue.SimpleQueue()
    for ref in refs:
        ref.add_done_callback(finished.put)
    return finished


def results(ref_or_refs: OperationRef[T] | Sequence[OperationRef[T]]) -> T | list[T]:
    """Block for one ref's value, or for the list of values of a sequence of refs, in order.

    The first exception in that order propagates; the other operations keep running.
    RuntimeError inside trio, where blocking would hang the loop.
    """
    check_not_in_trio("sandpool.results()", "'await sandpool.gather(refs)'")
    if isinstance(ref_or_refs, OperationRef):
        return ref_or_refs.result()
    return [ref.result() for ref in ref_or_refs]


def wait(refs: Sequence[W], num_returns: int | None = None,
         timeout: float | None = None) -> tuple[list[W], list[W]]:
    """Block until ``num_returns`` of ``refs`` (None: all) are done, or ``timeout`` s pass.

    ``refs`` may also hold Sandbox objects, which count as done once running (as in cwsandbox).
    Returns ``(done, pending)``, the original objects in their given order: ``done`` holds at
    most ``num_returns`` finished refs and ``pending`` all the others (a few of which may have
    finished meanwhile). A timeout is not an error: it returns what is done by then.
    Raises ValueError if ``num_returns`` < 1, RuntimeError inside trio.
    """
    check_not_in_trio("sandpool.wait()", "'await sandpool.gather(refs)' or a trio nursery")
    if num_returns is not None and num_returns < 1:
        raise ValueError(f"`num_returns` must be at least 1, or None to wait for all; got {num_returns!r}")
    items = list(refs)
    # a Sandbox (or anything with _as_waitable) is waited for in its own sense: until it runs
    waits = [item._as_waitable() if isinstance(item, AsWaitable) else item for item in items]
    wanted = len(waits) if num_returns is None else min(num_returns, len(waits))
    finished, deadline = _finish_queue(waits), _deadline(timeout)
    try:
        for _ in range(wanted):
            _get(finished, deadline)
    except TimeoutError:
        pass
    done = [item for item, ref in zip(items, waits) if ref.done()][:wanted]
    chosen = {id(item) for item in done}
    return done, [item for item in items if id(item) not in chosen]


def as_completed(refs: Sequence[OperationRef[T]], timeout: float | None = None) -> Iterator[OperationRef[T]]:
    """Iterate over ``refs`` (the original objects) in the order they finish.

    ``timeout`` s count from this call; once they pass, the next step raises TimeoutError.
    RuntimeError inside trio, where blocking would hang the loop.
    """
    check_not_in_trio("sandpool.as_completed()", "'await ref' in a trio nursery")
    refs = list(refs)
    return _drain(_finish_queue(refs), len(refs), _deadline(timeout), timeout)


def _drain(finished: queue.SimpleQueue[Any], total: int, deadline: float | None,
           timeout: float | None) -> Iterator[Any]:
    for count in range(total):
        try:
            yield _get(finished, deadline)
        except TimeoutError:
            raise TimeoutError(f"{total - count} of {total} operations did not finish within {timeout} s") from None


async def gather(refs: Sequence[OperationRef[T]]) -> list[T]:
    """Await every ref and return their values in order; from trio or asyncio.

    The first exception in that order propagates; the other operations keep running. If the
    awaiting task is cancelled, every operation of ``refs`` still running is cancelled too.
    """
    values: list[T] = []
    try:
        for ref in refs:
            values.append(await ref)
    except BaseException as exc:
        if not isinstance(exc, Exception):  # the awaiter was cancelled, and so is its interest
            for ref in refs:
                ref.cancel()
        raise
    return values
