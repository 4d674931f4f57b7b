"""The Slurm runtime against a real 3-node cluster on this host (``scripts/slurm-cluster.sh``):
n1, n2, n3 with 4 cpus each and two fake gpus on n3. Skipped, with the reason, where Slurm cannot
be installed or started. Every test ends with none of its jobs left in ``squeue``."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest
import slurm_helpers as sh
import trio
from service_helpers import wait_until

from sandpool import (
    RunnerNotFoundError,
    SandboxDefaults,
    SandboxFailedError,
    SandboxResourceExhaustedError,
    SandboxStatus,
    SandboxUnavailableError,
    Session,
    SlurmRuntime,
)

pytestmark = pytest.mark.timeout(90)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes need not import this module


@pytest.fixture
def runtime(slurm_conf, tmp_path):
    """A SlurmRuntime with its own spool; at teardown none of its jobs may be left in the queue."""
    yield from sh.checked_runtime(str(tmp_path / "spool"))


def _where(i):
    import os
    import time

    time.sleep(0.005)
    return i, os.environ.get("SLURMD_NODENAME")


def test_map_of_300_calls_spreads_over_all_nodes_and_exit_empties_the_queue(runtime):
    """Six 2-cpu sandboxes fill the three 4-cpu nodes; 300 calls run on the cluster's nodes;
    leaving the session cancels every job at once (squeue holds none of them right after). Which
    nodes ran calls depends on which jobs started first (the quick calls may all end before the
    last job runs): where the six sandboxes are is what fills all three nodes."""
    with Session(runtime=runtime, defaults=SandboxDefaults(tags=("map300",))) as session:
        where = session.function(max_concurrency=6, resources={"cpu": 2, "memory": "256Mi"})(_where)
        results = [r.result() for r in where.map([(i,) for i in range(300)])]
        assert [i for i, _ in results] == list(range(300))
        assert set(collections.Counter(node for _, node in results)) <= {"n1", "n2", "n3"}
        listed = session.list(tags=["map300"]).result()
        assert len(listed) == 6
        for sb in listed:  # the map's quick calls may all end before the last job has started
            sb.wait(timeout=60)
        assert all(sb.status == SandboxStatus.RUNNING for sb in listed), listed
        assert {runtime.job(sb)["node"] for sb in listed} == {"n1", "n2", "n3"}
    assert sh.jobs_of(runtime.owner) == []


_OTHER_CLIENT = """
import sys, sandpool
found = sandpool.Sandbox.list(tags=["shared-sb"]).result()
sb = sandpool.Sandbox.from_id(sys.argv[1]).result()
print([f.sandbox_id for f in found], sb is found[0], sb.status)
print(repr(sb.exec(["cat", "/tmp/data.bin"]).result().stdout))
with sandpool.Session() as session:
    session.adopt(sb)
print(sb.status)
"""


def test_exec_streams_files_and_another_client_finds_adopts_and_stops(runtime, slurm_conf):
    """exec streams its output as it comes; files round-trip. Another process (SANDPOOL_RUNTIME=slurm)
    finds the sandbox by tag (a squeue of the cluster's jobs) and by id, runs a command in it over the
    data plane, adopts it and stops it on leaving its session: the first client sees it end."""
    with Session(runtime=runtime) as mine:
        sb = mine.sandbox(tags=["shared-sb"])
        proc = sb.exec(["sh", "-c", "echo first; sleep 1; echo second"])
        first_at = None
        lines = []
        for line in proc.stdout:
            first_at = first_at or time.monotonic()
            lines.append(line)
        ended_at = time.monotonic()
        assert [line.strip() for line in lines] == ["first", "second"] and ended_at - first_at > 0.8
        sb.write_file("/tmp/data.bin", b"from slurm").result()
        assert sb.read_file("/tmp/data.bin").result() == b"from slurm"
        env = {**os.environ, "SANDPOOL_RUNTIME": "slurm", "SANDPOOL_SLURM_SPOOL": runtime.spool_dir}
        other = subprocess.run([sys.executable, "-c", _OTHER_CLIENT, sb.sandbox_id], capture_output=True,
                               text=True, env=env, timeout=60)
        assert other.stdout.splitlines() == [f"['{sb.sandbox_id}'] True running", "'from slurm'", "terminated"], \
            other.stderr
        ended = sb.wait_until_complete(timeout=15, raise_on_termination=False).result()  # a clean end, not a loss
        assert (ended.status, ended.status_reason) == (SandboxStatus.TERMINATED, "stopped"), ended.status_reason
    assert sh.jobs_of(runtime.owner) == []


def test_gpu_requests_land_on_the_gpu_node_and_see_their_devices(runtime):
    """Only n3 has (fake) gpus: gpu sandboxes land there, each seeing the device Slurm gave it as
    CUDA_VISIBLE_DEVICES; a sandbox without gpus sees none."""
    probe = ["sh", "-c", "echo $SLURMD_NODENAME ${CUDA_VISIBLE_DEVICES:-none}"]
    with Session(runtime=runtime) as session:
        gpus = [session.sandbox(resources={"gpu": 1}) for _ in range(2)]
        seen = [sb.exec(probe).result().stdout.split() for sb in gpus]
        assert sorted(seen) == [["n3", "0"], ["n3", "1"]]
        plain = session.sandbox(resources={"cpu": 1})
        assert plain.exec(probe).result().stdout.split()[1] == "none"


def test_a_sandbox_waits_pending_while_the_cluster_is_full_then_runs(runtime):
    """Three 4-cpu sandboxes take every cpu; a fourth reports PENDING with Slurm's reason until one
    of them stops, then runs."""
    with Session(runtime=runtime) as session:
        full = [session.sandbox(resources={"cpu": 4}) for _ in range(3)]
        for sb in full:
            sb.start()
        for sb in full:
            sb.start().result()
        waiting = session.sandbox(resources={"cpu": 1})
        waiting.start()
        # Slurm holds it for want of resources (every cpu is taken): it cannot start until one stops
        assert wait_until(lambda: waiting.status == SandboxStatus.PENDING
                          and "PENDING (Resources)" in (waiting.status_reason or ""), timeout=30), \
            (waiting.status, waiting.status_reason)
        assert waiting.sandbox_id is None  # its id names the job's server that serves it, once one does
        # its allocation has no sandbox left once its one sandbox stops: released after the linger
        full[0].stop().result()
        waiting.start().result(timeout=20)
        assert waiting.status == SandboxStatus.RUNNING and waiting.sandbox_id.startswith("slurm-")
        node = waiting.exec(["sh", "-c", "echo $SLURMD_NODENAME"]).result().stdout.strip()
        assert node == runtime.job(full[0])["node"]


def test_a_sandbox_no_node_can_hold_fails_clearly(runtime):
    """More cpus or gpus than any node has: sbatch refuses, and the start fails at once saying so."""
    with Session(runtime=runtime) as session:
        for resources in ({"cpu": 64}, {"gpu": 3}):
            sb = session.sandbox(resources=resources)
            with pytest.raises(SandboxResourceExhaustedError, match="Slurm cannot place this sandbox"):
                sb.start().result()
            assert sb.status == SandboxStatus.FAILED


def test_a_node_dying_mid_map_fails_its_sandboxes_and_the_map_completes_elsewhere(runtime):
    """Power-cut n2 (its slurmd, job steps and their processes) while a map runs: the sandboxes there
    are reported FAILED within seconds, their calls are retried on fresh sandboxes that Slurm places
    on the other nodes, and the map completes. When n2 comes back Slurm clears its jobs."""
    try:
        tag = f"node-death-{runtime.owner}"  # the queue still lists earlier runs' ended jobs
        with Session(runtime=runtime, defaults=SandboxDefaults(tags=(tag,))) as session:
            where = session.function(max_concurrency=6, resources={"cpu": 2}, retries=3)(_slow_where)
            refs = where.map([(i,) for i in range(300)])
            assert wait_until(lambda: session.statistics().calls_done >= 30, timeout=60)
            assert sh.script("kill-node", "n2").returncode == 0
            killed_at = time.monotonic()
            results = [r.result() for r in refs]
            assert time.monotonic() - killed_at < 30
            assert [i for i, _ in results] == list(range(300))
            assert {"n1", "n3"} <= {node for _, node in results}
            ours = session.list(tags=[tag], show_terminated=True).result()
            # the sandboxes that ran on n2 (one still starting there was placed again elsewhere)
            dead = [sb for sb in ours if runtime.job(sb)["node"] == "n2" and runtime.job(sb)["times"]["connected"]]
            assert dead and all(sb.status == SandboxStatus.FAILED for sb in dead), dead
            assert all("n2" in sb.status_reason for sb in dead), [sb.status_reason for sb in dead]
            assert not [sb for sb in ours if runtime.job(sb)["node"] == "n2" and not sb.status.is_terminal]
            assert session.statistics().calls_retried >= 1
    finally:
        sh.script("start-node", "n2")
    assert sh.wait_no_jobs(runtime.owner, timeout=30) == []
    # The power cut left n2's sandbox state (its template was SIGKILLed with everything else):
    # the node's next start sweeps it (all three nodes share this host's state directory).
    with Session() as local:
        assert local.sandbox().exec(["true"]).result().returncode == 0


def _slow_where(i):
    import os
    import time

    time.sleep(0.03)
    return i, os.environ.get("SLURMD_NODENAME")


def test_a_silent_server_is_lost_by_its_heartbeat(runtime):
    """A job server that stops answering (SIGSTOP: the node hangs, its sockets stay open) is lost
    within lost_after_seconds plus a heartbeat: the exec fails as unavailable and the sandbox FAILED."""
    with Session(runtime=runtime) as session:
        sb = session.sandbox()
        sb.start().result()
        pid = sb._record.extra["placement"].address["pid"]
        proc = sb.exec(["sh", "-c", "echo go; exec sleep 30"])
        assert next(iter(proc.stdout)) == "go\n"  # the exec reached the server before it froze
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises(SandboxUnavailableError, match="did not answer"):
                proc.result()
            # the heartbeat's real clock is the point: lost_after plus a beat, and slack for a loaded machine
            assert time.monotonic() - started < runtime.lost_after_seconds + 2 * runtime.heartbeat_seconds + 5
            assert sb.status == SandboxStatus.FAILED and "did not answer" in sb.status_reason
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_job_cancelled_outside_sandpool_is_an_infrastructure_failure(runtime):
    """scancel of a sandbox's job by someone else: its calls fail over to a fresh sandbox (retries),
    and the cancelled sandbox says Slurm ended it."""
    with Session(runtime=runtime) as session:
        where = session.function(max_concurrency=1, retries=2)(_slow_where)
        assert where.remote(0).result()[0] == 0
        first = session.list().result()[0]
        ref = where.remote(1)
        subprocess.run(["scancel", runtime.job(first)["job_id"]], check=True)
        assert ref.result(timeout=30)[0] == 1
        with pytest.raises(SandboxFailedError):  # cwsandbox's wait_until_complete raises for a failed sandbox
            first.wait_until_complete(timeout=10).result()
        assert first.status == SandboxStatus.FAILED
        assert "was ended by Slurm" in first.status_reason, first.status_reason


_CLIENT = """
import sys, time, sandpool
rt = sandpool.SlurmRuntime(spool_dir=sys.argv[1], orphan_grace_seconds=2)
s = sandpool.Session(runtime=rt).__enter__()
a = s.sandbox(resources={"gpu": 2}); a.start().result()
b = s.sandbox(resources={"gpu": 1}); b.start()
while b.status != "pending": time.sleep(0.05)
print(rt.owner, rt._reaper.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("reaper", ["alive", "killed"])
def test_a_client_that_dies_leaves_no_job(slurm_conf, tmp_path, reaper):
    """SIGKILL of the client: its reaper cancels its running and pending jobs at once. With the reaper
    killed too (the whole submit host gone), each running job's server ends once no client held it
    for the orphan grace (2 s here); a queued one would end the same way once it runs."""
    sh.wait_quiet()
    proc = subprocess.Popen([sys.executable, "-c", _CLIENT, str(tmp_path / "spool")], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "SLURM_CONF": slurm_conf})
    try:
        owner, reaper_pid = proc.stdout.readline().split()
        assert len(sh.jobs_of(owner)) == 2
        if reaper == "killed":
            os.kill(int(reaper_pid), signal.SIGKILL)
        proc.kill()
        if reaper == "killed":  # the pending job never runs on its own: cancel it, watch the running one
            pending = subprocess.run(["squeue", "--me", "-h", "-t", "PD", "-o", "%i|%k"], capture_output=True,
                                     text=True).stdout
            subprocess.run(["scancel", *[ln.split("|")[0] for ln in pending.splitlines() if owner in ln]])
        assert sh.wait_no_jobs(owner, timeout=2 if reaper == "alive" else 8) == []
    finally:
        proc.kill()
        proc.wait()


def test_sandpool_runtime_slurm_selects_it_from_the_environment(slurm_conf, tmp_path):
    """SANDPOOL_RUNTIME=slurm: a plain Session and Sandbox.run() place sandboxes with Slurm, and
    Sandbox.list(tags=) and from_id look at the cluster's jobs."""
    code = (
        "import sandpool\n"
        "with sandpool.Session() as s:\n"
        "    sb = s.sandbox(tags=['from-env'])\n"
        "    print(sb.exec(['sh', '-c', 'echo $SLURMD_NODENAME']).result().stdout.strip())\n"
        "    print([x.sandbox_id == sb.sandbox_id for x in sandpool.Sandbox.list(tags=['from-env']).result()])\n"
        "    print(sandpool.Sandbox.from_id(sb.sandbox_id).result() is sb)\n"
        "print(sb.status)\n"
    )
    env = {**os.environ, "SANDPOOL_RUNTIME": "slurm", "SANDPOOL_SLURM_SPOOL": str(tmp_path / "spool"),
           "SANDPOOL_SLURM_PARTITION": "debug", "SLURM_CONF": slurm_conf}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = done.stdout.split("\n")
    assert lines[0] in ("n1", "n2", "n3") and lines[1:4] == ["[True]", "True", "terminated"], done.stderr


def test_async_session_on_slurm(runtime):
    """Inside trio: ``async with Session(runtime=SlurmRuntime())`` places, runs and cancels."""

    async def main() -> str:
        async with Session(runtime=runtime) as session:
            sb = session.sandbox()
            result = await sb.exec(["sh", "-c", "echo $SLURM_JOB_ID"])
            assert result.stdout.strip() == runtime.job(sb)["job_id"]
            return sb.sandbox_id

    sandbox_id = trio.run(main)
    assert sandbox_id.startswith("slurm-") and sh.jobs_of(runtime.owner) == []


def test_repr_shows_the_runtime_state(runtime):
    """The runtime's repr names its partition, whether it is open, and its jobs by status."""
    assert repr(runtime).startswith("<SlurmRuntime partition=(default) not_opened jobs=0")
    with Session(runtime=runtime) as session:
        session.sandbox().start().result()
        assert "running=1" in repr(runtime)
    assert "terminated=1" in repr(runtime)



def test_stream_logs_follows_a_slurm_sandbox_through_its_job_server(runtime):
    """``stream_logs(follow=True)`` of a Slurm sandbox streams its main command's output from the
    job's server as it is written, and ends when the command ends; ``tail_lines`` and a second
    reader see the same log, and the sandbox ends cleanly (its job leaves the queue)."""
    script = "echo one; echo two; read go < /tmp/go; echo three"  # 'three' only once we let it
    with Session(runtime=runtime) as session:
        sb = session.sandbox(command="sh", args=["-c", f"mkfifo /tmp/go 2>/dev/null; {script}"])
        follow = iter(sb.stream_logs(follow=True))
        assert [next(follow), next(follow)] == ["one\n", "two\n"]  # streamed while the command still runs
        assert list(sb.stream_logs(tail_lines=1)) == ["two\n"]
        # The trigger's result is not looked at: the main command exits as soon as the trigger has
        # written, so the sandbox's end may cut the trigger's own exit report (cwsandbox's semantics).
        sb.exec(["sh", "-c", "echo go > /tmp/go"])
        assert list(follow) == ["three\n"]  # the stream ends with the command
        ended = sb.wait_until_complete(timeout=30).result()
        assert ended.status == SandboxStatus.COMPLETED
    assert sh.wait_no_jobs(runtime.owner) == []


def test_runner_ids_pin_a_sandbox_to_slurm_nodes(runtime):
    """A Slurm runtime's runners are its nodes: ``runner_ids=["n2"]`` places the sandbox on n2 (and
    ``["n1", "n3"]`` on one of those); a name that is no node raises RunnerNotFoundError naming
    the nodes, submits no job, and the session keeps placing sandboxes."""
    probe = ["sh", "-c", "echo $SLURMD_NODENAME"]
    with Session(runtime=runtime) as session:
        pinned = session.sandbox(runner_ids=["n2"])
        assert pinned.exec(probe).result().stdout.strip() == "n2" and pinned.runner_id == "n2"
        assert [sb.sandbox_id for sb in session.list(runner_ids=["n2"]).result()] == [pinned.sandbox_id]
        assert session.sandbox(runner_ids=["n1", "n3"]).exec(probe).result().stdout.strip() in ("n1", "n3")
        lost = session.sandbox(runner_ids=["local"])
        with pytest.raises(RunnerNotFoundError, match=r"no runner 'local'.*\['n1', 'n2', 'n3'\]") as info:
            lost.start().result()
        assert info.value.runner_id == "local" and lost.status == SandboxStatus.FAILED
        assert session.sandbox().exec(probe).result().stdout.strip() in ("n1", "n2", "n3")
