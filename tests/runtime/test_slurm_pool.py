"""One Slurm allocation per pool, actors in it, and Slurm nodes as runners, against the real
3-node cluster of ``scripts/slurm-cluster.sh`` (n1, n2, n3: 4 cpus each, two fake gpus on n3).
Each test reuses one allocation for several checks; every test ends with none of its jobs in ``squeue``."""

from __future__ import annotations

import subprocess
import sys

import cloudpickle
import pytest
import slurm_helpers as sh
from service_helpers import wait_until

import sandpool
from sandpool import ActorDiedError, RunnerNotFoundError, SandboxStatus, Session

pytestmark = pytest.mark.timeout(90)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes need not import this module


@pytest.fixture
def runtime(slurm_conf, tmp_path):
    """A SlurmRuntime with its own spool and a short linger; at teardown none of its jobs may be left."""
    yield from sh.checked_runtime(str(tmp_path / "spool"), linger_seconds=0.5)


def _where(i: int) -> tuple[int, str | None, str | None]:
    import os

    return i, os.environ.get("SLURM_JOB_ID"), os.environ.get("SANDPOOL_SANDBOX_ID")


def test_a_pool_shares_one_allocation_that_grows_and_shrinks_with_demand(runtime):
    """A pool of 4 one-cpu sandboxes starts them together in one 4-slot job on one node (every call
    sees the same job id); a lone sandbox of another spec gets its own job; Session.list and
    Sandbox.list filter by runner (the node); once the pool's sandboxes are stopped the job leaves
    the queue after the linger, and the next sandbox of that spec gets a new allocation."""
    with Session(runtime=runtime) as session:
        where = session.function(max_concurrency=4, resources={"cpu": 1})(_where)
        results = [r.result() for r in where.map([(i,) for i in range(40)])]
        assert [i for i, _, _ in results] == list(range(40))
        # the pool started its four together; the quick calls may all end before the last is up
        assert wait_until(lambda: sum(r.status == "running" for r in runtime.list()) == 4, timeout=30)
        pool = [sb for sb in session.list().result() if sb.status == SandboxStatus.RUNNING]
        assert len(pool) == 4
        jobs = {runtime.job(sb)["job_id"] for sb in pool}
        assert len(jobs) == 1 and runtime.job(pool[0])["slots"] == 4, [runtime.job(sb) for sb in pool]
        (job_id,) = jobs
        assert {job for _, job, _ in results} == {job_id}
        node = runtime.job(pool[0])["node"]
        assert {sb.runner_id for sb in pool} == {node} and all(sb.sandbox_id.startswith(f"slurm-{job_id}-")
                                                                for sb in pool)
        assert len(sh.jobs_of(runtime.owner)) == 1
        other = session.sandbox(resources={"cpu": 2})
        other.start().result()
        assert runtime.job(other)["job_id"] != job_id and len(sh.jobs_of(runtime.owner)) == 2
        # listing by runner: the node's sandboxes only; no sandbox of this session runs on "local"
        on_node = session.list(runner_ids=[node]).result()
        assert {sb.sandbox_id for sb in pool} <= {sb.sandbox_id for sb in on_node}
        assert all(sb.runner_id == node for sb in on_node)
        assert session.list(runner_ids=["local"]).result() == []
        with pytest.raises(TypeError, match="runner_ids must be a list"):
            session.list(runner_ids="n1")
        for sb in pool:  # the pool's sandboxes gone: the allocation idles, then is released
            sb.stop().result()
        other_job = runtime.job(other)["job_id"]
        assert wait_until(lambda: sh.jobs_of(runtime.owner) == [other_job], timeout=15), sh.jobs_of(runtime.owner)
        again = session.sandbox(resources={"cpu": 1})
        assert again.exec(["sh", "-c", "echo $SLURM_JOB_ID"]).result().stdout.strip() not in ("", job_id)
    assert sh.jobs_of(runtime.owner) == []


def test_later_sandboxes_of_a_spec_start_in_the_running_allocation_and_share_its_fate(runtime):
    """With min_slots=3 the first sandbox's allocation holds room for three: the second and third
    start there without a new job; a job cancelled outside sandpool fails all of them (each says
    Slurm ended it), and the next sandbox gets a fresh allocation."""
    runtime.min_slots = 3
    with Session(runtime=runtime) as session:
        first = session.sandbox()
        first.start().result()
        later = [session.sandbox() for _ in range(2)]
        for sb in later:
            sb.start().result()
        job_id = runtime.job(first)["job_id"]
        assert [runtime.job(sb)["job_id"] for sb in later] == [job_id, job_id]
        assert sh.jobs_of(runtime.owner) == [job_id]
        outputs = [sb.exec(["sh", "-c", "echo $SLURM_JOB_ID $SANDPOOL_SANDBOX_ID"]).result().stdout.split()
                   for sb in (first, *later)]
        assert {o[0] for o in outputs} == {job_id} and len({o[1] for o in outputs}) == 3  # three sandboxes
        subprocess.run(["scancel", job_id], check=True)
        for sb in (first, *later):
            with pytest.raises(sandpool.SandboxFailedError):
                sb.wait_until_complete(timeout=20).result()
            assert sb.status == SandboxStatus.FAILED and "was ended by Slurm" in sb.status_reason, sb.status_reason
        fresh = session.sandbox()
        assert fresh.exec(["true"]).result().returncode == 0 and runtime.job(fresh)["job_id"] != job_id
    assert sh.wait_no_jobs(runtime.owner) == []


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def where(self) -> str | None:
        import os

        return os.environ.get("SLURM_JOB_ID")

    def block(self) -> None:
        import time

        time.sleep(600)


def test_actors_run_in_slurm_allocations_in_order_and_die_with_their_job(runtime):
    """``@session.cls`` on a Slurm session: an actor's 200 pipelined calls run in call order on a
    node, kill() ends it (ActorDiedError), and an actor whose job is cancelled outside sandpool
    raises ActorDiedError on its pending and later calls."""
    with Session(runtime=runtime) as session:
        Env = session.cls(Counter)
        counter = Env.remote(10)
        refs = [counter.incr.remote(1) for _ in range(200)]
        assert [r.result(timeout=60) for r in refs] == list(range(11, 211))
        job_id = counter.where()
        assert job_id and counter.sandbox_id.startswith(f"slurm-{job_id}-")
        sandpool.kill(counter)
        with pytest.raises(ActorDiedError, match="killed"):
            counter.incr.remote().result(timeout=30)
        doomed = Env.remote(0)
        assert doomed.incr(2) == 2
        doomed_job = doomed.where()  # asked first: calls run in order, and block() never returns
        pending = doomed.block.remote()
        subprocess.run(["scancel", doomed_job], check=True)
        with pytest.raises(ActorDiedError):
            pending.result(timeout=30)
        with pytest.raises(ActorDiedError):
            doomed.incr.remote().result(timeout=30)
        assert not doomed.alive
    assert sh.wait_no_jobs(runtime.owner) == []


def test_slurm_nodes_are_the_runners(slurm_conf, monkeypatch):
    """With SANDPOOL_RUNTIME=slurm, list_runners() describes each node (cpus, memory, gpus, state)
    as one runner, get_runner() finds one by name and names the nodes when it does not, and the
    filters apply as to the local runner."""
    monkeypatch.setenv("SANDPOOL_RUNTIME", "slurm")
    runners = sandpool.list_runners()
    assert [r.runner_id for r in runners] == ["n1", "n2", "n3"]
    assert all(r.max_cpu_millicores == 4000 and r.max_memory_bytes == 4000 * 2**20 and r.healthy for r in runners)
    assert [r.max_gpu_count for r in runners] == [0, 0, 2] and runners[0].resources is None
    n3 = sandpool.get_runner("n3")
    assert n3.resources is not None and n3.resources.available_gpu_count == 2
    assert [r.runner_id for r in sandpool.list_runners(min_available_gpu_count=1)] == ["n3"]
    with pytest.raises(RunnerNotFoundError, match=r"no runner 'local'.*\['n1', 'n2', 'n3'\]"):
        sandpool.get_runner("local")


def test_listing_by_runner_locally():
    """Locally every sandbox runs on the runner "local": runner_ids=["local"] lists it, another id
    lists nothing, for Session.list and Sandbox.list alike."""
    with Session() as session:
        sb = session.sandbox(tags=["by-runner"])
        sb.start().result()
        assert sb.runner_id == "local"
        assert session.list(runner_ids=["local"]).result() == [sb]
        assert session.list(runner_ids=["n1"]).result() == []
        assert sandpool.Sandbox.list(tags=["by-runner"], runner_ids=["local"]).result() == [sb]
        assert sandpool.Sandbox.list(tags=["by-runner"], runner_ids=["n1"]).result() == []
