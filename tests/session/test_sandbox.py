"""The sync API against real local sandboxes: lifecycle, exec, streaming, stdin, files, errors."""

import os

import pytest
from proc_helpers import running
from service_helpers import wait_until

import sandpool
from sandpool import (
    ResourceOptions,
    Sandbox,
    SandboxDefaults,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxStatus,
    SandboxTimeoutError,
    Session,
)


@pytest.fixture
def session():
    with Session(SandboxDefaults(tags=("t",))) as s:
        yield s


def test_lazy_start_and_explicit_start_wait(session):
    """session.sandbox() starts nothing; start() is idempotent; wait() returns the running sandbox."""
    sb = session.sandbox()
    assert sb.status is None and sb.sandbox_id is None
    assert session.sandbox_count == 1
    ref = sb.start()
    assert sb.start() is ref
    ref.result()
    assert sb.wait() is sb
    assert sb.status == SandboxStatus.RUNNING and sb.sandbox_id.startswith("sb-")
    assert "running" in repr(sb) and "isolation=" in repr(sb)


def test_first_exec_starts_a_lazy_sandbox(session):
    """exec on an unstarted sandbox starts it, and the result carries stdout, stderr and the code."""
    result = session.sandbox().exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result()
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)
    assert result.command == ["sh", "-c", "echo out; echo err >&2; exit 3"]


def test_check_raises_with_result_attached(session):
    """check=True turns a non-zero exit into SandboxExecutionError carrying the ProcessResult."""
    with pytest.raises(SandboxExecutionError) as info:
        session.sandbox().exec(["sh", "-c", "echo nope >&2; exit 2"], check=True).result()
    assert info.value.exec_result.returncode == 2 and info.value.exec_result.stderr == "nope\n"


def test_missing_command_is_exit_127_with_message(session):
    """A command that does not exist behaves like a shell: exit 127 and a message on stderr."""
    result = session.sandbox().exec(["no-such-command-xyz"]).result()
    assert result.returncode == 127 and "no-such-command-xyz" in result.stderr


def test_timeout_kills_the_remote_process_tree(session):
    """timeout_seconds raises SandboxTimeoutError and kills the process and its children."""
    sb = session.sandbox()
    marker, child = "/tmp/child-alive", f"{600 + os.getpid() % 100_000}.25"
    script = f"(touch $SANDPOOL_ROOT/tmp/child-started; sleep {child}; touch $SANDPOOL_ROOT{marker}) & sleep 30"
    with pytest.raises(SandboxTimeoutError):
        sb.exec(["sh", "-c", script], timeout_seconds=2).result()
    assert sb.read_file("/tmp/child-started").result() == b""  # the child ran before the timeout
    assert wait_until(lambda: not running(["sleep", child])), "the timed-out command's child lives on"
    with pytest.raises(SandboxFileError):  # and it is gone before it could write
        sb.read_file(marker).result()


def test_streaming_stdout_as_it_happens(session):
    """Iterating proc.stdout yields chunks while the process still runs."""
    proc = session.sandbox().exec(["sh", "-c", "echo one; sleep 0.3; echo two"])
    first = next(iter(proc.stdout))
    assert first == "one\n" and proc.poll() is None
    assert "".join(proc.stdout) == "two\n"
    assert proc.wait() == 0 and proc.returncode == 0


def test_stdin_write_and_close(session):
    """stdin=True gives a writer whose bytes reach the process, in order, until close()."""
    proc = session.sandbox().exec(["cat"], stdin=True)
    refs = [proc.stdin.write(f"{i},".encode()) for i in range(50)]
    proc.stdin.writeline("end")
    proc.stdin.close().result()
    sandpool.results(refs)
    assert proc.result().stdout == "".join(f"{i}," for i in range(50)) + "end\n"


def test_cancel_kills_the_remote_process(session):
    """Process.cancel() kills the remote process; result() then raises OperationCancelled."""
    sb = session.sandbox()
    proc = sb.exec(["sh", "-c", "echo $$; sleep 600; echo x > $SANDPOOL_ROOT/late"])
    pid = next(iter(proc.stdout)).strip()  # it runs
    assert proc.cancel()
    with pytest.raises(sandpool.OperationCancelled):
        proc.result()
    assert wait_until(lambda: sb.exec(["test", "-e", f"/proc/{pid}"]).result().returncode != 0)
    with pytest.raises(SandboxFileError):  # and it is gone before it could write
        sb.read_file("/late").result()


def test_signals_reach_the_process(session):
    """send_signal delivers a signal the process can handle; kill() ends it with 128+9."""
    sb = session.sandbox()
    proc = sb.exec(["sh", "-c", "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.05; done"])
    assert next(iter(proc.stdout)) == "ready\n"
    proc.send_signal(2).result()
    result = proc.result(timeout=10)
    assert result.returncode == 7 and "got-int" in result.stdout
    sleeper = sb.exec(["sleep", "30"])
    sleeper.kill().result()  # sent after the exec, so the agent has started the process by then
    assert sleeper.wait(timeout=10) == 137


def test_env_cwd_and_clean_environment(session):
    """The sandbox has a clean environment plus its variables; exec adds env= and cwd= on top."""
    sb = session.sandbox(environment_variables={"A": "1"}, working_dir="/work")
    assert "SECRET_OF_HOST" not in sb.exec(["env"]).result().stdout
    result = sb.exec(["sh", "-c", "echo $A$B; pwd"], env={"B": "2"}).result()
    lines = result.stdout.split()
    assert lines[0] == "12" and lines[1].endswith("/work")  # namespaces: /work; process: <root>/work
    sb.exec(["mkdir", "-p", "sub"]).result()
    assert sb.exec(["pwd"], cwd="/work/sub").result().stdout.strip().endswith("/work/sub")


def test_files_round_trip_and_confinement(session):
    """write_file/read_file see the sandbox's own files; escaping paths and missing files fail clearly."""
    sb = session.sandbox(isolation="process")  # a root directory to escape (namespaces: '/..' is '/')
    payload = os.urandom(3 * 1024 * 1024)
    sb.write_file("/data/blob.bin", payload).result()
    assert sb.read_file("/data/blob.bin").result() == payload
    assert sb.exec(["cat", "data/blob.bin"]).result().stdout_bytes == payload
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/../../etc/passwd").result()
    assert info.value.reason == "CWSANDBOX_FILE_OUTSIDE_SANDBOX"
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/nope").result()
    assert info.value.reason == "CWSANDBOX_FILE_NOT_FOUND" and info.value.filepath == "/nope"
    with pytest.raises(TypeError, match="encode text first"):
        sb.write_file("/x", "text")


def test_other_sandboxes_files_are_invisible(session):
    """Two sandboxes have separate filesystems for file operations."""
    a, b = session.sandbox(), session.sandbox()
    a.write_file("/only-a", b"a").result()
    with pytest.raises(SandboxFileError):
        b.read_file("/only-a").result()


def test_stop_then_use_raises_not_running(session):
    """After stop(), the sandbox is TERMINATED with returncode 143 and refuses work."""
    sb = session.sandbox()
    sb.wait()
    sb.stop(graceful_shutdown_seconds=1).result()
    assert sb.status == SandboxStatus.TERMINATED and sb.returncode == 143
    assert session.sandbox_count == 0
    with pytest.raises(SandboxNotRunningError):
        sb.exec(["true"]).result()


def test_stop_of_never_started_sandbox(session):
    """Stopping a sandbox that never started ends it without starting a process."""
    sb = session.sandbox()
    sb.stop().result()
    assert sb.status == SandboxStatus.TERMINATED and sb.sandbox_id is None


def test_main_command_exit_completes_or_fails_the_sandbox(session):
    """A main command that exits ends the sandbox: 0 is COMPLETED, non-zero FAILED with its code."""
    ok = session.sandbox(command="sh", args=["-c", "sleep 0.2"])
    bad = session.sandbox(command="sh", args=["-c", "exit 4"])
    ok.wait_until_complete(timeout=10).result()
    with pytest.raises(SandboxFailedError):  # as in cwsandbox: a failed sandbox raises
        bad.wait_until_complete(timeout=10).result()
    assert ok.status == SandboxStatus.COMPLETED and ok.returncode == 0
    assert bad.status == SandboxStatus.FAILED and bad.returncode == 4


def test_command_without_args_means_no_args(session):
    """command='sleep' with args=['30'] runs sleep 30; command alone gets no inherited args."""
    sb = session.sandbox(command="sleep", args=["30"])
    sb.wait()
    assert sb.status == SandboxStatus.RUNNING
    assert sb.spec.argv() == ["sleep", "30"]
    assert session.sandbox(command="true").spec.argv() == ["true"]


def test_max_lifetime_stops_the_sandbox_with_a_reason(session):
    """max_lifetime_seconds ends the sandbox on time and says why."""
    sb = session.sandbox(max_lifetime_seconds=0.5)
    sb.wait()
    sb.wait_until_complete(timeout=10, raise_on_termination=False).result()
    assert sb.status == SandboxStatus.TERMINATED and "max_lifetime" in sb.status_reason


def test_unknown_option_and_bad_arguments_name_the_fix(session):
    """Misuse gets an error naming the field, the value and the fix."""
    with pytest.raises(TypeError, match="tags"):
        session.sandbox(tgas=["x"])
    with pytest.raises(ValueError, match="non-empty list"):
        session.sandbox().exec("echo hi")
    with pytest.raises(ValueError, match="absolute path"):
        session.sandbox().exec(["pwd"], cwd="relative")


def test_output_nobody_reads_is_bounded_and_never_blocks(session):
    """100 MB of output that nobody reads completes; the result keeps only the newest bytes."""
    sb = session.sandbox(max_output_bytes=8 * 1024 * 1024)
    proc = sb.exec(["sh", "-c", "head -c 100000000 /dev/zero; echo done >&2"])
    result = proc.result(timeout=60)
    assert result.returncode == 0 and result.stderr == "done\n"
    assert result.truncated and len(result.stdout_bytes) <= 8 * 1024 * 1024


def test_rlimit_from_memory_limit(session):
    """resources.limits.memory becomes the sandbox's RLIMIT_DATA at the process level."""
    sb = session.sandbox(resources=ResourceOptions(limits={"memory": "256Mi"}), isolation="process")
    out = sb.exec(["python3", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_DATA)[0])"]).result()
    assert out.stdout.strip() == str(256 * 1024 * 1024)


def test_sandbox_run_standalone_context_manager():
    """Sandbox.run() starts eagerly and its with-block stops it, with no session."""
    with Sandbox.run("sleep", "30") as sb:
        assert sb.status == SandboxStatus.RUNNING
        assert sb.exec(["echo", "x"]).result().stdout == "x\n"
    assert sb.status == SandboxStatus.TERMINATED


def test_list_and_adopt(session):
    """Sandbox.list(tags=) finds running sandboxes by tag; adopt makes a session stop them."""
    sb = Sandbox.run(tags=["orphan-work"])
    found = Sandbox.list(tags=["orphan-work"]).result()
    assert sb in found
    assert Sandbox.from_id(sb.sandbox_id).result() is sb
    session.adopt(sb)
    session.close().result()
    assert sb.status == SandboxStatus.TERMINATED
    assert sb not in Sandbox.list(tags=["orphan-work"]).result()
    with pytest.raises(sandpool.SandboxNotFoundError):
        Sandbox.from_id("sb-nope").result()


def test_closed_session_refuses_new_sandboxes():
    """After close, session.sandbox() raises an error naming the fix; close is idempotent."""
    s = Session()
    sb = s.sandbox()
    sb.wait()
    ref = s.close()
    assert s.close() is ref
    ref.result()
    assert s.sandbox_count == 0 and sb.status == SandboxStatus.TERMINATED
    with pytest.raises(sandpool.SandboxError, match="new Session"):
        s.sandbox()


def test_exception_inside_block_stops_everything_and_propagates_unchanged():
    """An exception in the with-block stops every sandbox and reaches the caller as itself."""
    class Boom(Exception):
        pass

    with pytest.raises(Boom) as info:
        with Session() as s:
            sbs = [s.sandbox() for _ in range(3)]
            for sb in sbs:
                sb.exec(["sleep", "30"])
            sbs[0].wait()
            raise Boom("x")
    assert type(info.value) is Boom
    assert all(sb.status is not None and sb.status.is_terminal for sb in sbs)


def test_result_inside_trio_names_the_fix(session):
    """Blocking .result() on an unfinished op inside trio raises RuntimeError telling to use await;
    a finished op answers anywhere."""
    import trio

    ref = session.sandbox().exec(["sleep", "0.5"])

    async def main():
        with pytest.raises(RuntimeError, match="await"):
            ref.result()
        assert sandpool.OperationRef.completed(1).result() == 1

    trio.run(main)
    ref.result()


def test_malformed_frame_from_the_client_is_refused_and_the_sandbox_keeps_serving(session):
    """Garbage on a sandbox's connection is answered with an error by its agent, which serves on."""
    victim, bystander = session.sandbox(), session.sandbox()
    victim.wait()
    bystander.wait()

    async def send_garbage():
        await victim._record.channel.send_bytes(b"\x00\x00\x00\x03\xc1\xc1\xc1")

    sandpool.OperationRef.spawn(victim._host, send_garbage).result()
    assert victim.exec(["echo", "still"]).result().stdout == "still\n"
    assert victim.status == SandboxStatus.RUNNING
    assert bystander.exec(["echo", "ok"]).result().stdout == "ok\n"


def test_wait_helpers_accept_sandboxes_and_time_out_clearly(session):
    """sandpool.wait([sandbox]) waits until it runs; wait_until_complete's timeout is SandboxTimeoutError."""
    sb = session.sandbox()
    done, pending = sandpool.wait([sb], timeout=30)
    assert done == [sb] and pending == [] and sb.status == SandboxStatus.RUNNING
    with pytest.raises(SandboxTimeoutError, match="did not complete"):
        sb.wait_until_complete(timeout=0.1).result()


def test_session_list_and_from_id_inside_trio(session):
    """session.list()/from_id() work when awaited inside trio."""
    import trio

    sb = session.sandbox(tags=["in-trio"])
    sb.wait()

    async def main():
        return await session.list(tags=["in-trio"]), await session.from_id(sb.sandbox_id)

    found, same = trio.run(main)
    assert found == [sb] and same is sb
