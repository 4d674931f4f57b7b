"""Many sandboxes of one session at once, at the default (namespaces) level: each answers as
itself, runs at its owner's CPU priority (the template above it), and all of them stop with
nothing left (the autouse leak check). The 1,000-sandbox figures are a benchmark
(benchmarks/bench_scale.py), not a test."""

from __future__ import annotations

import os

import psutil
import pytest

from sandpool import SandboxStatus, Session
from sandpool._isolation import probe
from _sandpool_agent import template

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")

N = 200
#: Field 19 of /proc/PID/stat is the niceness; a sandbox's own /proc shows its processes.
NICE = "cut -d' ' -f19 /proc/self/stat"


def _template_niceness() -> int:
    found = [p for p in psutil.Process().children() if "_sandpool_agent.template" in " ".join(p.cmdline())]
    assert len(found) == 1, found
    return found[0].nice()


def test_two_hundred_sandboxes_start_answer_as_themselves_and_stop():
    """200 sandboxes started at once each run an exec that reports its own hostname (no socket or
    spawn reply crossed to another sandbox) at the client's niceness, twice; the template runs
    ``PRIORITY_BOOST`` above it (as root); all stop at once and nothing of them is left."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    with Session(defaults={"isolation": "namespaces"}) as session:
        pool = [session.sandbox() for _ in range(N)]
        for ref in [sandbox.start() for sandbox in pool]:
            ref.result()
        for _ in range(2):
            results = [ref.result() for ref in [sandbox.exec(["sh", "-c", f"hostname; {NICE}"]) for sandbox in pool]]
            assert [r.returncode for r in results] == [0] * N, [r.stderr for r in results if r.returncode][:3]
            assert [r.stdout.split() for r in results] == [[sandbox.sandbox_id, str(own)] for sandbox in pool]
        if os.geteuid() == 0:
            assert _template_niceness() == max(-20, own - template.PRIORITY_BOOST)
        for ref in [sandbox.stop(graceful_shutdown_seconds=0) for sandbox in pool]:
            ref.result()
        assert {sandbox.status for sandbox in pool} == {SandboxStatus.TERMINATED}
