"""A sandbox's lifecycle as plain data: one frozen state and one pure transition function.

Phases (:class:`Phase`): NEW (nothing started) -> STARTING -> RUNNING -> STOPPING -> TERMINAL.
Events (:class:`Event`) are what the trio code observes; :func:`advance` is the only way from one
state to the next. Nothing leaves TERMINAL; late or stale events are ignored, so the trio code can
report every event it sees without checking order first.
"""

from __future__ import annotations

import dataclasses
import enum
import signal as _signal
from dataclasses import dataclass

from .._config import SandboxStatus

__all__ = ["OOM_KILLED", "Event", "Lifecycle", "Phase", "advance", "found", "reason_for"]

#: Status reason of a sandbox killed for going over its memory limit (Kubernetes' word first).
OOM_KILLED = "OOMKilled: the sandbox went over its memory limit and was killed"
_REASONS = {
    "max_lifetime": "max_lifetime_seconds elapsed",
    "idle_timeout": "idle_timeout_seconds elapsed with nothing running",
    "parent_gone": "the sandbox's template process exited",
    "owner_gone": "the sandbox lost its owner",
}


def reason_for(farewell: str) -> str:
    """The status reason a sandbox ended by the agent's ``farewell`` reason (e.g. "parent_gone") gets."""
    return _REASONS.get(farewell, farewell)


class Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    TERMINAL = "terminal"


class Event(enum.Enum):
    """What happened to a sandbox; the keyword data each event carries is listed with it."""

    START = "start"
    RUNNING = "running"
    FAILED = "failed"  # reason
    STOP = "stop"
    MAIN_EXIT = "main_exit"  # code
    FAREWELL = "farewell"  # reason, code
    GONE = "gone"  # code, signal, oom_killed
    ATTACHED = "attached"  # a found handle reached its sandbox's data plane: a queued one now runs
    ENDED = "ended"  # reason: a shared runtime says the sandbox has ended (it was stopped meanwhile)
    REPORTED = "reported"  # status, returncode, reason: a shared runtime's news of a sandbox it found


@dataclass(frozen=True)
class Lifecycle:
    phase: Phase = Phase.NEW
    status: SandboxStatus | None = None
    returncode: int | None = None
    reason: str | None = None
    stop_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase is Phase.TERMINAL


def found(status: SandboxStatus, *, returncode: int | None = None, reason: str | None = None) -> Lifecycle:
    """The state of a sandbox found on a shared runtime, which reported ``status``: its handle
    starts there, not at NEW (a queued one counts as running: attaching waits for it)."""
    if status.is_terminal:
        return Lifecycle(phase=Phase.TERMINAL, status=status, returncode=returncode, reason=reason)
    if status == SandboxStatus.TERMINATING:
        return Lifecycle(phase=Phase.STOPPING, status=status, stop_requested=True)
    if status in (SandboxStatus.PENDING, SandboxStatus.CREATING):
        return Lifecycle(phase=Phase.RUNNING, status=status, reason=reason)
    return Lifecycle(phase=Phase.RUNNING, status=SandboxStatus.RUNNING, reason=reason)


def _terminal(state: Lifecycle, status: SandboxStatus, returncode: int | None, reason: str | None) -> Lifecycle:
    return dataclasses.replace(state, phase=Phase.TERMINAL, status=status, returncode=returncode, reason=reason)


def _describe_death(code: int | None, sig: int | None) -> str:
    if sig:
        try:
            name = _signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the sandbox's agent was killed by {name}"
    return f"the sandbox's agent exited with code {code}"


def _code(value: object) -> int | None:
    """An exit code or signal number of an event's data (the agent's frames carry validated ints)."""
    if value is None or isinstance(value, int):
        return value
    raise TypeError(f"a lifecycle event's code must be an int or None, got {value!r}")


def _reported(info: dict[str, object]) -> Lifecycle:
    status, returncode, reason = info["status"], info.get("returncode"), info.get("reason")
    if not isinstance(status, SandboxStatus):
        raise TypeError(f"a REPORTED lifecycle event needs status=SandboxStatus, got {status!r}")
    return found(status, returncode=_code(returncode), reason=None if reason is None else str(reason))


def _event(event: Event | str) -> Event:
    if isinstance(event, Event):
        return event
    try:
        return Event(event)  # a name as the agent's frames and older callers spell it
    except ValueError:
        raise ValueError(f"unknown lifecycle event {event!r}; use one of sandpool._core.lifecycle.Event: "
                         f"{', '.join(e.value for e in Event)}") from None


def advance(state: Lifecycle, event: Event | str, **info: object) -> Lifecycle:
    """The state after ``event`` (an :class:`Event`; its value as a string is accepted too).
    Data: FAILED(reason), MAIN_EXIT(code), FAREWELL(reason, code), GONE(code, signal, oom_killed)."""
    event = _event(event)
    if event is Event.REPORTED:  # the runtime's word replaces the state; a terminal one stays terminal
        news = _reported(info)
        return state if state.terminal and not news.terminal else news
    if state.terminal:
        return state
    if event is Event.START:
        if state.phase is Phase.NEW:
            return dataclasses.replace(state, phase=Phase.STARTING, status=SandboxStatus.CREATING)
    elif event is Event.RUNNING:
        if state.phase is Phase.STARTING:
            return dataclasses.replace(state, phase=Phase.RUNNING, status=SandboxStatus.RUNNING)
    elif event is Event.ATTACHED:
        if state.phase is Phase.RUNNING and state.status in (SandboxStatus.PENDING, SandboxStatus.CREATING):
            return dataclasses.replace(state, status=SandboxStatus.RUNNING, reason=None)
    elif event is Event.ENDED:
        return _terminal(state, SandboxStatus.TERMINATED, state.returncode, str(info.get("reason")))
    elif event is Event.FAILED:
        return _terminal(state, SandboxStatus.FAILED, None, str(info.get("reason")))
    elif event is Event.STOP:
        if state.phase is Phase.NEW:
            return _terminal(state, SandboxStatus.TERMINATED, None, "stopped before it started")
        return dataclasses.replace(state, phase=Phase.STOPPING, status=SandboxStatus.TERMINATING, stop_requested=True)
    elif event is Event.MAIN_EXIT:
        code = _code(info["code"])
        if code == 0:
            return _terminal(state, SandboxStatus.COMPLETED, 0, "the main command exited")
        return _terminal(state, SandboxStatus.FAILED, code, f"the main command exited with code {code}")
    elif event is Event.FAREWELL:
        reason = str(info.get("reason"))
        code = _code(info.get("code"))
        if reason == "stopped" or state.stop_requested:
            return _terminal(state, SandboxStatus.TERMINATED, code if code is not None else 143, "stopped")
        if reason.startswith("protocol error"):
            return _terminal(state, SandboxStatus.FAILED, code, reason)
        return _terminal(state, SandboxStatus.TERMINATED, code, reason_for(reason))
    elif event is Event.GONE:
        code, sig = _code(info.get("code")), _code(info.get("signal"))
        if state.stop_requested:
            return _terminal(state, SandboxStatus.TERMINATED, 137 if sig else 143, "stopped")
        if info.get("oom_killed"):
            return _terminal(state, SandboxStatus.FAILED, code, OOM_KILLED)
        return _terminal(state, SandboxStatus.FAILED, code, _describe_death(code, sig))
    return state
