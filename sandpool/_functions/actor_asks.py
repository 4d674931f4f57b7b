"""Handles as values: an ActorHandle passed into a sandbox, and the calls made through it there.

A handle pickles as ``_sandpool_agent.actors.RemoteHandle``, which names the actor by a token of
16 random bytes, not by anything a sandbox could guess. Its calls go through this client (not
sandbox to sandbox): the call worker sends an ``ask`` frame (token, method, arguments as plain
data) through its agent; this module finds the session's actor with that token, calls the method
like any other caller (in order with the calls made here), and answers ``told`` with the result
as plain data, or the error's type name and message.

Through the client because sandboxes cannot reach each other (their own network and mount
namespaces, maybe other machines), and because the client is where trust is decided: a sandbox
reaches only the actors whose handles it was given, of its own session, and nothing it sends is
unpickled here (its arguments are plain data, re-pickled here for the actor).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from _sandpool_agent import actors as _agent_actors, plain as _plain
from .._errors import SandboxError

if TYPE_CHECKING:
    from .._session.sandbox import Sandbox

#: Most actor calls one sandbox may have waiting at once; more are refused (told an error).
MAX_PENDING_ASKS = 4096
_pending: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def reduce_handle(state: Any) -> tuple[Any, ...]:
    """What a handle (of ``state``) pickles as: the sandbox side's handle, naming the actor by its token."""
    return _agent_actors.RemoteHandle, (state.token, state.label, tuple(sorted(state.methods)))


def on_ask(session: Any, sandbox: Sandbox, frame: dict[str, Any], by_token: Callable[[Any, bytes], Any]) -> None:
    """An ``ask`` frame from ``sandbox`` (validated by the wire schema): call the actor that
    ``by_token(session, token)`` finds (``actor.by_token``), answer when done. Runs in the
    session's loop (the sandbox's reader)."""
    seq, req_id, host = frame["seq"], frame["id"], session._ensure_open()
    actor = by_token(session, frame["token"])
    if actor is None:
        _tell(host, sandbox, req_id, seq, error=("LookupError", "no live actor of this session has that handle "
                                                  "(it was killed, or died with no restart left)"))
        return
    method = frame["method"]
    if method not in actor.methods:
        _tell(host, sandbox, req_id, seq, error=("AttributeError", f"actor {actor.label} has no method {method!r}"))
        return
    try:
        value = _plain.decode(frame["args"])
    except _plain.Malformed as exc:
        _tell(host, sandbox, req_id, seq, error=("TypeError", f"the arguments are not valid plain data: {exc}"))
        return
    if not (type(value) is tuple and len(value) == 2 and type(value[0]) is tuple and type(value[1]) is dict
            and all(type(k) is str for k in value[1])):
        _tell(host, sandbox, req_id, seq, error=("TypeError", "the arguments must be (args tuple, kwargs dict with str keys)"))
        return
    if _pending.get(sandbox, 0) >= MAX_PENDING_ASKS:
        _tell(host, sandbox, req_id, seq, error=("RuntimeError", f"more than {MAX_PENDING_ASKS} actor calls of this sandbox "
                                                   "wait already; wait for some results first"))
        return
    _pending[sandbox] = _pending.get(sandbox, 0) + 1
    ref = actor.call(method, value[0], value[1])
    ref.add_done_callback(lambda done: _answer(host, sandbox, req_id, seq, done))


def _answer(host: Any, sandbox: Sandbox, req_id: int, seq: int, ref: Any) -> None:
    _pending[sandbox] = _pending.get(sandbox, 1) - 1
    try:
        value = ref.result()
    except BaseException as exc:  # the call's failure, as the asker's error
        _tell(host, sandbox, req_id, seq, error=(f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc)))
        return
    try:
        data = _plain.encode(value)
    except _plain.NotPlain as exc:  # an actor with unsafe_pickle_results returned an object
        _tell(host, sandbox, req_id, seq, error=("SerializationError", f"the result is not plain data: {exc}"))
        return
    _tell(host, sandbox, req_id, seq, data=data)


def _tell(host: Any, sandbox: Sandbox, req_id: int, seq: int, *, data: bytes | None = None, error: tuple[str, str] | None = None) -> None:
    frame: dict[str, Any] = {"t": "told", "id": req_id, "seq": seq}
    if error is not None:
        frame["type_name"], frame["message"] = error[0], error[1][:65536]
    else:
        frame["data"] = data
    try:
        host.start_soon(_send, sandbox, frame)
    except RuntimeError:  # the session is closing: nobody waits for the answer
        pass


async def _send(sandbox: Sandbox, frame: dict[str, Any]) -> None:
    try:
        await sandbox.link.send(frame)
    except SandboxError:  # the asking sandbox is gone: nobody waits for the answer
        pass
