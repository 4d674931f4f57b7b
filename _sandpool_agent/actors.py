"""Actors inside a sandbox: instances kept by actor id in the call worker, across calls.

An actor's calls are ordinary ``call`` frames: the functions below travel pickled by reference
(this module is imported by the worker before any call), the class and the arguments by value.
``construct`` makes the instance and runs its setup hooks; ``invoke`` runs one method on it. The
worker runs calls one at a time, in the order they came, so an actor's methods run in call order.
A coroutine method runs to completion on the actor's own event loop (kept across calls). An
actor with ``max_concurrency`` above 1 runs its calls at once as tasks of that loop, advanced by
``invoke_many`` steps (see there).

``ActorGone`` is raised by ``invoke`` when the instance is not here: the worker that held it
died (the agent forked a new one), so the client counts the actor as dead.

Never imports trio or sandpool.
"""

from __future__ import annotations

import inspect

_instances: dict[str, object] = {}
_loops: dict[str, object] = {}


class ActorGone(LookupError):
    """The actor's instance is not in this worker (its worker died and was replaced)."""


def construct(actor_id: str, cls: type, args: tuple, kwargs: dict, enter: tuple[str, ...]) -> None:
    """Make the instance ``cls(*args, **kwargs)`` under ``actor_id``, then call its ``enter``
    hooks (method names, in order). An exception leaves no instance behind."""
    instance = cls(*args, **kwargs)
    for name in enter:
        _finish(actor_id, getattr(instance, name)())
    _instances[actor_id] = instance


def invoke(actor_id: str, method: str, /, *args: object, **kwargs: object) -> object:
    """Call ``method`` of the actor's instance; its return value is the call's result."""
    try:
        instance = _instances[actor_id]
    except KeyError:
        raise ActorGone(f"actor {actor_id} has no instance in this worker (its worker was replaced)") from None
    return _finish(actor_id, getattr(instance, method)(*args, **kwargs))


def invoke_many(actor_id: str, new: list, cancel: list, pickled: bool, poll_seconds: float | None, /) -> list:
    """One step of an actor that runs calls at once (``max_concurrency`` above 1).

    Starts the ``new`` calls (``(ticket, pickle of one invoke's ((actor_id, method, *args),
    kwargs))``) as tasks of the actor's event loop, cancels the running calls whose tickets are in
    ``cancel``, then runs the loop until a call ends, a next call waits to be read (the client sent
    more), or ``poll_seconds`` pass (None: no limit). The tasks advance only while a step runs;
    the client keeps a step out while calls run. Returns ``[(ticket, ok, value or error fields),
    ...]`` for every call that ended, errors as an ``error`` frame's fields (kinds "user",
    "serialization", "cancelled"). Without ``pickled``, a value that is not plain data is that
    call's serialization error.
    """
    try:
        instance = _instances[actor_id]
    except KeyError:
        raise ActorGone(f"actor {actor_id} has no instance in this worker (its worker was replaced)") from None
    loop = _loop(actor_id)
    for ticket in cancel:
        task = _tasks.get(ticket)
        if task is not None:
            task.cancel()  # type: ignore[attr-defined]
    for ticket, data in new:
        _tasks[ticket] = loop.create_task(_run_one(instance, data, pickled))  # type: ignore[attr-defined]
    fd, waiting = _channel[2]()  # type: ignore[index]
    loop.run_until_complete(_progress(fd, 0 if waiting else poll_seconds))  # type: ignore[attr-defined]
    out = []
    for ticket in [t for t, task in _tasks.items() if task.done()]:  # type: ignore[attr-defined]
        task = _tasks.pop(ticket)
        if task.cancelled():  # type: ignore[attr-defined]
            out.append((ticket, False, {"kind": "cancelled", "message": "cancelled"}))
        else:
            out.append((ticket, *task.result()))  # type: ignore[attr-defined]
    return out


_tasks: dict[int, object] = {}  # ticket -> the asyncio task of a call running at once with others


async def _progress(fd: int, seconds: float | None) -> None:
    """Let the tasks run until one ends, ``fd`` becomes readable, or ``seconds`` pass."""
    import asyncio

    if not _tasks or any(t.done() for t in _tasks.values()):  # type: ignore[attr-defined]
        return
    loop = asyncio.get_running_loop()
    woke = loop.create_future()

    def wake(*_: object) -> None:
        if not woke.done():
            woke.set_result(None)

    loop.add_reader(fd, wake)
    for task in _tasks.values():
        task.add_done_callback(wake)  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(woke, seconds)
    except asyncio.TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        for task in _tasks.values():
            task.remove_done_callback(wake)  # type: ignore[attr-defined]


async def _run_one(instance: object, data: bytes, pickled: bool) -> tuple:
    import cloudpickle

    from . import plain as _plain

    try:
        (_, method, *args), kwargs = cloudpickle.loads(data)
        value = getattr(instance, method)(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = await value
    except Exception as exc:  # noqa: BLE001 - the call's own error, described as plain data
        return False, describe_error(exc)
    if not pickled:
        try:
            _plain.encode(value)
        except _plain.NotPlain as exc:
            return False, {"kind": "serialization", "message": f"the result ({type(value).__qualname__}) "
                           f"is not plain data: {exc}"}
    return True, value


def _loop(actor_id: str) -> object:
    """The actor's own event loop, made on first use and kept across calls."""
    loop = _loops.get(actor_id)
    if loop is None:
        import asyncio

        loop = _loops[actor_id] = asyncio.new_event_loop()
    return loop


def describe_error(exc: BaseException) -> dict:
    """A user's exception as the fields of an ``error`` frame of kind "user" (plain data only)."""
    import traceback

    from . import plain as _plain

    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        message = f"<{cls.__name__} with an unprintable message>"
    error = {"kind": "user", "message": message[:65536], "type_name": f"{cls.__module__}.{cls.__qualname__}",
             "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__))[:1 << 20]}
    try:
        error["exc"] = _plain.describe_exception(exc)
    except BaseException:  # noqa: BLE001 - user code (a property, a __dict__) failed: a RemoteError then
        pass
    return error


def _finish(actor_id: str, value: object) -> object:
    """``value``, or the result of running it to completion when it is a coroutine."""
    if not inspect.iscoroutine(value):
        return value
    return _loop(actor_id).run_until_complete(value)  # type: ignore[attr-defined]


# -- handles inside a sandbox: calls through the client ---------------------------------------

_channel: tuple | None = None  # (send, read) of the worker that runs this process's calls
_told: dict[int, dict] = {}
_next_seq = [0]
#: How long one wait for the agent's frames lasts before the answers are looked at again.
_READ_SECONDS = 0.05


class ActorCallError(Exception):
    """An actor call made inside a sandbox failed; ``type_name`` names the original exception."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message = type_name, message


def serve(send, read, call_input) -> None:
    """Called by the worker: how asks leave (``send(frame)``), answers come (``read(timeout)``,
    False once the agent is gone; it hands ``told`` frames to ``told``), and where calls come
    from (``call_input()``: the socket's fd, and whether a next call was read already)."""
    global _channel
    _channel = (send, read, call_input)


def told(frame: dict) -> None:
    _told[frame["seq"]] = frame


class RemoteHandle:
    """An actor handle inside a sandbox: its calls go to the client that owns the actor, which
    runs them in order with the others. Arguments and results are plain data."""

    __slots__ = ("_token", "_label", "_methods")

    def __init__(self, token: bytes, label: str, methods: tuple[str, ...]) -> None:
        self._token, self._label, self._methods = token, label, methods

    def __repr__(self) -> str:
        return f"<ActorHandle {self._label} (through the client)>"

    def __reduce__(self) -> tuple:
        return RemoteHandle, (self._token, self._label, self._methods)

    def __getattr__(self, name: str) -> RemoteMethod:
        if name in self._methods:
            return RemoteMethod(self._token, self._label, name)
        raise AttributeError(f"actor {self._label} has no method {name!r}; its methods: {list(self._methods)}")


class RemoteMethod:
    """``handle.method`` inside a sandbox: the actor's token and label, and the method's name."""

    __slots__ = ("_token", "_label", "_name")

    def __init__(self, token: bytes, label: str, name: str) -> None:
        self._token, self._label, self._name = token, label, name

    def remote(self, *args: object, **kwargs: object) -> AskRef:
        """Send the call now; ``.result()`` of the returned ref waits for its answer."""
        from . import plain as _plain

        if _channel is None:
            raise RuntimeError(f"actor {self._label}: a handle unpickled outside a sandbox's call "
                               "cannot call the actor; use the handle the client made")
        try:
            data = _plain.encode((args, kwargs))
        except _plain.NotPlain as exc:
            raise TypeError(f"the arguments of {self._label}.{self._name}() called inside a sandbox "
                            f"must be plain data: {exc}") from None
        _next_seq[0] += 1
        seq = _next_seq[0]
        _channel[0]({"t": "ask", "seq": seq, "token": self._token, "method": self._name, "args": data})
        return AskRef(seq, f"{self._label}.{self._name}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.remote(*args, **kwargs).result()


class AskRef:
    """The pending answer of an actor call made inside a sandbox."""

    __slots__ = ("_seq", "_label")

    def __init__(self, seq: int, label: str) -> None:
        self._seq, self._label = seq, label

    def result(self) -> object:
        """The call's value (plain data); ActorCallError if it failed."""
        from . import plain as _plain

        while self._seq not in _told:
            if not _channel[1](_READ_SECONDS):  # type: ignore[index]
                raise ActorCallError("ConnectionError", f"{self._label}: the sandbox's agent is gone")
        frame = _told.pop(self._seq)
        if "data" in frame:
            return _plain.decode(frame["data"])
        raise ActorCallError(frame.get("type_name") or "Exception", frame.get("message") or "")
