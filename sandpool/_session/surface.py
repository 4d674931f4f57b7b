"""The rest of cwsandbox's Sandbox surface, with local meanings (mixed into ``Sandbox``).

- ``get_status()``, ``exec_stats``, ``Sandbox.delete(id)``, ``Sandbox.session(...)``;
- what a cloud sandbox reports (runner, services, volumes, effective runtime class, ...), answered
  for a local sandbox (one runner, ``"local"``; no services or volumes);
- the snapshot bucket methods, which raise ``SnapshotNotSupportedError`` (snapshots themselves:
  ``snapshots``; containers, ``run_from_template`` and ``run_from_file``: ``pod``);
- ``mounted_files``, written before ``start()`` resolves, and the main log kept open at start.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any

import trio

from .._core.lifecycle import Event
from .._config import SandboxStatus
from .._cwextra import LOCAL_RUNNER_ID
from .._errors import (
    SandboxExecutionError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
)
from .._errors_cw import STATE_ISSUE, SnapshotNotSupportedError
from .._core.opref import OperationRef
from .._runtime.contract import Runtime
from .logs import LogBook
from .parts import SandboxParts
from .terminal import TerminalSession, open_shell

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ExecStats", "SurfaceMixin"]

_MOUNT_TIMEOUT_SECONDS = 60.0


class ExecStats:
    """cwsandbox's four exec counters; safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(("exec_count", "exec_completed_ok",
                                                      "exec_completed_nonzero", "exec_failures"), 0)

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def outcome(self, proc: OperationRef[Any]) -> None:
        """A done-callback of an exec: ok (exit 0), nonzero (any other exit, raised by check=True
        or not), or a failure (it never ran to its end: timeout, cancel, a dead sandbox)."""
        try:
            error = proc.exception(timeout=0)
        except BaseException:  # cancelled
            error = SandboxExecutionError("cancelled")
        if error is None:
            self.count("exec_completed_ok" if getattr(proc, "returncode", None) == 0 else "exec_completed_nonzero")
        elif isinstance(error, SandboxExecutionError) and error.exec_result is not None:
            self.count("exec_completed_nonzero")
        else:
            self.count("exec_failures")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def _not_yet(what: str) -> Any:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise SnapshotNotSupportedError(f"{what} is not supported locally yet ({STATE_ISSUE})", feature=what)

    method.__name__ = what
    method.__doc__ = f"Raises SnapshotNotSupportedError: snapshots come with {STATE_ISSUE}."
    return method


class SurfaceMixin(SandboxParts):
    """cwsandbox's remaining Sandbox members (see the module doc)."""

    _log_book: LogBook | None = None

    # -- status and statistics ------------------------------------------------------------------

    def get_status(self) -> SandboxStatus:
        """The current status (pushed by the sandbox, so no request is made); SandboxNotRunningError
        if it was never started."""
        status = self.status
        if status is None:
            raise SandboxNotRunningError("the sandbox has not been started; call start() or use it first",
                                         sandbox_id=self.sandbox_id)
        return status

    @property
    def exec_stats(self) -> dict[str, int]:
        """``exec_count``, ``exec_completed_ok``, ``exec_completed_nonzero``, ``exec_failures`` (a copy)."""
        return self._exec_stats.snapshot()

    def _raise_if_ended_badly(self, raise_on_termination: bool) -> None:
        """cwsandbox's wait_until_complete: a FAILED sandbox raises, and a TERMINATED one unless told not to."""
        state = self._state
        if state.status == SandboxStatus.FAILED:
            raise SandboxFailedError(f"sandbox {self.sandbox_id} failed: {state.reason}", sandbox_id=self.sandbox_id,
                                     status_reason=state.reason)
        if raise_on_termination and state.status == SandboxStatus.TERMINATED:
            raise SandboxTerminatedError(f"sandbox {self.sandbox_id} was stopped ({state.reason})",
                                         sandbox_id=self.sandbox_id)

    # -- what a cloud sandbox reports ----------------------------------------------------------------

    @property
    def runner_id(self) -> str | None:
        return (self._record.runner_id or LOCAL_RUNNER_ID) if self._record is not None else None

    runner_group_id = runner_id

    @property
    def effective_runtime_class(self) -> str | None:
        """The isolation level the sandbox got (a runtime_class asked for is not honoured locally)."""
        return self.isolation

    @property
    def resource_requests(self) -> dict[str, Any] | None:
        res = self._spec.resources
        return dict(res.requests) if res is not None and res.requests else None

    @property
    def resource_limits(self) -> dict[str, Any] | None:
        res = self._spec.resources
        return dict(res.limits) if res is not None and res.limits else None

    @property
    def resource_gpu(self) -> dict[str, Any] | None:
        res = self._spec.resources
        return dict(res.gpu) if res is not None and res.gpu else None

    @property
    def status_updated_at(self) -> float | None:
        return self.started_at or self.created_at

    control = None
    endpoint_share_token = None
    attached_volume_ids: tuple[str, ...] = ()

    def _network_report(self, name: str) -> tuple[Any, ...]:
        return tuple(self._record.extra.get(name, ())) if self._record is not None else ()

    @property
    def exposed_ports(self) -> tuple[tuple[int, str], ...]:
        """(port, service name) of a bridge sandbox's services and exposed ingress ports (docs/network.md)."""
        return self._network_report("exposed_ports")

    @property
    def service_urls(self) -> tuple[tuple[int, str, str], ...]:
        """(port, name, url): ``tcp://127.0.0.1:N`` (``http://`` for an HTTPS endpoint) where the host
        reaches a public service or exposed port, ``tcp://<sandbox address>:port`` for a private one."""
        return self._network_report("service_urls")

    @property
    def service_endpoints(self) -> tuple[Any, ...]:
        """HttpsEndpointStatus of the public services with an HTTPS endpoint (plain HTTP locally)."""
        return self._network_report("service_endpoints")

    @property
    def service_addresses(self) -> tuple[Any, ...]:
        """TlsPassthroughEndpointStatus (``address`` = 127.0.0.1:N) of TLS passthrough services."""
        return self._network_report("service_addresses")

    @property
    def dns_egress_names(self) -> tuple[str, ...]:
        """The DNS names of its egress rules (resolved once, at its start)."""
        return self._network_report("dns_egress_names")
    effective_egress = None
    effective_ingress = None

    # -- snapshot buckets and other creates: not yet --------------------------------------------------------

    get_snapshot_bucket_config = staticmethod(_not_yet("get_snapshot_bucket_config"))
    set_snapshot_bucket_config = staticmethod(_not_yet("set_snapshot_bucket_config"))

    # -- an interactive terminal ----------------------------------------------------------------

    def shell(self, command: list[str] | None = None, *, width: int | None = None,
              height: int | None = None, container: str | None = None) -> TerminalSession:
        """Run ``command`` (default ``["/bin/bash"]``) on a pseudo-terminal of ``width`` x ``height``
        (default 80 x 24): a TerminalSession with ``output``, ``stdin`` and ``resize``. Starts the
        sandbox if needed; no timeout. ValueError for a bad command or size."""
        if container:
            return self._in(container).shell(command, width=width, height=height)
        return open_shell(self._link, command, width, height)

    # -- by id, and sessions -----------------------------------------------------------------

    @classmethod
    def delete(cls, sandbox_id: str, *, missing_ok: bool = False, timeout_seconds: float | None = None,
               address: str | None = None, token: str | None = None, **cloud: Any) -> OperationRef[None]:
        """Stop the sandbox with this id, without a handle (``from_id`` then ``stop``). Resolves when
        it has ended; SandboxNotFoundError when there is none, unless ``missing_ok``."""
        from . import shared as _shared

        unknown = set(cloud) - {"base_url", "auth"}
        if unknown:
            raise TypeError(f"Sandbox.delete() got unexpected keyword {sorted(unknown)[0]!r}")
        if not _shared.selects_shared(address):  # this process's sandboxes: found (or not) at once
            found = cls.from_id(sandbox_id)
            error = found.exception()
            if error is None:
                return found.result().stop(missing_ok=missing_ok)
            return OperationRef.completed(None) if missing_ok and isinstance(error, SandboxNotFoundError) \
                else OperationRef.failed(error)

        async def delete() -> None:
            try:
                sandbox = await cls.from_id(sandbox_id, address=address, token=token)
            except SandboxNotFoundError:
                if missing_ok:
                    return
                raise
            with trio.fail_after(timeout_seconds) if timeout_seconds else contextlib.nullcontext():
                await sandbox.stop(missing_ok=missing_ok)

        return OperationRef.spawn(cls._hidden().default_host(address, token), delete)

    @classmethod
    def session(cls, defaults: Any = None, *, auth: Any = None, **options: Any) -> Session:
        """A new Session (cwsandbox's alias): ``with Sandbox.session(defaults) as s: ...``."""
        session: Session = cls._hidden().Session(defaults, **options)  # auth: no local meaning
        return session

    # -- start-time work (called by Sandbox._start_async) ---------------------------------------------

    def _keep_main_log(self) -> None:
        """Open the main command's log now, while the sandbox runs, so it stays readable after."""
        file = self._open_main_log()
        if file is None and type(self._runtime).open_main_log is Runtime.open_main_log:
            return  # this runtime keeps no logs
        self._log_book = LogBook(file)  # None: its log went with a main command that ended within ms
        weakref.finalize(self, self._log_book.close)

    async def _mount_files(self) -> None:
        """Write the spec's ``mounted_files`` before the start resolves; a failure stops the sandbox
        and raises SandboxFailedError."""
        for entry in self._spec.mounted_files or ():
            path = entry["mount_path"]
            frame = {"t": "write_file", "path": path, "data": entry["file_content"]}
            try:
                await self._file_request(frame, _MOUNT_TIMEOUT_SECONDS)
            except Exception as exc:
                reason = f"could not write mounted file {path!r}: {exc}"
                self._advance(Event.FAILED, reason=reason)  # before the agent's farewell
                assert self._record is not None  # (it was created before it started)
                with trio.CancelScope(shield=True):
                    await self._runtime.stop(self._record, 0.0)
                raise SandboxFailedError(reason, sandbox_id=self.sandbox_id, status_reason=reason) from exc
