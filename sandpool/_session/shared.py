"""Sandboxes on a shared runtime (a ``sandpool serve`` server): finding them, and their handles.

A handle built from a server's record knows the sandbox's state but holds no connection; it
attaches to the sandbox's data plane on first use (exec, files, calls). Handles are per process:
finding a sandbox this process already holds (created or found through any session on the same
server) returns that same object. Local sandboxes are found in this process (``_sandbox._KNOWN``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import trio

from .._core import lifecycle as _lifecycle
from .._config import SandboxStatus
from .._errors import SandboxNotFoundError, SandboxNotRunningError, SandboxUnavailableError
from .._core.opref import OperationRef

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord
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


def spawn_find(address: str | None, token: str | None, **query: Any) -> OperationRef:
    """Run ``find`` in the hidden session for ``address``; one handle if ``sandbox_id`` was asked."""
    from .session import default_session

    session = default_session(address=address, token=token)
    host = session._ensure_open()

    async def run() -> Any:
        found = await find(session, **query)
        return found[0] if "sandbox_id" in query else found

    return OperationRef.spawn(host, run)


async def find(session: Session, **query: Any) -> list[Sandbox]:
    """Handles for the sandboxes ``session``'s runtime finds (see ``Runtime.find``)."""
    records = await session._runtime.find(**query)
    return [handle_for(session, record) for record in records]


def state_of(record: SandboxRecord) -> _lifecycle.Lifecycle:
    """The lifecycle a server-reported status stands for."""
    status = SandboxStatus.parse(record.status or "unspecified")
    if status.is_terminal:
        return _lifecycle.Lifecycle(phase="terminal", status=status, returncode=record.returncode,
                                    reason=record.status_reason)
    if status == SandboxStatus.TERMINATING:
        return _lifecycle.Lifecycle(phase="stopping", status=status, stop_requested=True)
    if status in (SandboxStatus.PENDING, SandboxStatus.CREATING):  # queued by an engine: attaching waits for it
        return _lifecycle.Lifecycle(phase="running", status=status, reason=record.status_reason)
    return _lifecycle.Lifecycle(phase="running", status=SandboxStatus.RUNNING, reason=record.status_reason)


def handle_for(session: Session, record: SandboxRecord) -> Sandbox:
    """This process's handle for ``record``'s sandbox: the one it already holds, or a new one."""
    from .sandbox import _KNOWN, Sandbox

    known = _KNOWN.get(record.sandbox_id)
    if known is not None and getattr(known._session._runtime, "endpoint", None) == session._runtime.endpoint:
        stale = known._state.terminal and not SandboxStatus.parse(record.status or "unspecified").is_terminal
        if not stale:
            if known._record is record and record.channel is None:  # unattached: the server's news is all it has
                known._state = state_of(record)
                if known._state.terminal:
                    known._terminal.set()
            return known
    sandbox = Sandbox(_session=session, _spec=record.spec)
    sandbox._record = record
    sandbox._state = state_of(record)
    sandbox._start_ref = OperationRef.completed(None)
    sandbox._started.set()
    if sandbox._state.terminal:
        sandbox._terminal.set()
    _KNOWN[record.sandbox_id] = sandbox
    return sandbox


async def attach(sandbox: Sandbox) -> None:
    """Connect a found handle to its sandbox's data plane (once) and start its reader."""
    lock = sandbox.__dict__.setdefault("_attach_lock", trio.Lock())
    async with lock:
        record = sandbox._record
        if record.channel is not None:
            return
        try:
            await sandbox._session._runtime.attach(record.sandbox_id)
        except (SandboxNotRunningError, SandboxNotFoundError) as exc:
            if not isinstance(exc, SandboxUnavailableError):  # it ended meanwhile; the server said so
                sandbox._state = dataclasses.replace(sandbox._state, phase="terminal",
                                                     status=SandboxStatus.TERMINATED, reason=str(exc))
                sandbox._terminal.set()
            raise
        if sandbox._state.status in (SandboxStatus.PENDING, SandboxStatus.CREATING):
            sandbox._state = dataclasses.replace(sandbox._state, status=SandboxStatus.RUNNING, reason=None)
        sandbox._host.nursery.start_soon(sandbox._reader)


async def watch(sandbox: Sandbox) -> None:
    """Attach a found handle so that its end reaches it (waiting for completion); a sandbox that
    ended meanwhile is marked so by ``attach``, and an unreachable server ends the handle."""
    try:
        await attach(sandbox)
    except SandboxUnavailableError as exc:
        sandbox._record.extra.setdefault("lost", str(exc))
        sandbox._state = _lifecycle.advance(sandbox._state, "failed", reason=str(exc))
        sandbox._terminal.set()
    except (SandboxNotRunningError, SandboxNotFoundError):
        pass  # attach() has marked it terminal


def settle_unattached(sandbox: Sandbox) -> None:
    """A found handle that never attached was stopped: no reader will report its end, so do it here."""
    record = sandbox._record
    sandbox._state = _lifecycle.advance(sandbox._state, "gone", code=record.exit_code, signal=record.exit_signal)
    sandbox._terminal.set()
