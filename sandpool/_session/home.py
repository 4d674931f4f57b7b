"""SandboxHome: a session as its sandboxes see it.

A sandbox needs three things from the session that made (or adopted) it: a task host to run its
operations in (opening the session on first use), the runtime its sandboxes come from, and a place
in the session's list of sandboxes to stop at close. The session owns its home and fills in the
host and runtime as it opens; sandboxes use only these public members, never the session's own state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._config import SandboxDefaults
    from .._core.opref import TaskHost
    from .._runtime.contract import Runtime

__all__ = ["SandboxHome"]


class SandboxHome:
    """Where a session's sandboxes run, what makes them, and which ones it stops when it closes."""

    def __init__(self, defaults: SandboxDefaults, open_host: Callable[[], TaskHost],
                 hold_runtime: Callable[[], Awaitable[None]],
                 on_ask: Callable[[Any, dict[str, Any]], None] | None = None) -> None:
        self.defaults = defaults
        self._open_host = open_host
        self._hold_runtime = hold_runtime
        #: what answers a sandbox's ``ask`` (code inside calls an actor through a handle it was given)
        self.on_ask = on_ask
        #: the session's task host once it is open (set by the session)
        self.task_host: TaskHost | None = None
        #: the session's runtime once it is open (set by the session)
        self.runtime: Runtime | None = None
        #: the sandboxes the session stops when it closes, by id()
        self.tracked: dict[int, Any] = {}

    @property
    def opened(self) -> bool:
        """True once the session runs (its task host exists)."""
        return self.task_host is not None

    def host(self) -> TaskHost:
        """The session's task host, opening the session (in the background thread) on first use."""
        return self.task_host if self.task_host is not None else self._open_host()

    async def ready(self) -> Runtime:
        """The runtime, opened: a sync session opens its runtime when its first sandbox needs it."""
        await self._hold_runtime()
        assert self.runtime is not None
        return self.runtime

    def track(self, sandbox: Any) -> None:
        self.tracked[id(sandbox)] = sandbox

    def forget(self, sandbox: Any) -> None:
        """``sandbox`` was stopped: the session need not stop it again, nor keep it alive."""
        self.tracked.pop(id(sandbox), None)

    def endpoint(self) -> str | None:
        """Where the session's sandboxes live (a runtime's endpoint), once it is open."""
        return getattr(self.runtime, "endpoint", None)
