"""The exec fast path through ``sandpool serve`` (the same-host fast plane): a sync caller's exec
frame goes from its thread straight onto the fast socket, and ends exactly as the slow path does.
The scenarios are test_exec_fast's, run here against a server (both ways each)."""

from __future__ import annotations

import pytest
import test_exec_fast
from service_helpers import ServerProcess

from sandpool import Session

NAMES = ["test_results_match", "test_many_short_execs_each_settle", "test_check_raises_the_same_error",
         "test_timeout_kills_the_tree", "test_cancel_kills_the_tree", "test_cancel_at_once",
         "test_sandbox_stopped_under_a_running_exec", "test_stdin_and_signals_after_a_fast_send"]
for _name in NAMES:  # a name missing from the module fails this import: no test is dropped silently
    globals()[_name] = getattr(test_exec_fast, _name)
sb = test_exec_fast.sb


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


@pytest.fixture
def session(server):
    with Session(address=server.address) as s:
        assert s._runtime.name == "remote"
        yield s
        assert "data_plane=unix" in repr(s._runtime)  # the fast plane: the frames went over its socket
