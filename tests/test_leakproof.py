"""Nothing outlives its owner: client SIGKILL, Ctrl-C, and stale state from dead owners."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

from sandpool import testing


# Each client first gets Python's usual Ctrl-C handler: started from a non-interactive shell's
# background job (as a CI runner may be), it would inherit SIGINT ignored.
CLIENT = textwrap.dedent("""
    import signal, sys, time, sandpool
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with sandpool.Session() as s:
        sbs = [s.sandbox() for _ in range(5)]
        procs = [sb.exec(["sh", "-c", sys.argv[1]]) for sb in sbs]
        for proc in procs:
            next(iter(proc.stdout))  # "up": its command runs
        print("ready", flush=True)
        time.sleep(300)
""")


BUSY = "while :; do :; done & echo up; sleep 300"  # a CPU-bound child and a sleeping parent in each sandbox
IDLE = "sleep 300 & echo up; sleep 300"


def _start_client(state_dir: str, work: str = BUSY) -> subprocess.Popen:
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir}
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, work], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkilled_client_leaves_no_process(tmp_path):
    """SIGKILL a client holding 5 busy sandboxes: within seconds nothing of them exists (processes,
    directories, cgroups, mounts)."""
    state_dir = str(tmp_path / "state")
    client = _start_client(state_dir)
    assert len(testing.leftovers(state_dir).processes) >= 10  # agents, shells, busy loops
    client.kill()
    client.wait()
    report = testing.wait_for_no_leftovers(state_dir, timeout=10)  # ~1 s is usual; 10 for a loaded machine
    testing.kill_leftovers(report)  # (the report was taken first: cgroups are checked before this)
    assert not report, report


def test_ctrl_c_of_a_sync_client_stops_its_sandboxes(tmp_path):
    """SIGINT to a sync client raises KeyboardInterrupt, the session closes and nothing is left."""
    state_dir = str(tmp_path / "state")
    client = _start_client(state_dir, IDLE)  # idle work: five busy loops would starve a 2-core CI box
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=60) != 0
    report = testing.wait_for_no_leftovers(state_dir, timeout=5)
    testing.kill_leftovers(report)  # (the report was taken first: cgroups are checked before this)
    assert not report, report


def test_stale_state_of_dead_owner_is_swept_on_next_start(tmp_path):
    """An owner directory whose template is dead is removed by the next runtime start."""
    import sandpool
    import trio

    state_dir = tmp_path / "state"
    stale = state_dir / "o-999999-abcdef"
    (stale / "sb-dead" / "root").mkdir(parents=True)
    (stale / "template").write_text("999999 123\n")

    async def main():
        runtime = sandpool.LocalRuntime(state_dir=str(state_dir))
        async with trio.open_nursery() as nursery:
            await runtime.open(nursery)
            assert not stale.exists()
            await runtime.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not any(state_dir.iterdir())
    assert not testing.leftovers(str(state_dir)), "cgroups, processes or mounts of the run remain"


def test_process_exit_with_a_running_standalone_sandbox_is_prompt_and_clean(tmp_path):
    """A script that exits with a Sandbox.run() still running stops it at exit, without a long wait."""
    state_dir = str(tmp_path / "state")
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir}
    script = "import sandpool, time; sandpool.Sandbox.run('sleep', '300'); print(time.monotonic())"
    done = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=30, capture_output=True,
                          text=True)
    exiting = time.monotonic() - float(done.stdout)  # from the script's last line to its exit (not its start-up)
    assert exiting < 4.0, exiting  # the runtime's exit reports must still be read at exit (it once took 6 s)
    report = testing.wait_for_no_leftovers(state_dir, timeout=5)
    assert not report, report


def test_terminal_ctrl_c_reaches_the_client_not_the_template(tmp_path):
    """SIGINT to the client's whole process group: a client that catches it keeps working."""
    state_dir = str(tmp_path / "state")
    script = textwrap.dedent("""
        import signal, time, sandpool
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with sandpool.Session() as s:
            s.sandbox().wait()
            try:
                print("ready", flush=True)
                time.sleep(30)
            except KeyboardInterrupt:
                pass
            print(s.sandbox().exec(["echo", "still-works"]).result().stdout.strip(), flush=True)
    """)
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir}
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    assert client.stdout.readline().strip() == "ready"
    os.killpg(client.pid, signal.SIGINT)
    assert client.stdout.readline().strip() == "still-works"
    assert client.wait(timeout=20) == 0
    report = testing.wait_for_no_leftovers(state_dir, timeout=5)
    assert not report, report


def test_a_dead_template_is_replaced_and_its_sandboxes_end(tmp_path):
    """SIGKILL the template: its sandboxes end with a reason, and the next sandbox gets a new template."""
    import trio

    import sandpool

    async def main():
        async with sandpool.Session() as s:
            old = s.sandbox()
            await old
            os.kill(s._runtime._template.pid, signal.SIGKILL)
            with trio.fail_after(10):
                with contextlib.suppress(sandpool.SandboxError):  # failed or terminated: either is an end
                    await old.wait_until_complete()
            assert old.status.is_terminal and old.status_reason
            fresh = s.sandbox()
            assert (await fresh.exec(["echo", "again"])).stdout == "again\n"

    trio.run(main)


# -- the leak check itself: it must see what hides -----------------------------------------------

HOLD = textwrap.dedent("""
    import sys, sandpool
    with sandpool.Session() as s:
        # the daemon says it left the exec's session (whose process group ends with the exec) on a fifo
        s.sandbox().exec(["sh", "-c", "mkfifo /tmp/up && (env -i setsid sh -c 'echo up > /tmp/up; "
                                      "exec sleep 1000' >/dev/null 2>&1 &) && read x < /tmp/up"]).result()
        print("ready", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_leak_check_sees_a_daemonised_process_and_a_runtime_left_open(tmp_path):
    """A process that left its sandbox's session with a clean environment (``env -i setsid``) is
    still found below its agent, and a live template counts unless its owner is kept."""
    state_dir = str(tmp_path / "state")
    client = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "SANDPOOL_STATE_DIR": state_dir}, text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        report = testing.leftovers(state_dir)
        assert any("sleep 1000" in cmd for _pid, cmd in report.processes), report
        assert [os.path.dirname(owner) for _pid, owner in report.templates] == [state_dir], report
        assert report.cgroups or os.geteuid() != 0, report  # its sandbox's (and the owner's) groups
        kept = testing.leftovers(state_dir, keep_parents={client.pid})
        assert not kept.templates and any("sleep 1000" in cmd for _pid, cmd in kept.processes), kept
    finally:
        client.stdin.close()
        client.wait(timeout=30)
    report = testing.wait_for_no_leftovers(state_dir, timeout=5)
    assert not report, report


def test_leak_check_sees_owner_cgroups_mounts_netns_and_links_without_a_template(tmp_path):
    """What an owner without a template left outside its directory (its cgroup, a mount below the
    state dir, a named network namespace, a link aliased to the state dir) is reported, and
    kill_leftovers removes its cgroups."""
    import tempfile

    import pytest

    from _sandpool_agent.confine import cgroups
    from sandpool._isolation import network

    if os.geteuid() != 0:
        pytest.skip("cgroups, mounts, namespaces and links are made by root")
    state_dir = tmp_path / "state"
    owner = f"o-{os.getpid()}-dead00"  # a live pid: other runs' prune of dead owners' empty groups skips it
    root = state_dir / owner / "sb-gone" / "root"  # a sandbox root its dead owner left mounted
    root.mkdir(parents=True)
    key = cgroups.state_key(str(state_dir))
    layout = cgroups.detect()
    group = cgroups.plan(layout, key, owner, "sb-gone")
    cgroups.create(layout, group, {})
    owner_groups = {os.path.dirname(d) for d in group["dirs"]}
    netns = f"{network.NETNS_PREFIX}{key}-t"
    link = f"splk{os.getpid() % 100000}"
    subprocess.run(["mount", "-t", "tmpfs", "leakcheck", str(root)], check=True)
    elsewhere = tempfile.mkdtemp(prefix="sandpool-leakcheck-")  # outside every directory of the run
    subprocess.run(["mount", "--bind", str(state_dir / owner / "sb-gone"), elsewhere], check=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", link + "p"], check=True)
    try:
        subprocess.run(["ip", "link", "set", link, "alias", f"{network.NETNS_PREFIX}{key}-veth"], check=True)
        report = testing.leftovers(str(tmp_path / "elsewhere"), str(tmp_path))  # found below tmp_path, too
        assert report == testing.leftovers(str(state_dir))
        assert report.directories == [str(state_dir / owner)], report  # it has no template file
        assert owner_groups <= set(report.cgroups), report  # owner level, with no template at all
        assert sorted(report.mounts) == sorted([str(root), elsewhere]), report  # a bind mount of it anywhere
        assert report.netns == [os.path.join(network.NETNS_DIR, netns)], report
        assert report.links == [link], report
    finally:
        subprocess.run(["umount", str(root)])
        subprocess.run(["umount", elsewhere])
        os.rmdir(elsewhere)
        subprocess.run(["ip", "netns", "del", netns])
        subprocess.run(["ip", "link", "del", link])
        testing.kill_leftovers(testing.leftovers(str(state_dir)))
    assert not testing.leftovers(str(state_dir)), "kill_leftovers left the cgroups"


INNER_TESTS = textwrap.dedent("""
    import os, pytest

    @pytest.fixture(scope="session")
    def leaves_an_owner_dir():
        yield
        os.mkdir(os.path.join(os.environ["SANDPOOL_STATE_DIR"], "o-1-leaked"))  # after every test's check

    def test_skips(leaves_an_owner_dir):
        pytest.skip("no widget here")

    @pytest.mark.ci_may_skip("CI machines have no GPU")
    def test_may_skip():
        pytest.skip("no GPU")
""")


def test_strict_run_fails_a_skip_and_a_leak_found_at_the_end_of_the_session(tmp_path):
    """Under SANDPOOL_TEST_STRICT=1 a plain skip fails (a ci_may_skip one does not), and what is
    left once the last fixture ended fails the session."""
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "SANDPOOL_TEST_STRICT": "1", "PYTHONPATH": tests_dir}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:randomly",
                           "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "skipped under SANDPOOL_TEST_STRICT=1, where every requirement is installed: " in done.stdout
    assert "1 failed, 1 skipped" in done.stdout, done.stdout
    assert "LEAK at the end of the session" in done.stdout and "o-1-leaked" in done.stdout, done.stdout
