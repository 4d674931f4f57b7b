"""The Slurm runtime's decisions as plain functions: no cluster needed. What a spec asks of sbatch,
the job comment, reading squeue, what a job state means, when a start is placed, retried or failed,
and what the job side gives its sandbox."""

from __future__ import annotations

import json
import os

import pytest

from sandpool import ResourceOptions, SandboxSpec, SandboxStatus, SlurmRuntime
from sandpool._isolation import admission
from sandpool._runtime.slurm import cli
from sandpool._service import slurmjob as job
from sandpool._runtime.slurm import place
from sandpool._session.shared import engine_runtime, selects_shared


def _argv(spec: SandboxSpec, **options) -> list[str]:
    return cli.sbatch_argv(spec, key="k1", owner="host:1:ab", job_dir="/spool/k1", command=["py", "-m", "x"],
                           **options)


def test_sbatch_maps_requests_lifetime_and_tags():
    """cpu rounds up to whole cpus per task, memory to MiB, gpus become gres (with a type when given),
    max_lifetime_seconds becomes whole minutes, and tags go into the job name and the comment."""
    spec = SandboxSpec(tags=("alpha", "b,c"), max_lifetime_seconds=90,
                       resources=ResourceOptions(requests={"cpu": "1500m", "memory": "300Mi"},
                                                 gpu={"count": 2, "type": "a100"}))
    argv = _argv(spec, partition="gpu", account="proj", qos="high", exclude=("n2",), extra=("--constraint=x",))
    assert argv[0] == "sbatch" and "--no-requeue" in argv and "--parsable" in argv
    for option in ("--cpus-per-task=2", "--mem=300M", "--gres=gpu:a100:2", "--time=2", "--partition=gpu",
                   "--account=proj", "--qos=high", "--exclude=n2", "--job-name=sandpool:alpha,b,c",
                   "--comment=sandpool:key=k1;owner=host:1:ab;tags=alpha,b%2Cc", "--chdir=/spool/k1"):
        assert option in argv, option
    assert argv.index("--constraint=x") > argv.index("--exclude=n2")  # the site's own options win
    assert argv[-1] == "--wrap=exec 'py' '-m' 'x'"


def test_sbatch_without_requests_asks_one_cpu_and_no_memory_gpu_or_time():
    """No requests: one cpu, and the cluster's own defaults for memory and time."""
    argv = _argv(SandboxSpec())
    assert "--cpus-per-task=1" in argv
    assert not [a for a in argv if a.startswith(("--mem", "--gres", "--time", "--partition", "--exclude"))]


def test_comment_round_trips_awkward_tags():
    """Tags with commas, bars, semicolons, spaces and non-ASCII survive the comment."""
    tags = ("a,b", "x|y", "k=v;w", "two words", "ü")
    fields = cli.decode_comment(cli.encode_comment("k", "o", tags))
    assert (fields["key"], fields["owner"], tuple(fields["tags"])) == ("k", "o", tags)
    assert cli.decode_comment("someone else's comment") == {}


def test_squeue_lines_parse_and_states_map_to_sandbox_statuses():
    """squeue's fields split on bars; Slurm's states mean pending, creating, running, terminating or an end."""
    text = ("12|RUNNING|n1|None|sandpool:a|sandpool:key=k;owner=o;tags=a|root\n"
            "13|PENDING||Resources|sandpool|sandpool:key=j;owner=o;tags=|root\nnot a line\n")
    jobs = cli.parse_squeue(text)
    assert [(j.job_id, j.state, j.nodes, j.key, j.tags) for j in jobs] == [
        ("12", "RUNNING", "n1", "k", ("a",)), ("13", "PENDING", "", "j", ())]
    assert cli.describe(jobs[1]) == "slurm job 13: PENDING (Resources)"
    expect = {("PENDING", False): "pending", ("RUNNING", False): "creating", ("RUNNING", True): "running",
              ("COMPLETING", True): "terminating", ("COMPLETED", True): "completed",
              ("CANCELLED by 0", True): "terminated", ("NODE_FAIL", True): "failed", ("TIMEOUT", True): "failed"}
    for (state, reachable), status in expect.items():
        assert cli.sandbox_status(state, reachable) == SandboxStatus(status), state


def _placement(tmp_path, state: str | None, reason: str = "None", **fields) -> place.Placement:
    p = place.Placement(key="k", job_dir=str(tmp_path), owned=True, job_id="7", **fields)
    if state is not None:
        p.job = cli.Job("7", state, "n2" if state != "PENDING" else "", reason)
    return p


def test_judge_start_places_waits_retries_or_fails(tmp_path):
    """An address means placed; a queued or freshly running job waits; a job the cluster lost before
    its sandbox started is retried; one that failed by itself fails with its output; a pending reason
    that never clears means it will never run."""
    assert place.judge_start(_placement(tmp_path, None), 0, 60)[0] == "wait"
    assert place.judge_start(_placement(tmp_path, "PENDING", "Resources"), 0, 60)[0] == "wait"
    assert place.judge_start(_placement(tmp_path, "PENDING", "PartitionConfig"), 0, 60)[0] == "never"
    assert place.judge_start(_placement(tmp_path, "RUNNING", running_since=0.0), 10, 60)[0] == "wait"
    verdict, why = place.judge_start(_placement(tmp_path, "RUNNING", running_since=0.0), 61, 60)
    assert verdict == "retry" and "did not report within 60 s" in why
    assert place.judge_start(_placement(tmp_path, "NODE_FAIL"), 0, 60)[0] == "retry"
    verdict, why = place.judge_start(_placement(tmp_path, "RUNNING", running_since=0.0), 1, 60, ("n2",))
    assert verdict == "retry" and "but node n2 stopped answering" in why  # no minute's wait on a dead node
    assert place.judge_start(_placement(tmp_path, "RUNNING", running_since=0.0), 1, 60, ("n1",))[0] == "wait"
    assert place.judge_start(_placement(tmp_path, None, gone=True), 0, 60)[0] == "retry"
    (tmp_path / "job.log").write_text("Traceback...\nModuleNotFoundError: No module named 'sandpool'\n")
    verdict, why = place.judge_start(_placement(tmp_path, "FAILED"), 0, 60)
    assert verdict == "fail" and "No module named 'sandpool'" in why
    (tmp_path / "address.json").write_text(json.dumps({"address": "10.0.0.2:4000", "sandbox_id": "sb-1"}))
    assert place.judge_start(_placement(tmp_path, "RUNNING"), 0, 60) == ("placed", "")
    (tmp_path / "address.json").write_text(json.dumps({"error": "SandboxFailedError: no image", "node": "n2"}))
    assert place.judge_start(_placement(tmp_path, "RUNNING"), 0, 60) == (
        "fail", "the sandbox could not start on node n2: SandboxFailedError: no image")


def test_end_reason_tells_a_lost_sandbox_from_one_that_ended_by_itself(tmp_path):
    """A broken connection, or a server shut down by Slurm, is lost; a plain end is the sandbox's own."""
    p = _placement(tmp_path, "RUNNING")
    assert place.end_reason(p, False, None) is None
    assert "became unreachable: gone" in place.end_reason(p, False, "gone")
    assert "was ended by Slurm:" in place.end_reason(p, True, None)
    assert "was ended by Slurm (NODE_FAIL)" in place.end_reason(_placement(tmp_path, "NODE_FAIL"), False, None)


def test_exclusions_keep_recently_dead_nodes_out(tmp_path):
    """A node seen dying is avoided until its time is up; stale job directories are found."""
    assert place.exclusions({"n2": 100.0, "n3": 50.0}, 60.0) == ("n2",)
    for key in ("old", "live", "young"):
        os.makedirs(tmp_path / key)
        (tmp_path / key / "job.json").write_text("{}")
    os.utime(tmp_path / "old", (0, 0))
    os.utime(tmp_path / "live", (0, 0))
    assert place.stale_dirs(str(tmp_path), {"live"}, now=10_000.0) == [str(tmp_path / "old")]


def test_job_side_admits_within_the_allocation_and_tells_the_sandbox_where_it_is():
    """The node-local ledger holds what Slurm allocated (cpus, memory, the gpus it assigned); the
    sandbox's environment gets the job's identity, Slurm's values winning."""
    machine = admission.Capacity(cpu=2.0, memory=8 << 30, gpus=(0, 1, 2, 3))
    env = {"SLURM_CPUS_ON_NODE": "4", "SLURM_MEM_PER_NODE": "1024", "SLURM_JOB_GPUS": "2",
           "CUDA_VISIBLE_DEVICES": "2", "SLURMD_NODENAME": "n3", "SLURM_JOB_ID": "9"}
    assert job.allocation(env, machine) == admission.Capacity(cpu=4.0, memory=1 << 30, gpus=(2,))
    no_gpu = {"SLURM_CPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1"}  # the submitter's, not Slurm's
    assert job.allocation(no_gpu, machine).gpus == ()
    identity = job.job_identity({**env, "HOME": "/root"})  # what the client adds to each sandbox's environment
    assert identity["SLURM_JOB_ID"] == "9" and identity["SLURMD_NODENAME"] == "n3" and "HOME" not in identity
    assert job.node_address({"SANDPOOL_SLURM_BIND": "10.1.2.3"}) == "10.1.2.3"


def test_runtime_options_are_checked_and_read_from_the_environment(monkeypatch):
    """Bad options name the field and the fix; SANDPOOL_RUNTIME=slurm selects it with its options."""
    with pytest.raises(ValueError, match="heartbeat_seconds must be a number of seconds > 0"):
        SlurmRuntime(heartbeat_seconds=0)
    with pytest.raises(TypeError, match="sbatch_args must be a list"):
        SlurmRuntime(sbatch_args="--exclusive")
    with pytest.raises(ValueError, match="placement_attempts"):
        SlurmRuntime(placement_attempts=0)
    rt = SlurmRuntime.from_environment({"SANDPOOL_SLURM_PARTITION": "gpu", "SANDPOOL_SLURM_ACCOUNT": "proj",
                                        "SANDPOOL_SLURM_SBATCH_ARGS": "--constraint='a b' --exclusive"})
    assert (rt.partition, rt.account, rt.sbatch_args) == ("gpu", "proj", ("--constraint=a b", "--exclusive"))
    assert repr(rt) == "<SlurmRuntime partition=gpu not_opened jobs=0>"
    monkeypatch.setenv("SANDPOOL_RUNTIME", "slurm")
    assert isinstance(engine_runtime(), SlurmRuntime) and selects_shared(None)
    monkeypatch.setenv("SANDPOOL_RUNTIME", "kubernetes")
    with pytest.raises(ValueError, match="use 'local' or 'slurm'"):
        engine_runtime()
    monkeypatch.setenv("SANDPOOL_RUNTIME", "local")
    assert engine_runtime() is None and not selects_shared(None)


def test_allocations_are_sized_by_demand_up_to_a_node_and_grow_geometrically():
    """A batch of starts gets jobs as large as a node holds; a lone extra sandbox of a spec that
    already holds slots gets a job as large as what it holds (up to a node); min_slots is a floor."""
    assert place.job_sizes(1, held=0, fit=4) == [1]
    assert place.job_sizes(6, held=0, fit=2) == [2, 2, 2]
    assert place.job_sizes(5, held=0, fit=4) == [4, 1]
    assert place.job_sizes(1, held=2, fit=4) == [2]
    assert place.job_sizes(1, held=8, fit=4) == [4]
    assert place.job_sizes(1, held=0, fit=4, floor=3) == [3]
    assert place.job_sizes(2, held=0, fit=0) == [1, 1]  # nothing fits: one a job, and sbatch says why
    node = cli.Node("n3", cpus=4, memory_mib=4000, gpus=2, state="idle")
    assert place.slots_fit(node, (1.0, None, 0)) == 4
    assert place.slots_fit(node, (0.5, 1000 * 2**20, 0)) == 4
    assert place.slots_fit(node, (1.0, None, 1)) == 2
    assert place.slots_fit(node, (8.0, None, 0)) == 0
    argv = _argv(SandboxSpec(resources=ResourceOptions(requests={"cpu": "500m", "memory": "300Mi"}, gpu={"count": 1})), slots=3)
    assert {"--cpus-per-task=2", "--mem=900M", "--gres=gpu:3"} <= set(argv)


def test_sinfo_nodes_and_sandbox_ids_parse():
    text = ("n1|4|4000|(null)|idle|0/4/0/4|0|gpu:0|\nn3|4|4000|gpu:2(S:0)|mixed|2/2/0/4|512|gpu:1(IDX:0)|\n"
            "n3|4|4000|gpu:2|mixed|2/2/0/4|512|gpu:1(IDX:0)|\nbad line\nn2|4|4000|(null)|down*|0/0/4/4|0|gpu:0|\n")
    assert cli.parse_sinfo(text) == [cli.Node("n1", 4, 4000, 0, "idle"), cli.Node("n2", 4, 4000, 0, "down"),
                                     cli.Node("n3", 4, 4000, 2, "mixed", 2, 512, 1)]
    assert place.parse_sandbox_id(place.sandbox_id("42", "sb-0a1b2c3d")) == ("42", "sb-0a1b2c3d")
    assert place.parse_sandbox_id("slurm-42") is None and place.parse_sandbox_id("sb-1") is None


def test_an_allocations_free_slots_count_its_sandboxes_and_starts_but_not_those_being_stopped():
    """A slot is taken by a sandbox it serves or a start waiting for it; a sandbox being stopped
    gives its slot back at once (the next sandbox of the spec must not ask Slurm for a new job)."""
    from sandpool._runtime.contract import SandboxRecord

    p = place.Placement(key="k", job_dir="/nowhere", owned=True, job_id="7", shape=SandboxSpec(), slots=3)
    records = [SandboxRecord(sandbox_id="", spec=SandboxSpec(), isolation="slurm") for _ in range(2)]
    for record in records:
        p.members[id(record)] = record
    p.claims = 1
    assert p.free == 0 and p.usable
    p.leaving.add(id(records[0]))
    assert p.free == 1
    p.stopping = True
    assert not p.usable
