"""Resource limits of the namespaces level (cgroups) and abuse that they contain."""

import os

import pytest
from service_helpers import wait_until

from sandpool import SandboxDiedError, SandboxFailedError, SandboxStatus, Session
from _sandpool_agent.confine import cgroups
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")
LAYOUT = cgroups.detect()


@pytest.fixture
def session():
    with Session(defaults={"isolation": "namespaces"}) as s:
        yield s


def group_of(sandbox) -> dict:
    return sandbox._record.extra["cgroups"]


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_a_memory_bomb_fails_the_sandbox_with_oomkilled(session, memory_limits_enforced):
    """Going over the memory limit kills the whole sandbox: FAILED, reason OOMKilled, and the exec
    that was waiting gets SandboxDiedError saying so; the host is untouched. (On a machine that can
    enforce a memory limit at all: otherwise it skips, saying why.)"""
    sb = session.sandbox(resources={"limits": {"memory": "96Mi"}})
    proc = sb.exec(["python3", "-c", "b = [bytearray(1 << 20) for _ in range(1000)]; print('survived')"])
    with pytest.raises(SandboxDiedError, match="OOMKilled"):
        proc.result(timeout=30)
    with pytest.raises(SandboxFailedError):
        sb.wait_until_complete(timeout=10).result()
    assert sb.status == SandboxStatus.FAILED and sb.status_reason.startswith("OOMKilled")


def test_memory_below_the_limit_is_fine_and_the_limit_is_in_the_cgroup(session):
    """A sandbox that stays under its limit runs normally; the limit sits in the memory cgroup."""
    sb = session.sandbox(resources={"limits": {"memory": "128Mi"}})
    out = sb.exec(["python3", "-c", "b = bytearray(32 << 20); print(len(b))"]).result()
    assert out.stdout.strip() == str(32 << 20)
    memory = [d for d in group_of(sb)["dirs"] if d.startswith(LAYOUT.home("memory") + "/")][0]
    limit_file = "memory.max" if LAYOUT.home("memory") == LAYOUT.v2 else "memory.limit_in_bytes"
    assert int(read(os.path.join(memory, limit_file))) == 128 << 20


def test_cpu_quota_holds_a_busy_loop_to_its_share(session):
    """limits cpu=0.25: a busy loop gets at most a quarter of a core, so 0.3 s of CPU time takes it
    more than a second of wall time (0.3 s unconstrained). A busier machine only makes it slower:
    the bound cannot be missed by load."""
    sb = session.sandbox(resources={"limits": {"cpu": "250m"}})
    script = ("import time, os\n"
              "cpu = lambda: os.times().user + os.times().system\n"
              "base, began = cpu(), time.monotonic()\n"
              "while cpu() - base < 0.3: pass\n"
              "print(time.monotonic() - began)")
    took = float(sb.exec(["python3", "-c", script]).result().stdout)
    assert took > 0.9, took  # (0.3 s - one 25 ms period's burst) / 0.25


def test_a_fork_bomb_is_contained_by_pids_max(session):
    """A real shell fork bomb under pids=64 never exceeds 64 processes, and the host stays usable;
    stopping the sandbox kills every one of them."""
    sb = session.sandbox(resources={"limits": {"pids": 64}})
    sb.wait()
    sb.exec(["sh", "-c", "bomb() { bomb | bomb & }; bomb"])
    pids_dir = [d for d in group_of(sb)["dirs"] if d.startswith(LAYOUT.home("pids") + "/")][0]
    assert wait_until(lambda: int(read(os.path.join(pids_dir, "pids.events")).split()[-1]) > 0, timeout=30)
    assert int(read(os.path.join(pids_dir, "pids.current"))) <= 64  # the bomb hit the limit, and stays under it
    assert os.system("true") == 0
    sb.stop(graceful_shutdown_seconds=0).result()
    assert not os.path.exists(pids_dir)


def test_counted_forks_stop_at_the_pids_limit(session):
    """fork() fails with EAGAIN once the sandbox has pids.max processes."""
    sb = session.sandbox(resources={"limits": {"pids": 20}})
    script = ("import os, time\n"
              "n = 0\n"
              "try:\n"
              "    while n < 100:\n"
              "        if os.fork() == 0:\n"
              "            time.sleep(5); os._exit(0)\n"
              "        n += 1\n"
              "except OSError as exc:\n"
              "    print(n, exc.strerror)\n")
    out = sb.exec(["python3", "-c", script]).result().stdout.split(None, 1)
    assert int(out[0]) < 20 and "unavailable" in out[1].lower()


def test_default_pids_limit_applies_without_resources(session):
    """A sandbox without resources still gets pids.max = DEFAULT_PIDS_LIMIT (a bomb stops somewhere)."""
    from sandpool._isolation.host import DEFAULT_PIDS_LIMIT

    sb = session.sandbox()
    sb.wait()
    pids_dir = [d for d in group_of(sb)["dirs"] if d.startswith(LAYOUT.home("pids") + "/")][0]
    assert int(read(os.path.join(pids_dir, "pids.max"))) == DEFAULT_PIDS_LIMIT


def test_stop_removes_the_cgroups(session):
    """After stop, none of the sandbox's cgroup directories exist (any hierarchy)."""
    sb = session.sandbox(resources={"limits": {"memory": "256Mi", "cpu": "1", "pids": 100}})
    sb.exec(["sleep", "30"])
    sb.wait()
    dirs = list(group_of(sb)["dirs"])
    assert all(os.path.isdir(d) for d in dirs) and len(dirs) == len(LAYOUT.mounts())
    sb.stop(graceful_shutdown_seconds=0).result()
    assert not any(os.path.exists(d) for d in dirs)


def test_only_a_sandbox_with_a_memory_limit_gets_a_v1_memory_cgroup(session):
    """Where memory is a v1 hierarchy of its own, a sandbox without a memory limit stays in its
    owner's memory cgroup (one costs ~2 ms of kernel work to remove) and is in its own cgroup in
    every other hierarchy; one with a limit gets its memory cgroup; both run, and stop clean."""
    mount = cgroups.skips_memory(LAYOUT)
    if mount is None:
        pytest.skip(f"memory is not a v1 hierarchy of its own here: {LAYOUT}")
    bare, limited = session.sandbox(), session.sandbox(resources={"limits": {"memory": "256Mi"}})
    for sb in (bare, limited):
        assert sb.exec(["true"]).result().returncode == 0

    def memory_cgroup(sb) -> str:
        lines = read(f"/proc/{sb._record.agent_pid}/cgroup").splitlines()
        return next(line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(","))

    assert "/sandpool/" not in memory_cgroup(bare)
    assert memory_cgroup(limited).endswith("/" + limited._record.sandbox_id)
    assert not any(d.startswith(mount + "/") for d in group_of(bare)["dirs"])
    assert len(group_of(bare)["dirs"]) == len(LAYOUT.mounts()) - 1
    dirs = group_of(bare)["dirs"] + group_of(limited)["dirs"]
    for sb in (bare, limited):
        sb.stop(graceful_shutdown_seconds=0).result()
    assert not any(os.path.exists(d) for d in dirs)


def test_stale_cgroups_of_a_dead_owner_are_swept_at_start(tmp_path):
    """A dead owner's cgroup (with a process still in it) is killed and removed by the next start."""
    import subprocess

    import trio

    import sandpool

    state_dir = str(tmp_path / "state")
    os.makedirs(state_dir)
    group = cgroups.plan(LAYOUT, cgroups.state_key(state_dir), "o-999999-dead00", "sb-stale")
    cgroups.create(LAYOUT, group, {})
    straggler = subprocess.Popen(["sh", "-c", f"echo $$ > {group['dirs'][0]}/cgroup.procs; exec sleep 60"])
    assert wait_until(lambda: straggler.pid in cgroups.members(group))

    async def main():
        runtime = sandpool.LocalRuntime(state_dir=state_dir)
        async with trio.open_nursery() as nursery:
            await runtime.open(nursery)
            await runtime.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert straggler.wait(timeout=5) == -9
    assert not any(os.path.exists(d) for d in group["dirs"])
    assert cgroups.leftovers(state_dir) == []


def test_prune_removes_empty_groups_of_dead_owners_anywhere(tmp_path):
    """Empty cgroups of a dead owner under any state dir's key go; a group with a process stays."""
    import subprocess

    key = cgroups.state_key(str(tmp_path / "gone-state-dir"))
    empty = cgroups.plan(LAYOUT, key, "o-999998-dead01", "sb-empty")
    busy = cgroups.plan(LAYOUT, key, "o-999998-dead01", "sb-busy")
    cgroups.create(LAYOUT, empty, {})
    cgroups.create(LAYOUT, busy, {})
    sleeper = subprocess.Popen(["sh", "-c", f"echo $$ > {busy['dirs'][0]}/cgroup.procs; exec sleep 30"])
    try:
        assert wait_until(lambda: sleeper.pid in cgroups.members(busy))
        cgroups.prune()
        assert not any(os.path.exists(d) for d in empty["dirs"])
        assert os.path.isdir(busy["dirs"][0])  # never killed by a prune: not this state dir's to kill
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in cgroups.owner_dirs(LAYOUT, key, "o-999998-dead01"):
            cgroups.remove_tree(path)
        cgroups.prune()
    assert not any(os.path.exists(os.path.dirname(d)) for d in busy["dirs"])


@pytest.mark.skipif(not LAYOUT.v2, reason="no cgroup v2 tree here: nothing is delegated")
def test_groups_made_after_their_delegated_parent_was_removed_are_limited_all_the_same(tmp_path, monkeypatch):
    """create() delegates the controllers down to a v2 parent once per process, then makes each
    later group with one mkdir. When that parent was removed in between (an owner's tree pruned)
    or made again by someone else without our controllers, the next group is still made and
    limited: the delegation is done again."""
    key = cgroups.state_key(str(tmp_path))
    owner = "o-1-cafe00"
    made = []

    def one(sandbox_id: str) -> dict:
        group = cgroups.plan(LAYOUT, key, owner, sandbox_id, with_memory=False)
        limits = cgroups.limit_files(LAYOUT, group, None, None, 64)
        cgroups.create(LAYOUT, group, limits)
        made.append(group)
        for path, value in limits.items():
            assert read(path) == value
        return group

    walks = []
    enable = cgroups._enable_v2_controllers
    monkeypatch.setattr(cgroups, "_enable_v2_controllers", lambda *a: (walks.append(a), enable(*a)))
    v2_parent = next(os.path.dirname(d) for d in one("sb-a")["dirs"] if d.startswith(LAYOUT.v2 + "/"))
    one("sb-b")
    assert len(walks) == 1  # the second start: no walk
    try:
        for group in made:
            cgroups.remove(group)
        cgroups.remove_owner(os.path.join(str(tmp_path), owner))
        assert not os.path.exists(v2_parent)
        one("sb-c")  # the parent is gone: made again, delegated again
        assert len(walks) == 2
        for group in made[2:]:
            cgroups.remove(group)
        os.rmdir(v2_parent)
        os.mkdir(v2_parent)  # made again without controllers (the cache still names it)
        limited_in_v2 = any(path.startswith(v2_parent + "/") for path in cgroups.limit_files(
            LAYOUT, one("sb-d"), None, None, 64))
        assert len(walks) == (3 if limited_in_v2 else 2)  # (again only where a limit file is missing)
    finally:
        for group in made:
            cgroups.remove(group)
        cgroups.remove_owner(os.path.join(str(tmp_path), owner))
