"""``Session.get_metrics``: cwsandbox's counters measured on real sandboxes, in cwsandbox's shape,
plus sandpool's own (status counts, function calls, reserved cpu and memory)."""

from __future__ import annotations

import sys

import cloudpickle
from cwsandbox._types import ExecOutcome
from cwsandbox._wandb import WandbReporter

from exec_helpers import run_four_outcomes

from sandpool import Session

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def double(x):
    return 2 * x


def test_metrics_count_what_the_sessions_sandboxes_did_as_cwsandbox_names_it():
    """Two sandboxes (one never started), four execs of every outcome: the cwsandbox/* keys are
    exactly those cwsandbox's reporter gives for the same events, with the same counts and rates;
    sandpool/* adds the sandboxes by status and the cpu and memory the running one reserved."""
    with Session() as session:
        assert session.get_metrics()["cwsandbox/sandboxes_created"] == 0
        sb = session.sandbox(resources={"cpu": "250m", "memory": "64Mi"})
        session.sandbox()  # created, never started: counted, as cwsandbox counts it
        run_four_outcomes(sb)
        metrics = session.get_metrics()

    reporter = WandbReporter()  # cwsandbox's own, fed the same events
    for _ in range(2):
        reporter.record_sandbox_created()
    for outcome in ("COMPLETED_OK", "COMPLETED_NONZERO", "COMPLETED_NONZERO", "FAILURE"):
        reporter.record_exec_outcome(ExecOutcome[outcome])
    reporter.record_startup_time(metrics["cwsandbox/avg_startup_seconds"])
    theirs = reporter.get_metrics()
    ours = {k: v for k, v in metrics.items() if k.startswith("cwsandbox/")}
    per_sandbox = {"cwsandbox/avg_execs_per_sandbox": 4.0, "cwsandbox/min_execs_per_sandbox": 4,
                   "cwsandbox/max_execs_per_sandbox": 4}  # cwsandbox keeps these only with a W&B run
    assert ours == {**theirs, **per_sandbox}
    assert theirs["cwsandbox/exec_completion_rate"] == 0.25 and theirs["cwsandbox/exec_failure_rate"] == 0.25
    assert 0 < metrics["cwsandbox/min_startup_seconds"] < 30
    assert metrics["sandpool/sandboxes_running"] == 1 and metrics["sandpool/sandboxes_unstarted"] == 1
    assert metrics["sandpool/cpu_reserved"] == 0.25 and metrics["sandpool/memory_reserved_bytes"] == 64 * 2**20


def test_metrics_follow_stops_and_count_remote_function_calls():
    """A stopped sandbox counts as terminated and reserves nothing; a remote function's pool
    sandbox counts as created, and its calls appear as sandpool/calls_done."""
    with Session() as session:
        sb = session.sandbox(resources={"cpu": "250m"})
        sb.exec(["true"]).result()
        sb.stop(graceful_shutdown_seconds=1).result()
        fn = session.function(max_concurrency=1)(double)
        assert [fn.remote(i).result() for i in range(3)] == [0, 2, 4]
        metrics = session.get_metrics()
    assert metrics["cwsandbox/sandboxes_created"] == 2
    assert metrics["sandpool/sandboxes_terminated"] == 1 and metrics["sandpool/sandboxes_running"] == 1
    assert metrics["sandpool/cpu_reserved"] == 0
    assert metrics["sandpool/calls_done"] == 3 and metrics["sandpool/calls_failed"] == 0
    assert metrics["cwsandbox/executions"] == 1


def test_report_to_empty_turns_metrics_off_and_log_metrics_needs_a_run():
    """``report_to=[]`` gives {} (as cwsandbox: no reporter); without a W&B run, log_metrics logs
    nothing and says so, and the counts are kept."""
    with Session(report_to=[]) as quiet:
        quiet.sandbox().exec(["true"]).result()
        assert quiet.get_metrics() == {}
    with Session() as session:
        session.sandbox().exec(["true"]).result()
        assert session.log_metrics(step=1) is False
        assert session.get_metrics()["cwsandbox/executions"] == 1
