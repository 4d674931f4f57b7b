"""Helpers for the Slurm tests: the throwaway 3-node cluster of ``scripts/slurm-cluster.sh``.

``cluster()`` returns the cluster's SLURM_CONF, starting the cluster if it is not up (and then
stopping it at the end of the test session), or skips the test with the reason when Slurm cannot be
installed or started here. ``.ci/run`` starts it before the suite; a test run reuses it.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "slurm-cluster.sh")

_state: dict = {}


def script(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def cluster() -> str:
    """The running cluster's SLURM_CONF (started on first use), or pytest.skip with why not."""
    if "conf" in _state:
        return _state["conf"]
    if "skip" in _state:
        pytest.skip(_state["skip"])
    if script("status", timeout=30).returncode != 0:
        started = script("start")
        if started.returncode != 0:
            _state["skip"] = f"no Slurm cluster: {started.stderr.strip() or started.stdout.strip()}"
            pytest.skip(_state["skip"])
        _state["started_here"] = True
    conf = script("env").stdout.strip().split("=", 1)[1]
    os.environ["SLURM_CONF"] = conf
    _state["conf"] = conf
    return conf


def stop_if_started_here() -> None:
    if _state.pop("started_here", False):
        script("stop")


def jobs_of(owner: str) -> list[str]:
    """Job ids of the sandpool jobs of ``owner`` (a SlurmRuntime's owner tag) that squeue still lists
    as pending, running or completing."""
    out = subprocess.run(["squeue", "--me", "--noheader", "--format=%i|%k"], capture_output=True, text=True).stdout
    return [line.split("|")[0] for line in out.splitlines() if f"owner={owner};" in line]


def wait_no_jobs(owner: str, timeout: float = 15.0) -> list[str]:
    """Poll until ``owner`` has no job left in the queue; the ids still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := jobs_of(owner)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def wait_quiet(timeout: float = 20.0) -> None:
    """Wait until no job runs, waits or completes and every node is idle (earlier tests' jobs and a
    restarted node settle), so each test starts on the whole, empty cluster."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "--noheader", "--states=PD,R,CG,CF,S"], capture_output=True,
                               text=True).stdout.strip()
        if not queue and set(node_states().values()) == {"idle"}:
            return
        time.sleep(0.1)
