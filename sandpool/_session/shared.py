"""Sandboxes on a shared runtime (a ``sandpool serve`` server, an engine): finding them, and their handles.

A handle built from a server's record knows the sandbox's state but holds no connection; it
attaches to the sandbox's data plane on first use (exec, files, calls). Handles are per process:
finding a sandbox this process already holds (created or found through any session on the same
server) returns that same object. Local sandboxes are found in this process (``KNOWN``).
The handles' own part is :class:`FoundHandles`, a base class of ``Sandbox``: it changes only
the sandbox's own state, through its lifecycle's transition function.
"""

from __future__ import annotations

import builtins
import os
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast


from .._config import SandboxStatus
from .._core.lifecycle import Event
from .._core.opref import OperationRef
from .._errors import SandboxNotFoundError, SandboxNotRunningError, SandboxUnavailableError
from .parts import SandboxParts

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord
    from .home import SandboxHome
    from .sandbox import Sandbox
    from .session import Session

ENV_ADDRESS, ENV_TOKEN = "SANDPOOL_ADDRESS", "SANDPOOL_TOKEN"
#: ``SANDPOOL_RUNTIME=slurm`` places sandboxes with Slurm (options: ``SANDPOOL_SLURM_*``); unset or "local": here.
ENV_RUNTIME = "SANDPOOL_RUNTIME"


def resolve_address(address: str | None) -> str | None:
    """``address``, else ``$SANDPOOL_ADDRESS``, else None (this process's local runtime)."""
    if address is not None and (not isinstance(address, str) or not address):
        raise ValueError(f"address must be 'host:port', 'tls://host:port' or 'unix:/path', got {address!r}")
    return address or os.environ.get(ENV_ADDRESS) or None


def engine_runtime() -> Any:
    """A new engine runtime named by ``$SANDPOOL_RUNTIME`` ("slurm"), or None ("local" or unset)."""
    name = os.environ.get(ENV_RUNTIME, "").strip().lower()
    if name in ("", "local"):
        return None
    if name == "slurm":
        from .._runtime.slurm.runtime import SlurmRuntime

        return SlurmRuntime.from_environment()
    raise ValueError(f"{ENV_RUNTIME}={name!r} is not a runtime; use 'local' or 'slurm', or unset it")


def selects_shared(address: str | None) -> bool:
    """True when sandboxes are looked up on a shared runtime: a server address, or an engine runtime."""
    return bool(resolve_address(address)) or os.environ.get(ENV_RUNTIME, "").strip().lower() not in ("", "local")


#: Every sandbox of this process by id: what Sandbox.list / from_id search. Weak: a live sandbox is
#: held by its session (or its reader task), a forgotten finished one may go.
KNOWN: weakref.WeakValueDictionary[str, Sandbox] = weakref.WeakValueDictionary()


def spawn_find(hidden: Any, address: str | None, token: str | None, **query: Any) -> OperationRef[Any]:
    """Ask the hidden session for ``address`` (it adopts nothing; ``hidden`` is Sandbox._hidden()):
    one handle if ``sandbox_id`` was asked."""
    session: Session = hidden.default_session(address=address, token=token)
    if "sandbox_id" in query:
        return session.from_id(query["sandbox_id"], adopt=False)
    return session.list(adopt=False, **query)


def news_of(record: SandboxRecord) -> dict[str, Any]:
    """A server-reported state as the data of a REPORTED lifecycle event."""
    return dict(status=SandboxStatus.parse(record.status or "unspecified"), returncode=record.returncode,
                reason=record.status_reason)


class FoundHandles(SandboxParts):
    """Sandbox's part for finding sandboxes, and for handles of those found on a shared runtime (a
    base class of ``Sandbox``)."""

    @classmethod
    def list(cls, *, tags: Sequence[str] | None = None, status: str | SandboxStatus | None = None,
             show_terminated: bool = False, address: str | None = None,
             token: str | None = None, runner_ids: Sequence[str] | None = None) -> OperationRef[list[Sandbox]]:
        """Sandboxes carrying every tag in ``tags`` (non-terminal unless asked) and running on one of
        ``runner_ids`` (if given): this process's, or with ``address`` (or ``$SANDPOOL_ADDRESS``)
        every one of that server's, whoever made them."""
        wanted = SandboxStatus.parse(status) if status is not None else None
        if isinstance(tags, str):
            raise TypeError(f"tags must be a list of strings, not a string; use tags=[{tags!r}]")
        runners = runner_filter(runner_ids)
        if selects_shared(address):
            return spawn_find(cls._hidden(), address, token, tags=tuple(tags or ()),
                              status=wanted.value if wanted else None, show_terminated=show_terminated,
                              runner_ids=runners)
        found = [sb for sb in list(KNOWN.values()) if _matches(sb, tags or (), wanted, show_terminated)]
        return OperationRef.completed(on_runners(found, runners))

    @classmethod
    def from_id(cls, sandbox_id: str, *, address: str | None = None,
                token: str | None = None) -> OperationRef[Sandbox]:
        """The sandbox with this id (on the server at ``address`` or ``$SANDPOOL_ADDRESS`` if set);
        SandboxNotFoundError if there is none."""
        if selects_shared(address):
            return spawn_find(cls._hidden(), address, token, sandbox_id=sandbox_id)
        sandbox = KNOWN.get(sandbox_id)
        if sandbox is None:
            return OperationRef.failed(SandboxNotFoundError(f"no sandbox {sandbox_id!r}", sandbox_id=sandbox_id))
        return OperationRef.completed(sandbox)

    @classmethod
    async def _find(cls, home: SandboxHome, **query: Any) -> builtins.list[Sandbox]:  # list: the method above
        """Handles for the sandboxes ``home``'s runtime finds (see ``Runtime.find``)."""
        records = await (await home.ready()).find(**query)
        return [cls._handle_for(home, record) for record in records]

    @classmethod
    def _handle_for(cls, home: SandboxHome, record: SandboxRecord) -> Sandbox:
        """This process's handle for ``record``'s sandbox: the one it already holds, or a new one."""
        known = KNOWN.get(record.sandbox_id)
        if known is not None and known._hear(home, record):
            return known
        sandbox = cast("Sandbox", cls(_home=home, _spec=record.spec))  # (cls is Sandbox: the one class with this part)
        sandbox._found(record)
        KNOWN[record.sandbox_id] = sandbox
        return sandbox

    def _found(self, record: SandboxRecord) -> None:
        """Start as a handle of a sandbox that already exists, in the state its server reported."""
        self._record = record
        self._start_ref = OperationRef.completed(None)
        self._started.set()
        self._advance(Event.REPORTED, settle=True, **news_of(record))

    def _hear(self, home: SandboxHome, record: SandboxRecord) -> bool:
        """Whether this handle stands for ``record`` (from ``home``'s runtime): a terminal handle of a
        sandbox the server reports alive is stale. An unattached handle takes the server's news."""
        if self._home.endpoint() != home.endpoint():
            return False
        if self._state.terminal and not SandboxStatus.parse(record.status or "unspecified").is_terminal:
            return False
        if self._record is record and record.channel is None:  # unattached: the server's news is all it has
            self._advance(Event.REPORTED, settle=True, **news_of(record))
        return True

    async def _attach(self) -> None:
        """Connect a found handle to its sandbox's data plane (once) and start its reader."""
        async with self._attach_lock:
            record = self._record
            assert record is not None
            if record.channel is not None:
                return
            try:
                await self._runtime.attach(record.sandbox_id)
            except (SandboxNotRunningError, SandboxNotFoundError) as exc:
                if not isinstance(exc, SandboxUnavailableError):  # it ended meanwhile; the server said so
                    self._advance(Event.ENDED, settle=True, reason=str(exc))
                raise
            self._advance(Event.ATTACHED)
            self._host.nursery.start_soon(self._reader)

    async def _watch(self) -> None:
        """Attach a found handle so that its end reaches it (waiting for completion); a sandbox that
        ended meanwhile is marked so by ``_attach``, and an unreachable server ends the handle."""
        try:
            await self._attach()
        except SandboxUnavailableError as exc:
            assert self._record is not None
            self._record.lost = self._record.lost or str(exc)
            self._advance(Event.FAILED, settle=True, reason=str(exc))
        except (SandboxNotRunningError, SandboxNotFoundError):
            pass  # _attach() has marked it terminal

    def _settle_unattached(self) -> None:
        """A found handle that never attached was stopped: no reader will report its end, so do it here."""
        record = self._record
        assert record is not None
        self._advance(Event.GONE, settle=True, code=record.exit_code, signal=record.exit_signal)


def runner_filter(runner_ids: Sequence[str] | None) -> tuple[str, ...] | None:
    """``runner_ids`` checked, as a tuple; None (or an empty list) filters nothing."""
    if isinstance(runner_ids, str) or not all(isinstance(r, str) and r for r in runner_ids or ()):
        raise TypeError(f"runner_ids must be a list of runner ids (sandpool.list_runners()), got {runner_ids!r}; "
                        f"use e.g. runner_ids=['local']")
    return tuple(runner_ids) if runner_ids else None


def on_runners(found: builtins.list[Sandbox], runner_ids: tuple[str, ...] | None) -> builtins.list[Sandbox]:
    """The sandboxes of ``found`` that run on one of ``runner_ids`` (all of them for None)."""
    return found if runner_ids is None else [sb for sb in found if sb.runner_id in runner_ids]


def _matches(sb: Sandbox, tags: Sequence[str], status: SandboxStatus | None, show_terminated: bool) -> bool:
    if sb.status is None or not all(t in sb.tags for t in tags):
        return False
    if status is not None:
        return sb.status == status
    return show_terminated or not sb.status.is_terminal
