"""What the parts of ``Sandbox`` use of one another, declared once for type checkers.

``Sandbox`` is assembled from parts (its ``with`` blocks, its agent connection, found handles,
logs, streamed files, snapshots, pods, cwsandbox's surface), each a base class of it in its own module.
A part's methods use the sandbox's state and the other parts' methods; :class:`SandboxParts`, the
base of every part, declares those, so each part type-checks on its own. The declarations exist
for type checkers only: at run time the class is empty, and ``Sandbox`` (or the part named in each
comment) defines every one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import BinaryIO

    import trio

    from .._config import SandboxDefaults, SandboxSpec, SandboxStatus
    from .._core.lifecycle import Event, Lifecycle
    from .._core.opref import OperationRef, TaskHost
    from .._core.routing import Requests
    from .._errors import SandboxError
    from .._runtime.contract import Runtime, SandboxRecord
    from .home import SandboxHome
    from .logs import LogBook
    from .sandbox import AgentLink, Sandbox
    from .session import Session
    from .surface import ExecStats

__all__ = ["SandboxParts"]


class SandboxParts:
    """The base of every part of ``Sandbox`` (see the module doc)."""

    if TYPE_CHECKING:
        # -- Sandbox's state (set in Sandbox.__init__) ------------------------------------------
        _home: SandboxHome
        _spec: SandboxSpec
        _state: Lifecycle
        _record: SandboxRecord | None
        _requests: Requests
        _started: trio.Event
        _terminal: trio.Event
        _attach_lock: trio.Lock
        _start_ref: OperationRef[None] | None
        _stop_ref: OperationRef[None] | None
        _exec_stats: ExecStats
        _link: AgentLink
        _log_book: LogBook | None  # SurfaceMixin's

        def __init__(self, *, defaults: SandboxDefaults | None = None, address: str | None = None,
                     token: str | None = None, _session: Session | None = None,
                     _home: SandboxHome | None = None, _spec: SandboxSpec | None = None,
                     **overrides: Any) -> None: ...

        @staticmethod
        def _hidden() -> Any: ...

        # -- Sandbox's properties and methods -------------------------------------------------------
        @property
        def sandbox_id(self) -> str | None: ...
        @property
        def status(self) -> SandboxStatus | None: ...
        @property
        def returncode(self) -> int | None: ...
        @property
        def isolation(self) -> str | None: ...
        @property
        def created_at(self) -> float | None: ...
        @property
        def started_at(self) -> float | None: ...
        @property
        def _host(self) -> TaskHost: ...
        @property
        def _runtime(self) -> Runtime: ...

        def _opened(self) -> bool: ...
        def _belong_to(self, home: SandboxHome) -> None: ...
        def _advance(self, event: Event, *, settle: bool = False, **info: Any) -> None: ...
        def _spawn(self, async_fn: Callable[..., Awaitable[Any]], *args: object) -> OperationRef[Any]: ...
        def start(self) -> OperationRef[None]: ...
        def stop(self, *, graceful_shutdown_seconds: float = 10.0, missing_ok: bool = False,
                 snapshot_on_stop: bool = False, wait_for_ready: bool = True,
                 request_id: str | None = None) -> OperationRef[None]: ...
        async def _start_async(self) -> None: ...
        async def _stop_async(self, grace: float) -> None: ...
        async def _ensure_running(self) -> None: ...
        def _not_running_error(self) -> SandboxError | None: ...
        def _open_main_log(self) -> BinaryIO | None: ...

        # -- the other parts' -----------------------------------------------------------------------
        @classmethod
        def from_id(cls, sandbox_id: str, *, address: str | None = None,
                    token: str | None = None) -> OperationRef[Sandbox]: ...  # FoundHandles'
        async def _attach(self) -> None: ...  # FoundHandles'
        async def _reader(self) -> None: ...  # AgentConnection's
        async def _file_request(self, frame: dict[str, Any],
                                timeout: float | None) -> bytes | None: ...  # AgentConnection's
        @classmethod
        def run(cls, *args: str, defaults: SandboxDefaults | None = None,
                **options: Any) -> Self: ...  # SandboxBlocks'
        def _in(self, container: str | None) -> Self: ...  # PodMixin's
