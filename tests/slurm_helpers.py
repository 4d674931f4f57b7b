"""Helpers for the Slurm tests: a throwaway 3-node cluster of ``scripts/slurm-cluster.sh``.

``cluster()`` returns the SLURM_CONF of the cluster the tests use: the one named by
``$SANDPOOL_SLURM_DIR`` when it is up (``.ci/run`` starts it before the suite and stops it after),
else a private one for this test run (its own directory and ports, so concurrent runs on a shared
machine do not meet), started on first use and stopped at the end of the module. Where Slurm
cannot be installed or started, the tests skip with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sandpool import SlurmRuntime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "slurm-cluster.sh")

_state: dict = {"env": {}}


def script(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run the cluster script for the cluster in use (its directory and ports)."""
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **_state["env"]})


def _free_port_block(count: int = 4) -> int:
    """A base port with ``count`` free ports from it (slurmctld, then one per node)."""
    for base in range(17100 + (os.getpid() % 400) * 5, 30000, 5):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for a Slurm cluster")


def cluster() -> str:
    """The SLURM_CONF of the cluster to use (started on first use), or pytest.skip with why not."""
    if "conf" in _state:
        return _state["conf"]
    if "skip" in _state:
        pytest.skip(_state["skip"])
    if not (os.environ.get("SANDPOOL_SLURM_DIR") and script("status", timeout=30).returncode == 0):
        _state["env"] = {"SANDPOOL_SLURM_DIR": f"/tmp/sandpool-slurm-test-{os.getpid()}",
                         "SANDPOOL_SLURM_PORT": str(_free_port_block())}
        started = script("start")
        if started.returncode != 0:
            script("stop")
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
        subprocess.run(["rm", "-rf", _state["env"]["SANDPOOL_SLURM_DIR"]])
    _state.pop("conf", None)


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


def checked_runtime(spool_dir: str, **options: object) -> Iterator[SlurmRuntime]:
    """A fixture's body: a SlurmRuntime with its own spool, made on a quiet cluster; at teardown none
    of its jobs may be left in the queue (they are cancelled, and the test fails)."""
    from sandpool import SlurmRuntime

    wait_quiet()
    rt = SlurmRuntime(spool_dir=spool_dir, **options)  # type: ignore[arg-type]
    yield rt
    left = wait_no_jobs(rt.owner)
    if left:
        subprocess.run(["scancel", *left])
        pytest.fail(f"jobs left in squeue: {left}")
