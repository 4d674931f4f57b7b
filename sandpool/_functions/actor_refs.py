"""References as arguments: a call whose arguments include other calls' OperationRefs waits for
their results, then goes out with the values in their place.

Only top-level arguments are looked at (``f.remote(g.remote(x))``, ``f.remote(y=g.remote(x))``),
as in Ray; a ref inside a list is pickled like any other object (and refused: refs do not pickle).
The values come back to this process first and travel on from here (results are plain data, so
nothing a sandbox made is unpickled on the way). A large result of a local sandbox travels on as
its encoded bytes, never decoded here (see ``held``). An error of a dependency is the call's error;
a cancelled dependency cancels the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from .call import KEEP_HELD, CallRef
from .._core.opref import OperationCancelled, OperationRef


def has_refs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether any top-level argument is an OperationRef."""
    return any(isinstance(a, OperationRef) for a in args) or any(
        isinstance(v, OperationRef) for v in kwargs.values())


def when_resolved(host: Any, ref: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  then: Callable[[tuple[Any, ...], dict[str, Any]], None]) -> None:
    """Once every OperationRef among ``args`` and ``kwargs`` has its value, call ``then(args,
    kwargs)`` with the values in place, in the host's loop. ``ref`` (the call's own, with
    ``set_error``/``set_cancelled``) takes a dependency's error, its cancellation, or the error
    ``then`` raises; nothing is called once ``ref`` is done (cancelled meanwhile). Thread-safe.
    A dependency that is a remote call's ref still running is marked ``forwarded``: a large result
    of it is held as its bytes, to go on undecoded (see ``held``)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, CallRef) and not arg.done():
            arg.forwarded = True
    host.start_soon(_resolve, ref, args, kwargs, then)


async def _resolve(ref: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   then: Callable[[tuple[Any, ...], dict[str, Any]], None]) -> None:
    try:
        values = [await _value(a) for a in args]
        named = {k: await _value(v) for k, v in kwargs.items()}
    except OperationCancelled:
        ref.set_cancelled()
        return
    except trio.Cancelled:  # the session is closing
        ref.set_cancelled()
        raise
    except Exception as exc:  # the dependency's own error is the call's
        ref.set_error(exc)
        return
    if ref.done():
        return
    try:
        then(tuple(values), named)
    except Exception as exc:  # its arguments do not pickle: this call fails, nothing else
        ref.set_error(exc)


async def _value(arg: Any) -> Any:
    if not isinstance(arg, OperationRef):
        return arg
    token = KEEP_HELD.set(True)  # a held result goes on as its bytes
    try:
        return await arg
    finally:
        KEEP_HELD.reset(token)
