"""A sandbox as a block: ``with`` / ``async with`` (trio or asyncio) starts it on entry and stops it
on exit, and ``Sandbox.run()`` makes a standalone one. The same contract under every host: the
block's own exception leaves it unchanged, and the sandbox is stopped by the time it has left."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from .._core.hosts import current_host, settle, to_thread
from .parts import SandboxParts

if TYPE_CHECKING:
    from types import TracebackType

    from .._config import SandboxDefaults
    from .._core.opref import OperationRef


class SandboxBlocks(SandboxParts):
    """The ``with`` forms of ``Sandbox`` (a base class of it: it uses its start, stop and session)."""

    def __enter__(self) -> Self:
        self.start().result()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        _finish_stop(self.stop(), exc is not None)

    async def __aenter__(self) -> Self:
        """Wait until the sandbox runs (starting it, and opening a standalone one's session in a
        worker thread so the caller's loop keeps running). A failed or cancelled start stops it."""
        if not self._home.opened:
            await to_thread(self._home.host)
        try:
            await self.start()
        except BaseException:
            await settle(self.stop())
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop the sandbox and wait until it is stopped, whatever the host's cancellation does
        meanwhile; a failure to stop never hides the block's own exception."""
        try:
            await settle(self.stop())
        except Exception:
            if exc is None:
                raise

    @classmethod
    def run(cls, *args: str, defaults: SandboxDefaults | None = None, **options: Any) -> Self:
        """Create and start a sandbox outside any session; ``args`` are the main command and its args.

        From sync code it returns once the sandbox runs. Inside trio or asyncio it returns at once
        (never blocking the loop to open the process's background session), and ``async with`` (or
        ``await sb``) waits until it runs. It is stopped when its ``with`` block ends, or with this
        process, whatever ends it.
        """
        if args:
            options["command"], options["args"] = args[0], list(args[1:])
        sandbox = cls(defaults=defaults, **options)
        if current_host() == "sync":
            sandbox.start().result()
        elif sandbox._opened():
            sandbox.start()
        return sandbox


def _finish_stop(ref: OperationRef[None], exception_in_flight: bool) -> None:
    """Wait for a stop from a sync ``__exit__``; a failure never hides the exception already raised."""
    try:
        ref.result()
    except Exception:
        if not exception_in_flight:
            raise
