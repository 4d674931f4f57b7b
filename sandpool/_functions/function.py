"""RemoteFunction: a plain function run on a warm pool of sandboxes (``@session.function``).

The function is cloudpickled once, on first use, and sent once to each sandbox; arguments are
cloudpickled per call. Results and exceptions come back as plain data (see ``serialize``), or as
cloudpickles for a function made with ``unsafe_pickle_results=True``. Calls go to the session's
pool for the function's sandbox spec (see ``pool``); each returns a ``CallRef`` (an
OperationRef) at once. The session is reached only through ``FunctionHost`` (see ``host``), and
the plumbing that turns arguments into submitted calls is a ``Caller``, which streams share.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import operator
import os
import threading
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import trio

from . import actor_refs as _refs, serialize as _serialize
from .bulk import BULK_BYTES
from .._config import SandboxSpec, resolve_spec
from .._errors import AsyncFunctionError, SerializationError
from .._core.opref import OperationRef, check_not_in_trio
from .pool import MAX_IN_FLIGHT_BYTES, Call, CallRef, Payload, Pool, in_flight_bound

if TYPE_CHECKING:
    from .host import FunctionHost
    from .imap import ResultStream

P = ParamSpec("P")
R = TypeVar("R")

@dataclass(frozen=True)
class Retries:
    """How often a call is retried, and on which of the function's own exceptions.

    A sandbox (or its worker process) dying under a call is always retryable, up to
    ``max_retries`` times, on a fresh sandbox and at once. The function's own exceptions are
    retried only when they are instances of a class in ``on`` (none by default), after
    ``initial_delay * backoff_coefficient ** (n - 1)`` seconds (at most ``max_delay``) before
    retry n. ``retries=3`` means ``Retries(3)``.
    """

    max_retries: int
    on: tuple[type[BaseException], ...] = ()
    backoff_coefficient: float = 2.0
    initial_delay: float = 0.1
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}; use e.g. Retries(3)")
        on = (self.on,) if isinstance(self.on, type) else tuple(self.on)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TypeError(f"on must be exception classes, got {self.on!r}; use e.g. on=(ConnectionError,)")
        object.__setattr__(self, "on", on)
        for name in ("backoff_coefficient", "initial_delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def coerce(cls, value: int | Retries | None) -> Retries:
        """``Retries`` from an int (infrastructure retries only), a Retries, or None (no retries)."""
        if value is None:
            return cls(0)
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        raise TypeError(f"retries must be an int or a Retries, got {type(value).__name__} {value!r}; "
                        "use e.g. retries=3 or retries=Retries(3, on=(ConnectionError,))")

    def retry_on(self, error: BaseException) -> bool:
        return isinstance(error, self.on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based) of a user exception."""
        return min(self.initial_delay * self.backoff_coefficient ** (attempt - 1), self.max_delay)


def default_concurrency(spec: SandboxSpec) -> int:
    """How many sandboxes a pool may run: the CPUs, divided by the spec's cpu request if any."""
    cpus = os.cpu_count() or 1
    request = spec.resources.cpu_request if spec.resources is not None else None
    return max(1, math.floor(cpus / request)) if request else cpus


class RemoteFunction(Generic[P, R]):
    """A function whose calls run in sandboxes. Made by ``@session.function(...)``.

    ``f.remote(*args, **kwargs)`` returns an OperationRef; ``f.map(items)`` a list of them;
    ``f.imap``/``f.starmap`` stream results with bounded work in flight; ``f.local(...)`` runs the
    plain function here. Calling ``f(*args)`` is ``f.remote(*args).result()``: it blocks, so inside
    trio it raises RuntimeError (use ``await f.remote(...)``). Pickled (for example as a global of
    another remote function), a RemoteFunction becomes its plain function, so calls between remote
    functions run locally in the sandbox.

    Results must be plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict,
    set, frozenset, numpy arrays): any other result fails its call with SerializationError, raised
    in the sandbox, so nothing the sandbox makes is unpickled here. ``unsafe_pickle_results=True``
    lifts that for code you trust: results and exceptions then come back as cloudpickles, and
    unpickling them runs whatever code they name, in this process.
    """

    __name__: str  # copied from the function by functools.update_wrapper
    __qualname__: str

    def __init__(self, fn: Callable[P, R], host: FunctionHost, *, retries: int | Retries | None = 0,
                 timeout_seconds: float | None = None, max_concurrency: int | None = None,
                 reuse: bool = True, unsafe_pickle_results: bool = False, **overrides: Any) -> None:
        if not callable(fn):
            raise TypeError(f"@session.function needs a function, got {type(fn).__name__} {fn!r}")
        plain = inspect.unwrap(fn)
        if inspect.iscoroutinefunction(plain) or inspect.isasyncgenfunction(plain):
            raise AsyncFunctionError(
                f"{getattr(fn, '__qualname__', fn)!r} is an async function; remote functions must be "
                "plain 'def' functions (run async code inside with trio.run or asyncio.run)")
        checked = _check_options(retries, timeout_seconds, max_concurrency, reuse, unsafe_pickle_results)
        functools.update_wrapper(self, fn)
        self._fn = fn
        spec = resolve_spec(host.defaults, **overrides)
        self._calls = Caller(fn, self.__qualname__, host, spec, limit=max_concurrency or default_concurrency(spec),
                             reuse=reuse, retries=checked, pickled=unsafe_pickle_results,
                             timeout=None if timeout_seconds is None else float(timeout_seconds))

    def __repr__(self) -> str:
        calls = self._calls
        return (f"<RemoteFunction {self.__qualname__} image={calls.spec.container_image} "
                f"max_concurrency={calls.limit} reuse={calls.reuse}>")

    def __reduce__(self) -> tuple[Any, ...]:
        return operator.itemgetter(0), ((self._fn,),)  # unpickles as the plain function

    @property
    def max_concurrency(self) -> int:
        return self._calls.limit

    # -- the API -------------------------------------------------------------------------------

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> OperationRef[R]:
        """Run one call in the pool; returns its OperationRef at once.

        Raises SerializationError (naming the culprit) before anything is sent if the function or
        an argument does not pickle. The ref raises the function's own exception (its remote
        traceback as ``__cause__``), SandboxDiedError if its sandbox died (after ``retries``),
        SandboxTimeoutError after ``timeout_seconds``, OperationCancelled if cancelled.
        ``ref.cancel()``, and leaving a cancel scope while awaiting it, interrupt the running call.
        """
        calls = self._calls
        pool = calls.pool()
        calls.payload()
        if _refs.has_refs(args, kwargs):  # other calls' results: sent once they are in
            ref = calls.new_ref()

            def send(values: tuple[Any, ...], named: dict[str, Any]) -> None:
                data = _serialize.dumps_args(values, named, self.__qualname__, BULK_BYTES)
                calls.submit(pool, [calls.make_call(pool, ref, data)])

            _refs.when_resolved(calls.loop(), ref, args, kwargs, send)
            return ref
        data = _serialize.dumps_args(args, kwargs, self.__qualname__, BULK_BYTES)
        ref = calls.new_ref()
        calls.submit(pool, [calls.make_call(pool, ref, data)])
        return ref

    def map(self, items: Iterable[tuple[Any, ...]], *, progress: bool = False) -> list[OperationRef[R]]:
        """One call per item, each item a tuple of positional arguments; returns the refs in order.

        Submission is bounded: calls enter the pool as earlier ones finish, so a long list never
        floods memory or the sandboxes; arguments are pickled as they go (an item that does not
        pickle fails its own ref with SerializationError). Each ref is independent: a failure does
        not cancel the others (``imap``/``starmap`` stop at the first error). ``progress=True``
        shows a progress bar (needs tqdm).
        """
        items = list(items)
        for item in items:
            if not isinstance(item, (tuple, list)):
                raise TypeError(f"each item of {self.__qualname__}.map() is a tuple of positional arguments, "
                                f"got {type(item).__name__} {item!r}; use .map([(x,) for x in xs]) or .imap(xs)")
        calls = self._calls
        pool = calls.pool()
        calls.payload()
        refs = [calls.new_ref() for _ in items]
        if progress:
            from .imap import progress_for_refs

            progress_for_refs(refs, self.__qualname__)
        if refs:
            calls.loop().start_soon(self._feed, pool, refs, items)
        return refs  # type: ignore[return-value]  # each CallRef resolves to this function's R

    async def _feed(self, pool: Pool, refs: list[CallRef], items: list[tuple[Any, ...]]) -> None:
        """Submit a map's calls while fewer than its bound are unfinished (runs in the loop)."""
        calls = self._calls
        bound = in_flight_bound(calls.limit)
        state = {"calls": 0, "bytes": 0}
        wake = trio.Event()

        def on_done(size: int, ref: CallRef) -> None:
            state["calls"] -= 1
            state["bytes"] -= size
            wake.set()

        batch: list[Call] = []
        items.reverse()  # taken from the end as each call is made: its item is let go once pickled
        for ref in itertools.islice(refs, len(items)):  # (as zip did, whatever the caller does to refs)
            item = items.pop()
            while state["calls"] >= bound or (state["calls"] and state["bytes"] >= MAX_IN_FLIGHT_BYTES):
                pool.submit(batch)
                batch = []
                await wake.wait()
                wake = trio.Event()
            if ref.done() or pool.closed:
                continue
            call = calls.call(pool, ref, tuple(item), {})
            if call is None:
                continue
            state["calls"] += 1
            state["bytes"] += call.size
            batch.append(call)
            ref.add_done_callback(functools.partial(on_done, call.size))
        pool.submit(batch)

    def imap(self, iterable: Iterable[Any] | AsyncIterable[Any], *, ordered: bool = True,
             max_in_flight: int | None = None, return_exceptions: bool = False,
             progress: bool = False) -> ResultStream[R]:
        """Stream ``f(x)`` for each x of ``iterable`` (sync or async iterable), pulled lazily.

        At most ``max_in_flight`` calls run or wait at once (default: as many as ``map`` keeps, 512
        per sandbox, at least 64), and inputs are pulled only while the arguments of the calls not
        yet consumed stay under 256 MiB (one call always goes).
        Iterate with ``for`` (sync code) or ``async for`` (inside trio). Results come in input order,
        or as they finish with ``ordered=False``. The first failure is raised and cancels the calls
        still in flight, unless ``return_exceptions=True`` (then exceptions are yielded as values).
        Stopping early (break, close(), leaving a cancel scope) cancels what is in flight.
        """
        from .imap import ResultStream

        return ResultStream(self._calls, iterable, star=False, ordered=ordered, max_in_flight=max_in_flight,
                            return_exceptions=return_exceptions, progress=progress)

    def starmap(self, iterable: Iterable[Any] | AsyncIterable[Any], *, ordered: bool = True,
                max_in_flight: int | None = None, return_exceptions: bool = False,
                progress: bool = False) -> ResultStream[R]:
        """``imap`` for argument tuples: each item is unpacked as ``f(*item)``."""
        from .imap import ResultStream

        return ResultStream(self._calls, iterable, star=True, ordered=ordered, max_in_flight=max_in_flight,
                            return_exceptions=return_exceptions, progress=progress)

    def local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the plain function here, in this process."""
        return self._fn(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """``f.remote(*args, **kwargs).result()``: run in a sandbox and wait (not inside trio)."""
        check_not_in_trio(f"calling remote function {self.__qualname__}()",
                          f"'await {self.__name__}.remote(...)'")
        return self.remote(*args, **kwargs).result()


class Caller:
    """A remote function's plumbing, shared with its streams: its pool (from the host), its pickled
    function, new refs, and calls made from arguments and submitted in the loop's thread."""

    def __init__(self, fn: Callable[..., Any], name: str, host: FunctionHost, spec: SandboxSpec, *, limit: int,
                 reuse: bool, retries: Retries, timeout: float | None, pickled: bool) -> None:
        self.fn, self.name, self.host, self.spec = fn, name, host, spec
        self.limit, self.reuse, self.retries, self.timeout, self.pickled = limit, reuse, retries, timeout, pickled
        self._payload: Payload | None = None
        self._pool: Pool | None = None
        self._loop: Any = None  # the session's TaskHost, once known (it never changes)
        self._lock = threading.Lock()

    def payload(self) -> Payload:
        """The pickled function, made on first use (SerializationError if it does not pickle)."""
        if self._payload is None:
            with self._lock:
                if self._payload is None:
                    data = _serialize.dumps_function(self.fn, self.name)
                    self._payload = Payload(self.name, data, _serialize.fn_key(data), pickled=self.pickled)
        return self._payload

    def pool(self) -> Pool:
        """The function's warm pool; SandboxError once the session has closed (its pools close
        with it, so a closed pool sends the question to the host)."""
        pool = self._pool
        if pool is None or pool.closed:
            pool = self._pool = self.host.pool_for(self.spec, self.limit, self.reuse)
        return pool

    def loop(self) -> Any:
        """The session's TaskHost (opening the session on first use)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = self.host.loop()
        return loop

    def new_ref(self) -> CallRef:
        return CallRef(self._loop or self.loop())

    def call(self, pool: Pool, ref: CallRef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call | None:
        """A Call for ``ref``, its cancellation wired to the pool; None (and ``ref`` failed) if the
        arguments do not pickle."""
        try:
            data = _serialize.dumps_args(args, kwargs, self.name, BULK_BYTES)
        except SerializationError as exc:
            ref.set_error(exc)
            return None
        return self.make_call(pool, ref, data)

    def make_call(self, pool: Pool, ref: CallRef, data: bytes | list[bytes]) -> Call:
        call = Call(self._payload or self.payload(), data, ref, self.retries, self.timeout)
        ref.attach(pool, call, self.name)
        return call

    def submit(self, pool: Pool, calls: list[Call]) -> None:
        """Queue ``calls`` in the pool, from any thread."""
        if calls:
            loop = self._loop or self.loop()
            if loop.in_loop_thread():
                pool.submit(calls)
            else:  # a sync caller: a lone call may go straight to an idle worker from this thread
                pool.submit_from_thread(calls, loop)


def _check_options(retries: Any, timeout_seconds: Any, max_concurrency: Any, reuse: Any,
                   unsafe_pickle_results: Any = False) -> Retries:
    """Validate the call options of ``@session.function``; return the retries as a Retries."""
    if timeout_seconds is not None and (isinstance(timeout_seconds, bool) or not isinstance(
            timeout_seconds, (int, float)) or not 0 < timeout_seconds < math.inf):
        raise ValueError(f"timeout_seconds must be a number of seconds > 0 or None, got {timeout_seconds!r}; "
                         "use e.g. timeout_seconds=60")
    if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(
            max_concurrency, int) or max_concurrency < 1):
        raise ValueError(f"max_concurrency must be an int >= 1 or None, got {max_concurrency!r}; "
                         "use e.g. max_concurrency=8, or None for one sandbox per CPU")
    if not isinstance(reuse, bool):
        raise TypeError(f"reuse must be True or False, got {reuse!r}")
    if not isinstance(unsafe_pickle_results, bool):
        raise TypeError(f"unsafe_pickle_results must be True or False, got {unsafe_pickle_results!r}")
    return Retries.coerce(retries)


def function_decorator(host: FunctionHost, fn: Callable[..., Any] | None, options: dict[str, Any]) -> Any:
    """``@session.function`` and ``@session.function(...)``: the decorator, or its result."""
    if fn is not None:
        return RemoteFunction(fn, host, **options)
    # Check every option now, so a typo fails at the decorator line, not at the first call.
    _check_options(options.get("retries"), options.get("timeout_seconds"), options.get("max_concurrency"),
                   options.get("reuse", True), options.get("unsafe_pickle_results", False))
    resolve_spec(host.defaults, **{k: v for k, v in options.items() if k not in _CALL_OPTIONS})
    return lambda f: RemoteFunction(f, host, **options)


_CALL_OPTIONS = ("retries", "timeout_seconds", "max_concurrency", "reuse", "unsafe_pickle_results")
