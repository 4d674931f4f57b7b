"""A sandbox's lifecycle as plain data: one frozen state and one pure transition function.

Phases: ``new`` (nothing started) -> ``starting`` -> ``running`` -> ``stopping`` -> ``terminal``.
Nothing leaves ``terminal``; late or stale events are ignored, so the trio code can report every
event it sees without checking order first.
"""

from __future__ import annotations

import dataclasses
import signal as _signal
from dataclasses import dataclass

from .._config import SandboxStatus

#: Status reason of a sandbox killed for going over its memory limit (Kubernetes' word first).
OOM_KILLED = "OOMKilled: the sandbox went over its memory limit and was killed"
_REASONS = {
    "max_lifetime": "max_lifetime_seconds elapsed",
    "idle_timeout": "idle_timeout_seconds elapsed with nothing running",
    "parent_gone": "the sandbox's template process exited",
    "owner_gone": "the sandbox lost its owner",
}


@dataclass(frozen=True)
class Lifecycle:
    phase: str = "new"
    status: SandboxStatus | None = None
    returncode: int | None = None
    reason: str | None = None
    stop_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase == "terminal"


def _terminal(state: Lifecycle, status: SandboxStatus, returncode: int | None, reason: str | None) -> Lifecycle:
    return dataclasses.replace(state, phase="terminal", status=status, returncode=returncode, reason=reason)


def _describe_death(code: int | None, sig: int | None) -> str:
    if sig:
        try:
            name = _signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the sandbox's agent was killed by {name}"
    return f"the sandbox's agent exited with code {code}"


def advance(state: Lifecycle, event: str, **info: object) -> Lifecycle:
    """The state after ``event``. Events: start, running, failed(reason), stop, main_exit(code),
    farewell(reason, code), gone(code, signal, oom_killed)."""
    if state.terminal:
        return state
    if event == "start":
        if state.phase == "new":
            return dataclasses.replace(state, phase="starting", status=SandboxStatus.CREATING)
    elif event == "running":
        if state.phase == "starting":
            return dataclasses.replace(state, phase="running", status=SandboxStatus.RUNNING)
    elif event == "failed":
        return _terminal(state, SandboxStatus.FAILED, None, str(info.get("reason")))
    elif event == "stop":
        if state.phase == "new":
            return _terminal(state, SandboxStatus.TERMINATED, None, "stopped before it started")
        return dataclasses.replace(state, phase="stopping", status=SandboxStatus.TERMINATING, stop_requested=True)
    elif event == "main_exit":
        code = int(info["code"])  # type: ignore[arg-type]
        if code == 0:
            return _terminal(state, SandboxStatus.COMPLETED, 0, "the main command exited")
        return _terminal(state, SandboxStatus.FAILED, code, f"the main command exited with code {code}")
    elif event == "farewell":
        reason = str(info.get("reason"))
        code = info.get("code")
        if reason == "stopped" or state.stop_requested:
            return _terminal(state, SandboxStatus.TERMINATED, int(code) if code is not None else 143, "stopped")
        if reason.startswith("protocol error"):
            return _terminal(state, SandboxStatus.FAILED, code, reason)  # type: ignore[arg-type]
        return _terminal(state, SandboxStatus.TERMINATED, code, _REASONS.get(reason, reason))  # type: ignore[arg-type]
    elif event == "gone":
        code, sig = info.get("code"), info.get("signal")
        if state.stop_requested:
            return _terminal(state, SandboxStatus.TERMINATED, 137 if sig else 143, "stopped")
        if info.get("oom_killed"):
            return _terminal(state, SandboxStatus.FAILED, code, OOM_KILLED)  # type: ignore[arg-type]
        return _terminal(state, SandboxStatus.FAILED, code, _describe_death(code, sig))  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown lifecycle event {event!r}")
    return state
