"""Actors: a class whose instance lives in a sandbox of its own, its methods run in call order.

``@session.cls(...)`` gives an ActorClass; ``Env.remote(*args)`` starts one sandbox, constructs
the instance in its call worker and returns an ActorHandle at once; ``handle.step.remote(x)`` is
an OperationRef, ``handle.step(x)`` waits for it. Names (``Env.options(name=...)``,
``session.get_actor``), ``kill`` and restarts are here; the loop side of one actor (its sandbox,
its ordered calls, its death) is ``actor_link``; what a handle becomes inside a sandbox is
``actor_asks``.
"""

from __future__ import annotations

import dataclasses
import inspect
import secrets
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import actor_asks as _asks, actor_refs as _refs, serialize as _serialize
from .actor_link import ActorCall, ActorLink, Phase
from .call import CallRef
from .function import Retries
from .._config import resolve_spec
from .._core.opref import OperationRef, check_not_in_trio
from .._errors import SandboxError

if TYPE_CHECKING:
    from .._session.session import Session

_ENTER = "__sandpool_enter__"


F = TypeVar("F", bound=Callable[..., Any])


def enter(fn: F) -> F:
    """Mark a method of an actor class as a setup hook: run once, in the sandbox, right after
    the instance is constructed (and again after each restart), before any other call. A hook
    that raises makes the actor dead (``ActorDiedError``, the hook's exception as cause)."""
    if not callable(fn):
        raise TypeError(f"@sandpool.enter marks a method, got {type(fn).__name__} {fn!r}")
    setattr(fn, _ENTER, True)
    return fn


@dataclasses.dataclass(frozen=True)
class _Options:
    """An actor class's options (``options()`` changes them for one actor)."""

    name: str | None = None
    max_restarts: int = 0
    retries: int = 0
    max_concurrency: int | None = None
    unsafe_pickle_results: bool = False

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name or len(self.name) > 256):
            raise ValueError(f"name must be a non-empty string of at most 256 characters or None, got {self.name!r}")
        for field in ("max_restarts", "retries"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be an int >= 0, got {value!r}; use e.g. {field}=2")
        if self.max_concurrency is not None and (isinstance(self.max_concurrency, bool) or not isinstance(
                self.max_concurrency, int) or self.max_concurrency < 1):
            raise ValueError(f"max_concurrency must be an int >= 1 or None, got {self.max_concurrency!r}; use "
                             "e.g. max_concurrency=8 for an actor whose async methods may run at once")
        if not isinstance(self.unsafe_pickle_results, bool):
            raise TypeError(f"unsafe_pickle_results must be True or False, got {self.unsafe_pickle_results!r}")


class ActorClass:
    """A class whose instances live in sandboxes. Made by ``@session.cls(...)``.

    ``Env.remote(*args, **kwargs)`` starts an actor and returns its ActorHandle at once;
    ``Env.options(name=..., max_restarts=...)`` the same class with other options for the actors
    it starts. Calling ``Env(...)`` raises TypeError (use ``.remote``).
    """

    def __init__(self, cls: type, session: Session, overrides: dict[str, Any], options: _Options) -> None:
        if not inspect.isclass(cls):
            raise TypeError(f"@session.cls needs a class, got {type(cls).__name__} {cls!r}")
        self._cls, self._session, self._overrides, self._options = cls, session, overrides, options
        self.__name__, self.__qualname__ = cls.__name__, cls.__qualname__
        self.__doc__, self.__module__ = cls.__doc__, cls.__module__
        self._spec = resolve_spec(session.defaults, **overrides)  # bad options fail here
        members = inspect.getmembers(cls, callable)
        self._methods = frozenset(n for n, _ in members if not n.startswith("_"))
        self._enter = tuple(n for n, v in members if getattr(v, _ENTER, False))

    def __repr__(self) -> str:
        return (f"<ActorClass {self.__qualname__} image={self._spec.container_image} "
                f"max_restarts={self._options.max_restarts}>")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self.__qualname__} is not called directly; use "
                        f"{self.__name__}.remote(...) to start an actor")

    def options(self, *, name: str | None = None, max_restarts: int | None = None, retries: int | None = None,
                max_concurrency: int | None = None, unsafe_pickle_results: bool | None = None) -> ActorClass:
        """This class with other options for the actors it starts (``name`` makes a named actor,
        found with ``session.get_actor(name)``)."""
        changes: dict[str, Any] = {k: v for k, v in dict(name=name, max_restarts=max_restarts, retries=retries,
                                         max_concurrency=max_concurrency,
                                         unsafe_pickle_results=unsafe_pickle_results).items() if v is not None}
        return ActorClass(self._cls, self._session, self._overrides, dataclasses.replace(self._options, **changes))

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        """Start an actor: one sandbox, the instance ``cls(*args, **kwargs)`` in it. Returns its
        handle at once; calls made through it wait until the instance exists.

        Raises SerializationError (naming the culprit) if the class or an argument does not pickle,
        ValueError if the name is taken by a live actor of the session. A constructor that raises
        makes the actor dead: its calls raise ActorDiedError with that exception as cause.
        """
        session, options = self._session, self._options
        if session._closed:
            raise SandboxError("this session is closed; open a new Session to start actors")
        actor_id = secrets.token_hex(8)
        data = _serialize.dumps_args((actor_id, self._cls, args, kwargs, self._enter), {}, f"{self.__qualname__}()")
        link = ActorLink(session, self._overrides, self.__qualname__, actor_id, data, name=options.name,
                         max_restarts=options.max_restarts, retries=options.retries,
                         pickled=options.unsafe_pickle_results, concurrency=options.max_concurrency or 1)
        host = session._ensure_open()
        handle = ActorHandle(link, actor_id, self.__qualname__, self._methods, host)
        _registry(session).add(handle, state_of(handle))
        host.start_soon(link.run)
        return handle


class HandleState:
    """An actor handle's own state, and how its calls are made. Kept apart from the handle, whose
    attribute namespace is its actor's methods (``handle.step``); sandpool reaches it through
    :func:`state_of`."""

    __slots__ = ("link", "actor_id", "label", "methods", "host", "token")

    def __init__(self, link: ActorLink, actor_id: str, label: str, methods: frozenset[str], host: Any) -> None:
        self.link, self.actor_id, self.label, self.methods, self.host = link, actor_id, label, methods, host
        self.token = secrets.token_bytes(16)  # what a sandbox holding this handle names it by

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallRef:
        """Call ``method`` in the actor, after the calls made before; its CallRef."""
        link, host = self.link, self.host
        label = f"{self.label}.{method}"
        ref = CallRef(host)
        if _refs.has_refs(args, kwargs):  # other calls' results: in their place once they are in
            call = ActorCall(label, None, ref)
            ref.pool, ref.call = link, call
            link.in_order(host, lambda: link.submit(call))

            def ready(values: tuple[Any, ...], named: dict[str, Any]) -> None:
                call.args = _serialize.dumps_args((self.actor_id, method, *values), named, label)
                link.flush()

            ref.add_done_callback(lambda _: host.call_in_loop(link.flush))  # failed or cancelled: the next go
            _refs.when_resolved(host, ref, args, kwargs, ready)
            return ref
        call = ActorCall(label, _serialize.dumps_args((self.actor_id, method, *args), kwargs, label), ref)
        ref.pool, ref.call = link, call
        if host.in_loop_thread():
            link.submit(call)
        else:  # a sync caller: the call may go straight to the actor's worker from this thread
            link.submit_from_thread(call, host)
        return ref


class ActorHandle:
    """A running actor: ``handle.method.remote(...)`` (an OperationRef) or ``handle.method(...)``
    (waits). Calls run one at a time, in the order they were made. A handle is a value: passed to
    a remote function or another actor, it reaches this same actor there (through this client)."""

    __slots__ = ("_state", "__weakref__")

    def __init__(self, link: ActorLink, actor_id: str, label: str, methods: frozenset[str], host: Any) -> None:
        self._state = HandleState(link, actor_id, label, methods, host)

    def __repr__(self) -> str:
        state = self._state
        link = state.link
        name = f" name={link.name!r}" if link.name else ""
        return f"<ActorHandle {state.label}{name} {link.phase.value} restarts={link.restarts}>"

    def __getattr__(self, name: str) -> ActorMethod:
        state = self._state
        if name in state.methods:
            return ActorMethod(state, name)
        raise AttributeError(f"actor {state.label} has no method {name!r}; its methods: {sorted(state.methods)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return _asks.reduce_handle(self._state)

    @property
    def name(self) -> str | None:
        return self._state.link.name

    @property
    def sandbox_id(self) -> str | None:
        """The id of the sandbox the actor runs in now (None while it starts or restarts)."""
        sandbox = self._state.link.sandbox
        return sandbox.sandbox_id if sandbox is not None else None

    @property
    def alive(self) -> bool:
        """False once the actor is dead for good (killed, or died with no restart left)."""
        return self._state.link.phase is not Phase.DEAD


def state_of(handle: ActorHandle) -> HandleState:
    """``handle``'s state (its link, label, methods, token, and how its calls are made)."""
    return handle._state


class ActorMethod:
    """``handle.method``: ``.remote(...)`` returns an OperationRef, calling it waits."""

    __slots__ = ("_state", "_name")

    def __init__(self, state: HandleState, name: str) -> None:
        self._state, self._name = state, name

    def __repr__(self) -> str:
        return f"<ActorMethod {self._state.label}.{self._name}>"

    def remote(self, *args: Any, **kwargs: Any) -> OperationRef[Any]:
        """Run the method in the actor, after the calls made before; returns its OperationRef.

        Arguments may be other calls' OperationRefs (resolved first). The ref raises the method's
        own exception, ActorDiedError if the actor died before answering, SerializationError for a
        result that is not plain data.
        """
        return self._state.call(self._name, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_not_in_trio(f"calling actor method {self._state.label}.{self._name}()",
                          f"'await handle.{self._name}.remote(...)'")
        return self.remote(*args, **kwargs).result()


def kill(handle: ActorHandle) -> None:
    """End an actor for good: its pending calls raise ActorDiedError, its sandbox stops, its name
    is free again. No restart follows. Returns at once; a dead actor is left as it is."""
    if not isinstance(handle, ActorHandle):
        raise TypeError(f"kill() takes an ActorHandle, got {type(handle).__name__} {handle!r}")
    state = state_of(handle)
    state.link.in_order(state.host, state.link.kill)


class _Registry:
    """A session's actors: handles by name (live ones), and their states by token (for sandboxes
    holding handles)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, ActorHandle] = {}
        self.tokens: dict[bytes, HandleState] = {}

    def add(self, handle: ActorHandle, state: HandleState) -> None:
        name = state.link.name
        with self.lock:
            if name is not None:
                if name in self.names:
                    raise ValueError(f"an actor named {name!r} runs in this session already; get it with "
                                     f"session.get_actor({name!r}), or kill it first")
                self.names[name] = handle
            self.tokens[state.token] = state
        state.link.on_dead.append(lambda link: self.remove(handle, state))

    def remove(self, handle: ActorHandle, state: HandleState) -> None:
        with self.lock:
            if self.names.get(state.link.name or "") is handle:
                del self.names[state.link.name or ""]
            self.tokens.pop(state.token, None)

    def get(self, name: str) -> ActorHandle:
        with self.lock:
            handle = self.names.get(name)
        if handle is None:
            raise ValueError(f"no live actor named {name!r} in this session; start one with "
                             f"Cls.options(name={name!r}).remote(...)")
        return handle


_registries: weakref.WeakKeyDictionary[Any, _Registry] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def _registry(session: Session) -> _Registry:
    with _registries_lock:
        registry = _registries.get(session)
        if registry is None:
            registry = _registries[session] = _Registry()
        return registry


def by_token(session: Session, token: bytes) -> HandleState | None:
    """The state of the session's live actor that a sandbox names by ``token``, or None."""
    registry = _registries.get(session)
    return None if registry is None else registry.tokens.get(token)


def get_actor(session: Session, name: str) -> ActorHandle:
    """``session.get_actor(name)``: the session's live actor of that name (ValueError if none)."""
    if not isinstance(name, str):
        raise TypeError(f"an actor's name is a string, got {type(name).__name__} {name!r}")
    return _registry(session).get(name)


def cls_decorator(session: Session, cls: type | None, options: dict[str, Any]) -> Any:
    """``@session.cls`` and ``@session.cls(...)``: the decorator, or its result."""
    retries = Retries.coerce(options.pop("retries", 0))
    if retries.on:
        raise ValueError("an actor retries only calls its actor's death interrupted (retries=N); a method's "
                         "own exceptions are not retried, as that would change its state twice: drop 'on'")
    actor_options = _Options(**{k: options.pop(k) for k in ("name", "max_restarts", "max_concurrency",
                                                             "unsafe_pickle_results") if k in options},
                             retries=retries.max_retries)
    resolve_spec(session.defaults, **options)  # a typo fails at the decorator line
    if cls is not None:
        return ActorClass(cls, session, options, actor_options)
    return lambda c: ActorClass(c, session, options, actor_options)
