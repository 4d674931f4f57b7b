"""The control plane: the server's sandboxes, the leases of its clients, and the orphan grace rule.

Everything here runs in the server's trio loop; gRPC handler threads call in through
``trio.from_thread``. Request messages are plain dicts (``messages.py``); replies are "info" dicts.

Ownership: a sandbox belongs to the lease of the client that created it. It is *held* while that
lease is alive or while any client is attached to its data plane. A sandbox that nobody holds is
orphaned; after ``orphan_grace`` seconds orphaned, the server stops it (reason "orphaned ...").
``max_lifetime_seconds`` is enforced by the agent itself, held or not. Releasing a lease stops
what it still owns, which is how a closing client's leftovers go.

Requests are checked against ``limits`` (sizes) and the server's ``Policy`` (the isolation floor,
host networking) before the runtime sees them. A Create that fails keeps nothing: no sandbox in
the fleet, no journal entry, no record in the runtime. Each sandbox's spec is turned into plain
data once, at Create, so a List costs a dict per sandbox, whatever their specs hold.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import trio

from .._core import lifecycle as _lifecycle
from .._core.channel import FrameChannel
from .._config import SandboxStatus
from .._isolation import probe
from .._errors import SandboxNotFoundError, SandboxNotRunningError, SandboxUnavailableError
from .._images.snapshots import SnapshotStore
from .._runtime.contract import Runtime, SandboxRecord
from .._session.logs import LogBook, log_pieces
from .._grpc import messages as m
from .._grpc import limits
from .dataplane import Attachment, Hub, Pipe
from .journal import Journal
from .policy import Policy
from .snapshots import SnapshotLedger, ledger_path, not_found

log = logging.getLogger("sandpool.serve")

EXIT_REPORT_SECONDS = 3.0
SWEEP_SECONDS = 0.25
#: Ended sandboxes kept in memory (with their hub, for late attachments); older ones live on in the journal.
KEEP_ENDED = 1000
#: What a Snapshot request may name as its cause (a snapshot record's ``trigger``).
SNAPSHOT_TRIGGERS = ("manual", "on_delete")


@dataclass(eq=False)
class Hosted:
    """One sandbox of this server run."""

    record: SandboxRecord
    owner: str | None
    state: _lifecycle.Lifecycle = field(default_factory=_lifecycle.Lifecycle)
    hub: Hub | None = None
    orphaned_since: float | None = None
    stop_reason: str | None = None
    ended_at: float | None = None
    ended: trio.Event = field(default_factory=trio.Event)
    #: the spec as plain data, made once: whole (Create, Get, Stop) and as List shows it (bounded)
    spec_data: dict[str, Any] = field(default_factory=dict[str, Any])
    spec_summary: dict[str, Any] = field(default_factory=dict[str, Any])
    #: the main command's log, opened at the start and kept (readable after the end) while this is
    log: LogBook | None = None
    #: a pod's further container: its primary's id (not listed: the pod is)
    pod: str | None = None


def decide_orphans(hosted: list[Hosted], live_leases: set[str], now: float, grace: float) -> list[Hosted]:
    """Update each running sandbox's orphan clock; return those whose grace has run out. Pure."""
    expired = []
    for h in hosted:
        if h.state.terminal or h.state.stop_requested:
            continue
        held = (h.owner is not None and h.owner in live_leases) or bool(h.hub and h.hub.attachments)
        if held:
            h.orphaned_since = None
        elif h.orphaned_since is None:
            h.orphaned_since = now
        elif now - h.orphaned_since >= grace:
            expired.append(h)
    return expired


class Fleet:
    """The sandboxes of one server, on one LocalRuntime."""

    def __init__(self, runtime: Runtime, journal: Journal, nursery: trio.Nursery, *, orphan_grace: float,
                 policy: Policy | None = None, auto_level: Callable[[], str] | None = None) -> None:
        """``policy`` (None: none, for a server whose one client is its own user, like a Slurm job's)
        is checked on every Create, with ``auto_level()`` saying what isolation "auto" means here."""
        self.runtime = runtime
        self.policy = policy
        self.auto_level = auto_level
        for level in probe.LEVELS:  # probed once, now (a Create should not wait for it)
            probe.unavailable(level)
        self.journal = journal
        #: the snapshots taken for clients: the only ones they may read, restore or delete
        self.snapshots = SnapshotLedger(ledger_path(journal.path), _snapshot_store())
        self.nursery = nursery
        self.orphan_grace = orphan_grace
        self.sandboxes: dict[str, Hosted] = {}
        self.leases: dict[str, str] = {}  # live lease id -> peer
        self.closing = False

    def __repr__(self) -> str:
        live = sum(1 for h in self.sandboxes.values() if not h.state.terminal)
        return f"<Fleet live={live} leases={len(self.leases)} grace={self.orphan_grace:g}s>"

    # -- leases ------------------------------------------------------------------------------

    def open_lease(self, peer: str) -> str:
        lease = f"lease-{secrets.token_hex(6)}"
        self.leases[lease] = peer
        return lease

    def lease_lost(self, lease: str) -> None:
        """The lease's stream ended without a release: its sandboxes' grace clock may start."""
        self.leases.pop(lease, None)

    async def rpc_release(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        lease = limits.identifier("lease", m.field(request, "lease", str))
        self.leases.pop(lease, None)
        stopped = []
        if m.field(request, "stop", bool, False):
            owned = [h for h in self.sandboxes.values() if h.owner == lease and not h.state.terminal]
            async with trio.open_nursery() as nursery:
                for h in owned:
                    nursery.start_soon(self._stop, h, 0.0, None)
            stopped = [h.record.sandbox_id for h in owned]
        return {"stopped": stopped}

    # -- lifecycle ---------------------------------------------------------------------------

    async def rpc_create(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        if self.closing:
            raise SandboxUnavailableError("the sandpool server is shutting down")
        spec_data = m.field(request, "spec", dict)
        limits.spec_dict(spec_data)
        spec = m.spec_from_dict(spec_data)
        if self.policy is not None:
            assert self.auto_level is not None
            spec = self.policy.admit(spec, self.auto_level)
        if spec.restore_from_snapshot_id is not None and not self.snapshots.admits(spec.restore_from_snapshot_id):
            raise not_found(spec.restore_from_snapshot_id)
        lease = m.field(request, "lease", str, None)
        if lease is not None:
            limits.identifier("lease", lease)
        primary = self._pod_primary(m.field(request, "pod", str, None), lease)
        record = self.runtime.create(spec)
        hosted = Hosted(record, lease, _lifecycle.advance(_lifecycle.Lifecycle(), "start"),
                        spec_data=m.spec_to_dict(spec), pod=None if primary is None else primary.record.sandbox_id)
        hosted.spec_summary = limits.summary(hosted.spec_data)
        self.sandboxes[record.sandbox_id] = hosted  # listed, and stopped by a shutdown, while it starts
        channel: FrameChannel | None = None
        try:
            if primary is not None:  # a pod's further container: into its primary's network namespace
                self.runtime.join_pod(record, primary.record)
            with trio.CancelScope(shield=True):  # a started agent must end up watched, or stopped
                channel = await self.runtime.start(record)
        except BaseException:
            self._discard(hosted)
            raise
        assert channel is not None  # a shielded scope nobody cancels lets no exception go
        record.started_at = time.time()
        hosted.log = LogBook(self.runtime.open_main_log(record))
        hosted.state = _lifecycle.advance(hosted.state, "running")
        hosted.hub = Hub(record.sandbox_id, channel, lambda frame: self._on_event(hosted, frame))
        self.nursery.start_soon(self._watch, hosted)
        self.journal.write(self._entry(hosted))
        return self.info(hosted)

    def _pod_primary(self, pod: str | None, lease: str | None) -> Hosted | None:
        """Create's ``pod``: the running sandbox of the same lease whose pod the new sandbox joins
        as a further container (``sandpool._pods``); SandboxNotFoundError if there is none."""
        if pod is None:
            return None
        primary = self.sandboxes.get(limits.identifier("pod", pod))
        if primary is None or primary.owner is None or primary.owner != lease or primary.pod is not None \
                or primary.state.terminal:
            raise SandboxNotFoundError(f"pod={pod!r}: no running sandbox of this client to join; start the pod's "
                                       f"primary container first", sandbox_id=pod)
        return primary

    def _on_event(self, hosted: Hosted, frame: dict[str, Any]) -> dict[str, Any]:
        """A frame for every client (main_exit, bye): track the state; a farewell of a sandbox the
        server stopped on its own (orphaned, shutdown) carries the server's reason to clients."""
        if frame["t"] == "main_exit":
            hosted.state = _lifecycle.advance(hosted.state, "main_exit", code=frame["code"])
        elif frame["t"] == "bye":
            hosted.state = _lifecycle.advance(hosted.state, "farewell", reason=frame.get("reason"),
                                              code=frame.get("code"))
            if hosted.stop_reason:
                frame = {**frame, "reason": hosted.stop_reason}
        return frame

    async def _watch(self, hosted: Hosted) -> None:
        """Relay the sandbox's frames until its agent is gone, then settle and report its end."""
        record = hosted.record
        assert hosted.hub is not None
        try:
            await hosted.hub.run()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(EXIT_REPORT_SECONDS):
                    await record.exited.wait()
                if not record.exited.is_set():  # the agent left its socket but lives on: make sure
                    await self.runtime.stop(record, 0.0)
                hosted.state = _lifecycle.advance(hosted.state, "gone", code=record.exit_code,
                                                  signal=record.exit_signal)
                if record.channel is not None:
                    await record.channel.aclose()
                self._ended(hosted)
                trailer = {m.TRAILER_CODE: "" if record.exit_code is None else str(record.exit_code),
                           m.TRAILER_SIGNAL: "" if record.exit_signal is None else str(record.exit_signal),
                           m.TRAILER_REASON: self._reason(hosted) or ""}
                hosted.hub.finish(trailer)
                forget = getattr(self.runtime, "forget", None)
                if forget is not None:
                    forget(record.sandbox_id)

    def _discard(self, hosted: Hosted) -> None:
        """A sandbox that never started: forgotten everywhere (its client got the error instead of an id)."""
        self.sandboxes.pop(hosted.record.sandbox_id, None)
        _close_log(hosted)
        forget = getattr(self.runtime, "forget", None)
        if forget is not None:
            forget(hosted.record.sandbox_id)
        hosted.ended.set()

    def _ended(self, hosted: Hosted) -> None:
        hosted.ended_at = time.time()
        hosted.spec_data = hosted.spec_summary = {}  # an ended sandbox's spec is no use, and up to 1000 are kept
        self.journal.write(self._entry(hosted))
        hosted.ended.set()

    async def _stop(self, hosted: Hosted, grace: float, reason: str | None) -> None:
        if hosted.state.terminal:
            return
        if reason and not hosted.stop_reason:
            hosted.stop_reason = reason
        hosted.state = _lifecycle.advance(hosted.state, "stop")
        with trio.CancelScope(shield=True):
            await self.runtime.stop(hosted.record, grace)
            with trio.move_on_after(EXIT_REPORT_SECONDS + 1):
                await hosted.ended.wait()

    async def rpc_stop(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        sandbox_id = limits.identifier("sandbox_id", m.field(request, "sandbox_id", str))
        grace = m.field(request, "grace", (int, float), 10.0)
        if not 0 <= grace < float("inf"):
            raise ValueError(f"grace must be a number of seconds >= 0, got {grace!r}")
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None:
            if sandbox_id in self.journal.history or m.field(request, "missing_ok", bool, False):
                return self._history_info(sandbox_id)
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} on this server", sandbox_id=sandbox_id)
        await self._stop(hosted, float(grace), None)
        return self.info(hosted)

    async def rpc_snapshot(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        """Capture a running sandbox's filesystem into this server's snapshot store; the snapshot's
        record as plain data (its id restores sandboxes of this server: ``restore_from_snapshot_id``)."""
        sandbox_id = limits.identifier("sandbox_id", m.field(request, "sandbox_id", str))
        trigger = m.field(request, "trigger", str, "manual")
        if trigger not in SNAPSHOT_TRIGGERS:
            raise ValueError(f"trigger must be one of {', '.join(SNAPSHOT_TRIGGERS)}, got {trigger!r}")
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None:
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} on this server", sandbox_id=sandbox_id)
        if hosted.state.status != SandboxStatus.RUNNING:
            status = (hosted.state.status or SandboxStatus.PENDING).value
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is {status}: only a running sandbox can be "
                                         f"snapshotted", sandbox_id=sandbox_id)
        snap = await self.runtime.snapshot(hosted.record, trigger)
        self.snapshots.add(snap.snapshot_id)
        reply: dict[str, Any] = snap.to_json()
        return reply

    async def rpc_getsnapshot(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        return await self.snapshots.rpc_get(request)

    async def rpc_listsnapshots(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        return await self.snapshots.rpc_list(request)

    async def rpc_deletesnapshot(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        return await self.snapshots.rpc_delete(request)

    async def rpc_delete(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        reply = await self.rpc_stop({**request, "grace": request.get("grace", 0.0)}, peer)
        deleted = self.sandboxes.pop(reply["sandbox_id"], None)
        if deleted is not None:
            _close_log(deleted)
        self.journal.forget(reply["sandbox_id"])
        return reply

    async def sweep_orphans(self) -> None:
        """Stop sandboxes orphaned for longer than the grace period, forever."""
        while True:
            expired = decide_orphans(list(self.sandboxes.values()), set(self.leases), time.monotonic(),
                                     self.orphan_grace)
            for h in expired:
                log.info("stopping %s: orphaned for %g s", h.record.sandbox_id, self.orphan_grace)
                self.nursery.start_soon(self._stop, h, 0.0,
                                        f"orphaned: no client held it for {self.orphan_grace:g} s")
            self._prune()
            await trio.sleep(SWEEP_SECONDS)

    def _prune(self) -> None:
        """Forget the oldest ended sandboxes beyond KEEP_ENDED (the journal still answers for them)."""
        ended = [h for h in self.sandboxes.values() if h.ended.is_set()]
        if len(ended) > KEEP_ENDED:
            ended.sort(key=lambda h: h.ended_at or 0)
            for h in ended[:-KEEP_ENDED]:
                del self.sandboxes[h.record.sandbox_id]
                _close_log(h)
        self.journal.trim()

    async def aclose(self) -> None:
        """Graceful shutdown: refuse new sandboxes, stop every one (concurrently), close the journal."""
        self.closing = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for h in list(self.sandboxes.values()):
                    nursery.start_soon(self._stop, h, 0.0, m.SHUTDOWN_REASON)
            self.journal.close()
            self.snapshots.close()
            for h in self.sandboxes.values():
                _close_log(h)

    # -- data plane --------------------------------------------------------------------------

    async def attach(self, sandbox_id: str, inbound: Pipe, outbound: Pipe, peer: str) -> Attachment:
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None:
            if sandbox_id in self.journal.history:
                info = self._history_info(sandbox_id)
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has ended: {info['status_reason']}",
                                             sandbox_id=sandbox_id)
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} on this server", sandbox_id=sandbox_id)
        if hosted.hub is None:  # it never started
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is {hosted.state.status}: {self._reason(hosted)}",
                                         sandbox_id=sandbox_id)
        att = hosted.hub.attach(inbound, outbound, peer)
        hosted.orphaned_since = None
        self.nursery.start_soon(hosted.hub.serve, att)
        return att

    def open_log(self, sandbox_id: str) -> BinaryIO | None:
        """A file of its own on a sandbox's main log (see ``LogBook.reopen``), or None."""
        hosted = self.sandboxes.get(sandbox_id)
        return hosted.log.reopen() if hosted is not None and hosted.log is not None else None

    def log_pieces(self, request: dict[str, Any]) -> AsyncIterator[tuple[str, int]]:
        """The lines a Logs request asks for, each with the offset after it (an async iterator), or the
        error for a sandbox whose log this server does not have: never known (NotFound) or ended long
        ago (NotRunning)."""
        sandbox_id, follow, tail, since, timestamps, offset = limits.log_request(request)
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is None:
            if sandbox_id in self.journal.history:
                raise SandboxNotRunningError(f"sandbox {sandbox_id} ended long ago; this server no longer keeps "
                                             f"its log", sandbox_id=sandbox_id)
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} on this server", sandbox_id=sandbox_id)
        book = hosted.log or LogBook(None)
        if offset is not None and offset > book.size():
            raise ValueError(f"offset {offset} is past the end of the log of {sandbox_id} ({book.size()} bytes)")
        return log_pieces(hosted.ended, book, follow, tail, since, timestamps, offset)

    # -- queries -----------------------------------------------------------------------------

    async def rpc_get(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        sandbox_id = limits.identifier("sandbox_id", m.field(request, "sandbox_id", str))
        hosted = self.sandboxes.get(sandbox_id)
        if hosted is not None:
            return self.info(hosted)
        if sandbox_id in self.journal.history:
            return self._history_info(sandbox_id)
        raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} on this server", sandbox_id=sandbox_id)

    async def rpc_list(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        tags = m.field(request, "tags", list, [])
        limits.strings("tags", tags, count=limits.MAX_TAGS, each=limits.MAX_TAG_BYTES)
        status = m.field(request, "status", str, None)
        wanted = SandboxStatus.parse(status) if status is not None else None
        show_terminated = m.field(request, "show_terminated", bool, False) or bool(wanted and wanted.is_terminal)
        infos = [self.info(h, summary=True) for h in self.sandboxes.values() if h.pod is None]
        infos += [self._history_info(i) for i in self.journal.history if i not in self.sandboxes]
        found = [i for i in infos if all(t in i["tags"] for t in tags)
                 and (wanted is None or i["status"] == wanted.value)
                 and (show_terminated or not SandboxStatus(i["status"]).is_terminal)]
        found.sort(key=lambda i: i.get("created_at") or 0)
        return {"sandboxes": found}

    def _reason(self, hosted: Hosted) -> str | None:
        if hosted.state.terminal and hosted.stop_reason:
            return hosted.stop_reason
        return hosted.state.reason

    def info(self, hosted: Hosted, *, summary: bool = False) -> dict[str, Any]:
        """What clients learn of a sandbox; with ``summary`` (List), its spec without its large fields."""
        record, state = hosted.record, hosted.state
        orphaned = None if hosted.orphaned_since is None else time.monotonic() - hosted.orphaned_since
        return {
            "sandbox_id": record.sandbox_id,
            "status": (state.status or SandboxStatus.PENDING).value,
            "status_reason": self._reason(hosted),
            "returncode": state.returncode,
            "tags": list(record.spec.tags),
            "isolation": record.isolation,
            "created_at": record.created_at,
            "started_at": record.started_at,
            "ended_at": hosted.ended_at,
            "spec": hosted.spec_summary if summary else hosted.spec_data,
            "attached": len(hosted.hub.attachments) if hosted.hub else 0,
            "orphaned_for": orphaned,
            "network": m.network_report(record.extra),
        }

    def _entry(self, hosted: Hosted) -> dict[str, Any]:
        info = self.info(hosted)
        return {k: info[k] for k in ("sandbox_id", "status", "status_reason", "returncode", "tags", "isolation",
                                     "created_at", "started_at", "ended_at")}

    def _history_info(self, sandbox_id: str) -> dict[str, Any]:
        entry = self.journal.history.get(sandbox_id)
        if entry is None:  # missing_ok on an id never seen
            return {"sandbox_id": sandbox_id, "status": SandboxStatus.TERMINATED.value,
                    "status_reason": "no such sandbox on this server", "returncode": None, "tags": []}
        return {"returncode": None, "tags": [], "status_reason": None, "spec": None, "attached": 0,
                "orphaned_for": None, **entry}


def _snapshot_store() -> SnapshotStore:
    from .._isolation.snapshots import store

    return store()


def _close_log(hosted: Hosted) -> None:
    if hosted.log is not None:
        hosted.log.close()
