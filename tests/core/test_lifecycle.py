"""The sandbox lifecycle as a pure state machine."""

import pytest

from sandpool import SandboxStatus
from sandpool._core.lifecycle import Lifecycle, advance


def run(*events):
    state = Lifecycle()
    for event in events:
        name, info = event if isinstance(event, tuple) else (event, {})
        state = advance(state, name, **info)
    return state


def test_normal_path_and_stop():
    """start -> running -> stop -> farewell ends TERMINATED with 143 and reason 'stopped'."""
    assert run("start").status == SandboxStatus.CREATING
    assert run("start", "running").status == SandboxStatus.RUNNING
    state = run("start", "running", "stop", ("farewell", {"reason": "stopped"}))
    assert (state.status, state.returncode, state.reason) == (SandboxStatus.TERMINATED, 143, "stopped")


def test_stop_before_start_is_terminal_without_process():
    """Stopping a never-started sandbox ends it at once."""
    state = run("stop")
    assert state.terminal and state.status == SandboxStatus.TERMINATED


def test_main_command_exit_codes():
    """Main command exit 0 is COMPLETED; non-zero is FAILED with the code in the reason."""
    assert run("start", "running", ("main_exit", {"code": 0})).status == SandboxStatus.COMPLETED
    failed = run("start", "running", ("main_exit", {"code": 3}))
    assert failed.status == SandboxStatus.FAILED and failed.returncode == 3 and "code 3" in failed.reason


def test_unexpected_death_is_failed_with_signal_named():
    """An agent that dies without being asked is FAILED, naming the signal."""
    state = run("start", "running", ("gone", {"code": 137, "signal": 9}))
    assert state.status == SandboxStatus.FAILED and "SIGKILL" in state.reason


def test_terminal_is_sticky_and_late_events_ignored():
    """Nothing leaves a terminal state; a stale 'running' after 'stop' changes nothing."""
    state = run("start", "running", ("main_exit", {"code": 0}), "stop", ("gone", {"code": 1, "signal": None}))
    assert state.status == SandboxStatus.COMPLETED
    stopping = run("start", "stop", "running")
    assert stopping.status == SandboxStatus.TERMINATING


def test_lifetime_farewell_reason():
    """A sandbox ended by max_lifetime_seconds says so."""
    state = run("start", "running", ("farewell", {"reason": "max_lifetime"}))
    assert state.status == SandboxStatus.TERMINATED and "max_lifetime_seconds" in state.reason


def test_events_and_phases_are_enums_and_a_misspelt_event_is_refused():
    """Events are an Enum (their values as strings are accepted too); an unknown name raises
    ValueError naming the valid events; phases are an Enum, so a comparison with a string never matches."""
    from sandpool._core.lifecycle import Event, Phase

    assert run(Event.START).phase is Phase.STARTING
    assert run("start").phase is Phase.STARTING
    with pytest.raises(ValueError, match="unknown lifecycle event 'strat'.*start"):
        advance(Lifecycle(), "strat")
    assert Lifecycle().phase is Phase.NEW and Lifecycle().phase != "new"


def test_a_found_sandbox_starts_from_its_runtimes_report():
    """REPORTED sets the state a shared runtime reported: queued counts as running (attaching waits),
    and ATTACHED then makes it RUNNING; a terminal report ends it; a live report never revives a
    terminal state."""
    from sandpool._core.lifecycle import Event, Phase

    queued = advance(Lifecycle(), Event.REPORTED, status=SandboxStatus.PENDING, returncode=None, reason="queued")
    assert (queued.phase, queued.status) == (Phase.RUNNING, SandboxStatus.PENDING)
    assert advance(queued, Event.ATTACHED).status == SandboxStatus.RUNNING
    done = advance(queued, Event.REPORTED, status=SandboxStatus.COMPLETED, returncode=0, reason="done")
    assert done.terminal and done.returncode == 0
    assert advance(done, Event.REPORTED, status=SandboxStatus.RUNNING) is done


def test_ended_keeps_the_return_code_and_names_the_reason():
    """ENDED (a shared runtime says the sandbox has ended) is TERMINATED with the given reason."""
    from sandpool._core.lifecycle import Event

    running = run("start", "running")
    ended = advance(running, Event.ENDED, reason="not running")
    assert ended.terminal and ended.status == SandboxStatus.TERMINATED and ended.reason == "not running"
