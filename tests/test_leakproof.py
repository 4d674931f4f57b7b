"""Nothing outlives its owner: client SIGKILL, Ctrl-C, and stale state from dead owners."""

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
    """SIGKILL a client holding 5 busy sandboxes: within seconds none of their processes exist."""
    state_dir = str(tmp_path / "state")
    client = _start_client(state_dir)
    assert len(testing.leftovers(state_dir).processes) >= 10  # agents, shells, busy loops
    client.kill()
    client.wait()
    report = testing.wait_for_no_leftovers(state_dir, timeout=10)  # ~1 s is usual; 10 for a loaded machine
    testing.kill_leftovers(report)
    assert not report.processes, report
    assert not report.directories, report


def test_ctrl_c_of_a_sync_client_stops_its_sandboxes(tmp_path):
    """SIGINT to a sync client raises KeyboardInterrupt, the session closes and nothing is left."""
    state_dir = str(tmp_path / "state")
    client = _start_client(state_dir, IDLE)  # idle work: five busy loops would starve a 2-core CI box
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=60) != 0
    report = testing.wait_for_no_leftovers(state_dir, timeout=5)
    testing.kill_leftovers(report)
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
                await old.wait_until_complete()
            assert old.status.is_terminal and old.status_reason
            fresh = s.sandbox()
            assert (await fresh.exec(["echo", "again"])).stdout == "again\n"

    trio.run(main)
