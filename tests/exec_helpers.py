"""One exec of each outcome cwsandbox counts, for the tests of exec_stats and Session.get_metrics."""

from __future__ import annotations

import pytest

from sandpool import SandboxExecutionError, SandboxTimeoutError

#: What ``run_four_outcomes`` leaves in ``exec_stats``.
FOUR_OUTCOMES = {"exec_count": 4, "exec_completed_ok": 1, "exec_completed_nonzero": 2, "exec_failures": 1}


def run_four_outcomes(sb) -> None:
    """On ``sb``: an ok exec, a nonzero one, a nonzero one with check=True (raising), and a failure
    (a timeout), checking that each raised what it should."""
    sb.exec(["true"]).result()
    sb.exec(["false"]).result()
    with pytest.raises(SandboxExecutionError):
        sb.exec(["false"], check=True).result()
    with pytest.raises(SandboxTimeoutError):
        sb.exec(["sleep", "30"], timeout_seconds=0.2).result()
