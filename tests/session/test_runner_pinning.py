"""``runner_ids`` pinning on this machine, its one runner ``"local"``: honoured, and refused for any
other id with cwsandbox's RunnerNotFoundError naming the runners there are."""

from __future__ import annotations

import pytest

import sandpool
import sandpool.exceptions
from sandpool import RunnerNotFoundError, SandboxDefaults, SandboxStatus, Session


def test_pinning_to_the_local_runner_runs_here():
    """``runner_ids=["local"]`` (the id list_runners() reports) and ``[]`` (no pin) both run."""
    assert [r.runner_id for r in sandpool.list_runners()] == ["local"]
    with Session() as session:
        for pin in (["local"], []):
            assert session.sandbox(runner_ids=pin).exec(["echo", "ok"]).result().stdout == "ok\n"


def test_pinning_to_an_unknown_runner_fails_the_start_and_nothing_else():
    """Any other id fails the start with RunnerNotFoundError (its runner_id set, the message naming
    "local"); the sandbox is FAILED, and the session's other sandboxes keep working."""
    with Session() as session:
        neighbour = session.sandbox()
        neighbour.wait()
        pinned = session.sandbox(runner_ids=["local", "gpu-node-7"])
        with pytest.raises(RunnerNotFoundError, match=r"no runner 'gpu-node-7'.*\['local'\]") as info:
            pinned.start().result()
        assert info.value.runner_id == "gpu-node-7"
        assert isinstance(info.value, sandpool.exceptions.DiscoveryError)
        assert pinned.status == SandboxStatus.FAILED
        assert neighbour.exec(["echo", "still here"]).result().stdout == "still here\n"


def test_a_pin_in_the_defaults_applies_and_an_explicit_empty_list_clears_it():
    """Defaults' runner_ids pin every sandbox; ``runner_ids=[]`` clears the pin, as in cwsandbox."""
    with Session(defaults=SandboxDefaults(runner_ids=("elsewhere",))) as session:
        with pytest.raises(RunnerNotFoundError):
            session.sandbox().start().result()
        assert session.sandbox(runner_ids=[]).exec(["true"]).result().returncode == 0


def test_a_bare_string_is_refused_with_the_fix():
    """``runner_ids="local"`` is a TypeError naming the list form (a string is not a list of ids)."""
    with pytest.raises(TypeError, match=r"runner_ids=\['local'\]"):
        SandboxDefaults(runner_ids="local")
