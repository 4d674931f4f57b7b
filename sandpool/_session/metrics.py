"""``Session.get_metrics``: what a session's sandboxes and pools did, in cwsandbox's shape.

cwsandbox's session counts, for Weights & Biases, the sandboxes it created, their execs by outcome,
their startup times and execs per sandbox, as a flat dict of ``cwsandbox/*`` names. A local session
reports the same names with the same meaning, measured here, and adds what only sandpool knows under
``sandpool/*``: sandboxes by status, remote-function calls, and the cpu and memory its running
sandboxes reserved (their requests: what admission holds for them on this machine).

Each sandbox leaves an entry when the session makes it: a weak reference to the sandbox, whose
status, exec counters and startup time are read while it lives and remembered after, so a session
that made many sandboxes holds no handles (or log files) open for its metrics. (A handle dropped
after execs that no ``get_metrics`` saw takes those execs with it.)
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._functions.pool import PoolStatistics
    from .sandbox import Sandbox

__all__ = ["SessionMetrics"]

_CW = "cwsandbox/"
_LOCAL = "sandpool/"
_EXEC_KEYS = ("exec_count", "exec_completed_ok", "exec_completed_nonzero", "exec_failures")


@dataclass
class _Entry:
    ref: weakref.ref[Sandbox]
    execs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_EXEC_KEYS, 0))
    status: str = "unstarted"
    startup: float | None = None
    cpu: float = 0.0
    memory: int = 0

    def refresh(self) -> None:
        """Read the sandbox's state while it lives (its last state stays once it is gone)."""
        sandbox: Sandbox | None = self.ref()
        if sandbox is None:
            return
        self.status = sandbox.status.value if sandbox.status is not None else "unstarted"
        self.execs = sandbox.exec_stats
        if self.startup is None and sandbox.started_at is not None and sandbox.created_at is not None:
            self.startup = max(0.0, sandbox.started_at - sandbox.created_at)
        resources = sandbox.spec.resources
        if resources is not None:
            self.cpu, self.memory = resources.cpu_request or 0.0, resources.memory_request or 0


class SessionMetrics:
    """The counters of one session. ``add`` from the session; ``get`` from any thread."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # Session(report_to=[]) turns reporting off, as in cwsandbox
        self._lock = threading.Lock()
        self._entries: list[_Entry] = []

    def add(self, sandbox: Sandbox) -> None:
        """Count ``sandbox`` as created by the session (started or not, as cwsandbox counts)."""
        with self._lock:
            self._entries.append(_Entry(weakref.ref(sandbox)))

    def reset(self) -> None:
        """Forget what was counted so far (``log_metrics(reset=True)``)."""
        with self._lock:
            self._entries.clear()

    def get(self, pools: PoolStatistics) -> dict[str, Any]:
        """The metrics as cwsandbox names them, plus sandpool's own (see the module); {} when off."""
        if not self.enabled:
            return {}
        with self._lock:
            entries = list(self._entries)
        for entry in entries:
            entry.refresh()
        execs = [entry.execs for entry in entries]
        total = sum(e["exec_count"] for e in execs)
        ok = sum(e["exec_completed_ok"] for e in execs)
        failures = sum(e["exec_failures"] for e in execs)
        out: dict[str, Any] = {
            f"{_CW}sandboxes_created": len(entries), f"{_CW}executions": total,
            f"{_CW}exec_completed_ok": ok,
            f"{_CW}exec_completed_nonzero": sum(e["exec_completed_nonzero"] for e in execs),
            f"{_CW}exec_failures": failures,
        }
        if total:
            out[f"{_CW}exec_completion_rate"] = ok / total
            out[f"{_CW}exec_failure_rate"] = failures / total
        startups = [e.startup for e in entries if e.startup is not None]
        if startups:
            out.update({f"{_CW}startup_count": len(startups), f"{_CW}avg_startup_seconds": sum(startups) / len(startups),
                        f"{_CW}min_startup_seconds": min(startups), f"{_CW}max_startup_seconds": max(startups)})
        per_sandbox = [e["exec_count"] for e in execs if e["exec_count"]]
        if per_sandbox:
            out.update({f"{_CW}avg_execs_per_sandbox": sum(per_sandbox) / len(per_sandbox),
                        f"{_CW}min_execs_per_sandbox": min(per_sandbox),
                        f"{_CW}max_execs_per_sandbox": max(per_sandbox)})
        for status in sorted({e.status for e in entries}):
            out[f"{_LOCAL}sandboxes_{status}"] = sum(e.status == status for e in entries)
        running = [e for e in entries if e.status == "running"]
        out[f"{_LOCAL}cpu_reserved"] = sum(e.cpu for e in running)
        out[f"{_LOCAL}memory_reserved_bytes"] = sum(e.memory for e in running)
        for name, value in vars(pools).items():
            out[f"{_LOCAL}{name}"] = value
        return out
