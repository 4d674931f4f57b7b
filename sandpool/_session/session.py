"""Session: a nursery of sandboxes. Leaving it, however that happens, stops every one of them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

import trio

from . import shared as _shared
from .._config import SandboxDefaults, SandboxStatus, resolve_spec
from .._errors import SandboxError
from .._functions import actor as _actor
from .._functions import actor_asks as _actor_asks
from .._functions.function import RemoteFunction, Retries, function_decorator
from .._functions.host import Pools
from .._core.hosts import current_host, settle, to_thread
from .._core.opref import OperationRef, TaskHost
from .._functions.pool import PoolStatistics
from .._core.portal import Portal
from .._runtime.contract import Runtime
from .._runtime.local import LocalRuntime
from . import background
from .home import SandboxHome
from .metrics import SessionMetrics
from .poolsandbox import PoolMember
from .sandbox import Sandbox
from .snapshots import SessionSnapshots

log = logging.getLogger("sandpool")

P = ParamSpec("P")
R = TypeVar("R")

#: Grace given to sandboxes when a session closes normally, and when it closes because of an error.
CLOSE_GRACE_SECONDS = 10.0
ERROR_CLOSE_GRACE_SECONDS = 2.0


def _coerce_defaults(defaults: SandboxDefaults | Mapping[str, Any] | None) -> SandboxDefaults:
    if defaults is None:
        return SandboxDefaults()
    if isinstance(defaults, SandboxDefaults):
        return defaults
    if isinstance(defaults, Mapping):
        return SandboxDefaults.from_dict(defaults)
    raise TypeError(f"defaults must be a SandboxDefaults or a mapping, not {type(defaults).__name__}")


class Session(SessionSnapshots):
    """Owns sandboxes: ``with Session(defaults=...) as s`` (sync) or ``async with`` (trio or asyncio).

    Sync sessions, and ``async with`` sessions under asyncio, run in a background trio thread (a
    portal) that the sessions open at the time share with the default LocalRuntime: the last one
    to close stops both. ``async with`` sessions under trio run in the caller's trio loop, as a
    nursery of the calling task. A ``runtime=`` passed in is opened by the session and closed when
    it closes (sessions open at the same time share it: the last one closes it). Either way, closing the session (leaving the block normally, by an
    exception, a cancellation or Ctrl-C) stops all of its sandboxes concurrently and cancels
    everything still running in them; the block's own exception propagates unchanged.
    """

    def __init__(self, defaults: SandboxDefaults | Mapping[str, Any] | None = None, *, runtime: Runtime | None = None,
                 address: str | None = None, token: str | None = None, report_to: list[str] | None = None) -> None:
        self.defaults = _coerce_defaults(defaults)
        self._runtime_arg = runtime
        # a sandpool server's sandboxes (address=, or $SANDPOOL_ADDRESS): a runtime of our own
        self._owned_runtime: Runtime | None = None
        if runtime is not None and address is not None:
            raise ValueError("pass runtime= or address=, not both; address= means RemoteRuntime(address, token)")
        if runtime is None and (resolved := _shared.resolve_address(address)):
            from .._runtime.remote import RemoteRuntime

            self._owned_runtime = RemoteRuntime(resolved, token)
        elif runtime is None:  # $SANDPOOL_RUNTIME=slurm: an engine runtime of our own
            self._owned_runtime = _shared.engine_runtime()
        self._home = SandboxHome(self.defaults, self._ensure_open, self._hold_runtime,  # what its sandboxes see of it
                                 on_ask=lambda sandbox, frame: _actor_asks.on_ask(self, sandbox, frame, _actor.by_token))
        self._admin: TaskHost | None = None  # where close() runs: outside the session's own nursery
        self._portal: Portal | None = None
        self._lease: background.Lease | None = None  # its share of the background portal (sync sessions)
        self._held: Runtime | None = None  # the runtime it holds on the lease's shelf
        self._hold_lock = trio.Lock()
        self._closed = False
        self._close_ref: OperationRef[None] | None = None
        self._open_lock = threading.Lock()
        self._done: trio.Event | None = None
        self._finished: trio.Event | None = None
        self._nursery_cm: Any = None
        self._close_grace = CLOSE_GRACE_SECONDS
        # remote functions' warm pools, by (spec, limit, reuse): they start sandboxes through the factory
        # (pyright: a __slots__ class's callables are taken as methods when matched to a protocol, so
        # PoolMember does not match PoolSandbox for it; mypy checks that it does)
        self._functions = Pools(self.defaults, self._ensure_open,
                                self._start_pool_sandbox,  # pyright: ignore[reportArgumentType]
                                lambda: self._closed)
        self._pools = self._functions.pools
        self._metrics = SessionMetrics(enabled=report_to is None or len(report_to) > 0)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._host else "not_opened"
        running = sum(1 for sb in self._tracked.values() if sb.status == SandboxStatus.RUNNING)
        calls = ""
        if self._pools:
            s = self.statistics()
            calls = (f" pool={s.sandboxes_idle} idle/{s.sandboxes_busy} busy/{s.sandboxes_starting} starting"
                     f" calls={s.calls_queued} queued/{s.calls_running} running/{s.calls_done} done"
                     f"/{s.calls_failed} failed")
        return f"<Session {state} sandboxes={len(self._tracked)} running={running}{calls}>"

    # its task host, runtime and tracked sandboxes live in its home, where its sandboxes read them
    @property
    def _host(self) -> TaskHost | None:
        return self._home.task_host
    _runtime = property(lambda self: self._home.runtime)
    _tracked = property(lambda self: self._home.tracked)

    # -- opening -------------------------------------------------------------------------------

    def _reusable(self) -> bool:
        """True while this (default) session can take more sandboxes: not closed, its portal still
        running and its server not lost."""
        if self._closed or getattr(self._runtime, "lost", None):
            return False
        return self._portal is None or not self._portal.closed

    def _ensure_open(self) -> TaskHost:
        """The session's task host, opening the session in the background thread on first use."""
        if self._host is not None:
            return self._host
        if self._closed:
            raise SandboxError("this session is closed; open a new Session to create sandboxes")
        with self._open_lock:
            if self._host is None:
                self._lease = background.lease()
                self._portal = self._lease.portal
                try:
                    background.call_blocking(self._portal.run, self._open_in_portal)
                except BaseException:
                    self._leave_background()
                    raise
        assert self._host is not None
        return self._host

    async def _open_in_portal(self) -> None:
        assert self._portal is not None and self._lease is not None
        self._admin = self._portal.host
        if self._owned_runtime is not None:  # opened and closed by the session's own task (_serve)
            self._home.runtime = self._owned_runtime
            await self._portal.host.nursery.start(self._serve)
            return
        # the runtime it will use; opened (held) when the first sandbox needs it, so a session
        # that never starts one costs no template
        self._home.runtime = self._lease.shelf.choose(self._runtime_arg)
        if self._runtime_arg is not None:  # the caller's runtime opens now: a bad one fails the open
            await self._hold_runtime()
        try:
            await self._portal.host.nursery.start(self._serve)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_runtime()
            raise

    async def _hold_runtime(self) -> None:
        """Hold the runtime open on the shelf (once); sessions that hold their runtime already: nothing."""
        if self._lease is None or self._held is not None or self._owned_runtime is not None:
            return
        async with self._hold_lock:
            if self._held is None:
                if self._closed:
                    raise SandboxError("this session is closed; open a new Session to create sandboxes")
                self._held = self._home.runtime = await self._lease.shelf.hold(self._runtime_arg)

    async def _release_runtime(self) -> None:
        """Give back the runtime held on the shelf; the last session using it closes it."""
        held, self._held = self._held, None
        if held is not None and self._lease is not None:
            await self._lease.shelf.release(held)

    def _leave_background(self) -> None:
        """Give back the share of the background portal; the last session's stops it (joining its
        thread when called outside trio)."""
        if self._lease is not None:
            self._lease.release()

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._done, self._finished = trio.Event(), trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                if self._owned_runtime is not None:
                    await self._owned_runtime.open(nursery)
                self._home.task_host = TaskHost(nursery, trio.lowlevel.current_trio_token())
                task_status.started()
                try:
                    await self._done.wait()
                finally:
                    if self._owned_runtime is not None:
                        with trio.CancelScope(shield=True):
                            await self._owned_runtime.aclose()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if self._host is None and len(group.exceptions) == 1:  # opening failed: raise that error itself
                raise group.exceptions[0]  # noqa: B904 (its own cause, e.g. the gRPC error, is kept)
            raise
        finally:
            self._finished.set()

    def __enter__(self) -> Session:
        self._ensure_open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self._close_grace = ERROR_CLOSE_GRACE_SECONDS
        try:
            self.close().result()
        except Exception:
            if exc is None:
                raise
            log.warning("closing the session after %r also failed", exc, exc_info=True)
        finally:
            self._leave_background()

    async def __aenter__(self) -> Session:
        if self._host is not None or self._closed:
            raise RuntimeError("this Session is already open or closed; use 'async with Session(...)' once")
        if current_host() != "trio":  # asyncio: the session runs in the portal's loop, as a sync one does
            try:
                await to_thread(self._ensure_open)
            except BaseException:  # cancelled or failed while opening: close what opened
                await settle(self.close())
                raise
            return self
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        self._home.task_host = self._admin = TaskHost(nursery, trio.lowlevel.current_trio_token())
        self._home.runtime = self._runtime_arg or self._owned_runtime or LocalRuntime()
        try:
            await self._runtime.open(nursery)
        except BaseException:
            await self._aexit_nursery()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if self._nursery_cm is None:  # opened in the portal (asyncio): close there
            return await self._aexit_portal(exc)
        return await self._aexit_trio(exc)

    async def _aexit_portal(self, exc: BaseException | None) -> bool:
        if exc is not None:
            self._close_grace = ERROR_CLOSE_GRACE_SECONDS
        try:
            await settle(self.close())
        except Exception:
            if exc is None:
                raise
            log.warning("closing the session after %r also failed", exc, exc_info=True)
        finally:
            await to_thread(self._leave_background)
        return False

    @trio.lowlevel.enable_ki_protection
    async def _aexit_trio(self, exc: BaseException | None) -> bool:
        if exc is not None:
            self._close_grace = ERROR_CLOSE_GRACE_SECONDS
        close_error = None
        with trio.CancelScope(shield=True):
            try:
                await self.close()
            except Exception as error:
                close_error = error
        await self._aexit_nursery()
        if close_error is not None:
            if exc is None:
                raise close_error
            log.warning("closing the session after %r also failed", exc, exc_info=close_error)
        return False

    async def _aexit_nursery(self) -> None:
        """Release the runtime (shielded), then end the nursery; its remaining tasks are cancelled.

        The session opened the runtime in its nursery, so it closes it, a given ``runtime=`` too
        (as a sync session does once no other session uses it).
        """
        with trio.CancelScope(shield=True):
            if self._runtime is not None:
                await self._runtime.aclose()
        self._host.nursery.cancel_scope.cancel()  # type: ignore[union-attr]  # open: _aenter_trio set it
        await self._nursery_cm.__aexit__(None, None, None)

    # -- sandboxes -----------------------------------------------------------------------------

    @property
    def sandbox_count(self) -> int:
        """How many sandboxes this session tracks (and will stop when it closes)."""
        return len(self._tracked)

    def sandbox(self, **overrides: Any) -> Sandbox:
        """A new, not yet started sandbox from the session defaults plus ``overrides``. No I/O."""
        if self._closed:
            raise SandboxError("this session is closed; open a new Session to create sandboxes")
        sandbox = Sandbox(_home=self._home, _spec=resolve_spec(self.defaults, **overrides))
        self._track(sandbox)
        self._metrics.add(sandbox)
        return sandbox

    def adopt(self, sandbox: Sandbox) -> None:
        """Make this session responsible for stopping ``sandbox`` when it closes."""
        if self._closed:
            raise SandboxError("this session is closed; it cannot adopt sandboxes")
        if sandbox.sandbox_id is None:
            raise ValueError("only a started sandbox (with a sandbox_id) can be adopted; start it first")
        self._track(sandbox)

    def _track(self, sandbox: Sandbox) -> None:
        sandbox._belong_to(self._home)

    def list(self, *, tags: Sequence[str] | None = None, status: str | SandboxStatus | None = None,
             show_terminated: bool = False, adopt: bool = False,
             runner_ids: Sequence[str] | None = None) -> OperationRef[list[Sandbox]]:
        """Sandboxes carrying the session's default tags plus ``tags``, on one of ``runner_ids`` if
        given (``"local"``, or Slurm nodes: ``sandpool.list_runners()``); ``adopt=True`` tracks them."""
        if isinstance(tags, str):
            raise TypeError(f"tags must be a list of strings, not a string; use tags=[{tags!r}]")
        merged = self.defaults.merge_tags(tags or ())
        runners = _shared.runner_filter(runner_ids)
        if self._asks_runtime():  # ask this session's server or engine
            wanted = SandboxStatus.parse(status).value if status is not None else None
            return OperationRef.spawn(self._ensure_open(), self._find, adopt, dict(
                tags=merged, status=wanted, show_terminated=show_terminated), runners)
        found = Sandbox.list(tags=merged, status=status, show_terminated=show_terminated,
                             runner_ids=runners).result()
        if adopt:
            for sandbox in found:
                self.adopt(sandbox)
        return OperationRef.completed(found)

    def from_id(self, sandbox_id: str, *, adopt: bool = True) -> OperationRef[Sandbox]:
        """The sandbox with ``sandbox_id``, adopted by this session unless ``adopt=False``."""
        if self._asks_runtime():  # ask this session's server or engine
            return OperationRef.spawn(self._ensure_open(), self._find, adopt, dict(sandbox_id=sandbox_id))
        ref = Sandbox.from_id(sandbox_id)
        if adopt and ref.exception() is None:
            self.adopt(ref.result())
        return ref

    def _asks_runtime(self) -> bool:
        """True when the runtime shares its sandboxes (a server, an engine): lists and lookups go to it."""
        if self._owned_runtime is not None:
            return True
        return self._runtime_arg is not None and self._runtime_arg.shared

    async def _find(self, adopt: bool, query: dict[str, Any],
                    runner_ids: tuple[str, ...] | None = None) -> Any:  # a list, or one sandbox by id
        await self._home.ready()
        found = _shared.on_runners(await Sandbox._find(self._home, **query), runner_ids)
        if adopt:
            for sandbox in found:
                self.adopt(sandbox)
        return found[0] if "sandbox_id" in query else found

    # -- remote functions ------------------------------------------------------------------------

    # The overloads keep the decorated function's signature for type checkers: RemoteFunction[P, R].
    @overload
    def function(self, fn: Callable[P, R], /, *, retries: int | Retries | None = ...,
                 timeout_seconds: float | None = ..., max_concurrency: int | None = ..., reuse: bool = ...,
                 **overrides: Any) -> RemoteFunction[P, R]: ...

    @overload
    def function(self, fn: None = ..., /, *, retries: int | Retries | None = ...,
                 timeout_seconds: float | None = ..., max_concurrency: int | None = ..., reuse: bool = ...,
                 **overrides: Any) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...

    def function(self, fn: Callable[..., Any] | None = None, /, *, retries: int | Retries | None = 0,
                 timeout_seconds: float | None = None, max_concurrency: int | None = None, reuse: bool = True,
                 **overrides: Any) -> Any:
        """Decorate a plain function so that it runs in this session's sandboxes: a RemoteFunction.

        Use as ``@session.function`` or ``@session.function(**options)``. ``overrides`` are sandbox
        options on top of the session defaults (one warm pool per distinct result). ``retries``
        (an int, or a Retries naming exception classes to retry too) covers sandboxes dying under
        a call; ``timeout_seconds`` interrupts a call that runs longer; ``max_concurrency`` caps the
        pool's sandboxes (default: the CPUs, divided by the spec's cpu request); ``reuse=False``
        gives every call a fresh sandbox. Raises TypeError/ValueError for bad options, and
        AsyncFunctionError for an ``async def``.
        """
        options = dict(overrides, retries=retries, timeout_seconds=timeout_seconds,
                       max_concurrency=max_concurrency, reuse=reuse)
        return function_decorator(self._functions, fn, options)

    async def _start_pool_sandbox(self, spec: Any) -> PoolMember:
        """The pools' sandbox factory: a sandbox of this session (stopped when it closes), started."""
        if self._closed:
            raise SandboxError("this session is closed; open a new Session to create sandboxes")
        sandbox = Sandbox(_home=self._home, _spec=spec)
        self._track(sandbox)
        self._metrics.add(sandbox)
        await sandbox._ensure_running()
        return PoolMember(sandbox)

    @overload
    def cls(self, cls: type, /, **options: Any) -> _actor.ActorClass: ...

    @overload
    def cls(self, cls: None = ..., /, **options: Any) -> Callable[[type], _actor.ActorClass]: ...

    def cls(self, cls: type | None = None, /, **options: Any) -> Any:
        """Decorate a class so that its instances live in sandboxes (actors): an ActorClass.
        ``@session.cls`` or ``@session.cls(name=, max_restarts=, retries=, max_concurrency=, unsafe_pickle_results=,
        **sandbox_options)``; see docs/actors.md."""
        return _actor.cls_decorator(self, cls, options)

    def get_actor(self, name: str) -> _actor.ActorHandle:
        """The live actor of this session named ``name`` (ValueError if there is none)."""
        return _actor.get_actor(self, name)

    def statistics(self) -> PoolStatistics:
        """Remote-function pools at a glance: sandboxes starting/idle/busy, calls queued/running/
        done/failed/cancelled/retried (summed over the session's pools; safe from any thread)."""
        return self._functions.statistics()

    def get_metrics(self) -> dict[str, Any]:
        """What this session's sandboxes and pools did, as cwsandbox's ``get_metrics`` names it:
        ``cwsandbox/sandboxes_created``, ``executions``, ``exec_completed_ok``/``_nonzero``,
        ``exec_failures``, rates, startup seconds and execs per sandbox (each only once it has a
        value, as there), plus ``sandpool/sandboxes_<status>``, ``sandpool/calls_*`` (remote
        functions) and ``sandpool/cpu_reserved``/``memory_reserved_bytes`` (the requests of its running
        sandboxes). {} with ``Session(report_to=[])``. Safe from any thread; no I/O."""
        return self._metrics.get(self.statistics())

    def log_metrics(self, step: int | None = None, *, reset: bool = True) -> bool:
        """Log ``get_metrics()`` to the active Weights & Biases run, if wandb is installed and a run
        is active (``step``: its step); True if logged. ``reset`` then starts the counts afresh."""
        try:
            import wandb  # type: ignore[import-not-found]  # optional, not a dependency
        except ImportError:
            return False
        metrics = self.get_metrics()
        if getattr(wandb, "run", None) is None or not metrics:
            return False
        wandb.run.log(metrics, **({} if step is None else {"step": step}))
        if reset:
            self._metrics.reset()
        return True

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> OperationRef[None]:
        """Stop every tracked sandbox concurrently and end the session. Idempotent."""
        if self._close_ref is None:
            if self._host is None:
                self._closed = True
                self._close_ref = OperationRef.completed(None)
            else:
                assert self._admin is not None
                self._close_ref = OperationRef.spawn(self._admin, self._close_async)
                # a close() without the with block still gives the background portal back
                self._close_ref.add_done_callback(lambda _ref: self._leave_background())
        return self._close_ref

    async def _close_async(self) -> None:
        self._closed = True
        self._functions.close()  # cancel every call first, so stopping sandboxes retries none of them
        sandboxes = list(self._tracked.values())
        self._tracked.clear()
        failures: list[Exception] = []

        async def stop_one(sandbox: Sandbox) -> None:
            try:
                await sandbox.stop(graceful_shutdown_seconds=self._close_grace)
            except Exception as exc:
                failures.append(exc)

        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for sandbox in sandboxes:
                    nursery.start_soon(stop_one, sandbox)
            if self._done is not None:  # sync session: end its nursery and wait until it is empty
                self._done.set()
                await self._finished.wait()  # type: ignore[union-attr]  # set with _done
            await self._release_runtime()
        if failures:
            raise SandboxError(f"Failed to stop {len(failures)} sandbox(es). Some sandboxes may still be running.") \
                from ExceptionGroup("sandbox stop failures", failures)
