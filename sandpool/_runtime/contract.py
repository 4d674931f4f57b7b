"""The runtime contract: where sandboxes come from. Every runtime (local, remote, engine) has it."""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Callable
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from .._core.channel import FrameChannel
from .._config import SandboxSpec

if TYPE_CHECKING:
    from .._images.snapshots import SnapshotRecord


@dataclass
class SandboxRecord:
    """What a runtime knows about one sandbox. Mutated only inside the runtime's trio loop."""

    sandbox_id: str
    spec: SandboxSpec
    isolation: str
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    agent_pid: int | None = None
    channel: FrameChannel | None = None
    #: set once the agent process is gone; ``exit_code``/``exit_signal`` then say how it ended
    exited: trio.Event = field(default_factory=trio.Event)
    exit_code: int | None = None
    exit_signal: int | None = None
    #: why its runtime lost contact with it (server unreachable, node or job gone); its state is then unknown
    lost: str | None = None
    #: the kernel killed it for going over its memory limit
    oom_killed: bool = False
    #: its server closed the data plane without an exit report (it detached, or went away mid-shutdown)
    detached: bool = False
    #: seconds its server has kept it without an owner (a server's listing), or None
    orphaned_for: float | None = None
    #: the sandbox's root directory on this host (process isolation), for direct file access
    root: str | None = None
    #: a same-host server's way to open a direct worker line to it (its remote-function fast path)
    connect_worker: Callable[..., Any] | None = None
    #: the runner it runs on (a Slurm node's name); None: this machine, the runner "local"
    runner_id: str | None = None
    #: a runtime's own notes about the sandbox, read only by the runtime that wrote them
    extra: dict[str, Any] = field(default_factory=dict)
    #: the state a shared runtime last reported (a status value, its reason, the return code);
    #: local sandboxes keep their state in their Sandbox and leave these None
    status: str | None = None
    status_reason: str | None = None
    returncode: int | None = None


class Runtime(abc.ABC):
    """Creates, starts, stops, lists and attaches sandboxes. All methods run in one trio loop."""

    name: str = "runtime"
    #: True when sandboxes live outside this process, so other processes can find and attach them
    shared: bool = False
    #: where the sandboxes live ("local", or a server address): handles match on it
    endpoint: str = "local"

    @abc.abstractmethod
    async def open(self, nursery: trio.Nursery) -> None:
        """Acquire what the runtime needs (helper processes, connections); tasks go in ``nursery``."""

    @abc.abstractmethod
    def create(self, spec: SandboxSpec) -> SandboxRecord:
        """Reserve a sandbox for ``spec`` (an id, its state); no process starts yet. A remote
        runtime leaves ``sandbox_id`` empty until ``start`` (its server names the sandbox)."""

    @abc.abstractmethod
    async def start(self, record: SandboxRecord) -> FrameChannel:
        """Start the sandbox's agent and return its frame channel after the handshake."""

    def abandon_start(self, record: SandboxRecord) -> None:
        """The sandbox is being stopped while ``start`` still waits (an engine's queue): make that
        ``start`` give up soon. Runtimes whose start never waits long ignore it."""

    @abc.abstractmethod
    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        """Stop politely, wait ``grace_seconds``, then escalate until the sandbox is gone. Shielded."""

    @abc.abstractmethod
    def list(self) -> list[SandboxRecord]:
        """Every sandbox this runtime knows, terminal ones included."""

    async def find(self, *, sandbox_id: str | None = None, tags: tuple[str, ...] = (), status: str | None = None,
                   show_terminated: bool = False) -> builtins.list[SandboxRecord]:
        """Sandboxes of a shared runtime: the one with ``sandbox_id`` (SandboxNotFoundError if none),
        or those carrying every tag in ``tags`` with ``status`` (terminal ones only when asked for,
        or when ``status`` is terminal). Records carry ``status``; a record already returned for an
        id is returned again, updated. Runtimes that are not shared refuse."""
        raise NotImplementedError(f"the {self.name} runtime does not share its sandboxes; search this process's")

    def open_main_log(self, record: SandboxRecord) -> BinaryIO | None:
        """The main command's output as written (stdout and stderr), readable from its start and for as long
        as the caller keeps the file open, even after the sandbox is gone; None where the runtime has none."""
        return None

    def main_log_lines(self, record: SandboxRecord, *, follow: bool, tail_lines: int | None, since: float | None,
                       timestamps: bool) -> AsyncIterator[str]:
        """The main command's log as ``stream_logs`` yields it, for a runtime whose log lives elsewhere
        (``open_main_log`` gave None): a sandpool server's. Others refuse with NotSupportedLocallyError."""
        from .._errors_cw import NotSupportedLocallyError

        raise NotSupportedLocallyError(f"sandbox {record.sandbox_id}: the {self.name} runtime keeps no "
                                       f"main-command log to stream", feature="stream_logs")

    async def snapshot(self, record: SandboxRecord, trigger: str = "manual") -> SnapshotRecord:
        """Capture the running sandbox's filesystem; the snapshot's record (``_images.snapshots``).
        Runtimes without snapshots refuse with SnapshotNotSupportedError."""
        from .._errors_cw import SnapshotNotSupportedError

        raise SnapshotNotSupportedError(f"sandbox {record.sandbox_id}: the {self.name} runtime takes no snapshots; "
                                        f"use a local session or a sandpool server's",
                                        sandbox_id=record.sandbox_id, feature="snapshot")

    def join_pod(self, record: SandboxRecord, primary: SandboxRecord) -> None:
        """Before ``start(record)``: start it as a further container of ``primary``'s pod (in its
        network namespace; see ``sandpool._pods``). Runtimes without pods refuse."""
        from .._errors_cw import NotSupportedLocallyError

        raise NotSupportedLocallyError(f"sandbox {primary.sandbox_id}: the {self.name} runtime runs one container per "
                                       f"sandbox; several containers need a local session", feature="containers")

    async def attach(self, sandbox_id: str) -> FrameChannel:
        """A frame channel to a sandbox started elsewhere (set as its record's ``channel``, for a
        record that ``find`` returned); runtimes without sharing refuse."""
        raise NotImplementedError(f"the {self.name} runtime cannot attach to sandboxes it did not start")

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop every sandbox and release the runtime. Idempotent and shielded."""
