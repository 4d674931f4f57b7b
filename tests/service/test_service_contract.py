"""The public API suite against both runtimes: the same tests, run locally and through a real
``sandpool serve`` subprocess (SANDPOOL_ADDRESS selects the remote runtime for Session(),
Sandbox.run(), Sandbox.list() and from_id()).

The tests are imported from the API modules, so they run here with this module's fixtures: each
one twice, ``[local]`` and ``[remote]``. The subset covers lifecycle, exec (streaming, stdin,
signals, timeouts, cancellation), files, listing/adoption, the async API and remote functions.
"""

from __future__ import annotations

import pytest
import test_async
import test_function_api
import test_sandbox
from service_helpers import ServerProcess

from sandpool import SandboxDefaults, Session

SANDBOX_TESTS = [
    "test_lazy_start_and_explicit_start_wait",
    "test_first_exec_starts_a_lazy_sandbox",
    "test_check_raises_with_result_attached",
    "test_timeout_kills_the_remote_process_tree",
    "test_streaming_stdout_as_it_happens",
    "test_stdin_write_and_close",
    "test_cancel_kills_the_remote_process",
    "test_signals_reach_the_process",
    "test_env_cwd_and_clean_environment",
    "test_files_round_trip_and_confinement",
    "test_stop_then_use_raises_not_running",
    "test_main_command_exit_completes_or_fails_the_sandbox",
    "test_max_lifetime_stops_the_sandbox_with_a_reason",
    "test_sandbox_run_standalone_context_manager",
    "test_list_and_adopt",
    "test_exception_inside_block_stops_everything_and_propagates_unchanged",
]
ASYNC_TESTS = [
    "test_async_session_exec_stream_and_close",
    "test_leaving_a_cancel_scope_kills_the_remote_command",
    "test_exception_in_async_block_propagates_unchanged_and_stops_sandboxes",
]
FUNCTION_TESTS = [
    "test_map_returns_refs_in_order_and_as_completed_yields_each",
    "test_async_api_inside_trio",
    "test_values_round_trip_exactly",
]

# A name missing from its module fails the import of this one: no test is dropped silently.
for _module, _names in ((test_sandbox, SANDBOX_TESTS), (test_async, ASYNC_TESTS),
                        (test_function_api, FUNCTION_TESTS)):
    for _name in _names:
        globals()[_name] = getattr(_module, _name)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # some API tests ask for isolation="process"; a root server refuses it unless its floor allows it
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), "--min-isolation", "process") as srv:
        yield srv


@pytest.fixture(params=["local", "remote"], autouse=True)
def runtime_kind(request, monkeypatch):
    """Every test of this module runs once per runtime."""
    monkeypatch.delenv("SANDPOOL_ADDRESS", raising=False)
    if request.param == "remote":
        monkeypatch.setenv("SANDPOOL_ADDRESS", request.getfixturevalue("server").address)
    return request.param


@pytest.fixture
def session(runtime_kind):
    with Session(SandboxDefaults(tags=("t",))) as s:
        assert s._runtime.name == runtime_kind
        yield s
