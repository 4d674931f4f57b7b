"""Bad input never kills or wedges a sandbox's agent: the client refuses it with a ValueError naming
the field, the value and the fix; the agent, if a bad frame still reaches it (a broken or hostile
client), answers that request with an error and keeps serving; file operations refuse FIFOs and
devices, stop at their size limit and never hold up execs, timeouts or stop; and every operation on
a dead sandbox fails at once with the sandbox's reason. Each test also shows the sandbox (and its
neighbours) still work afterwards."""

import math
import mmap
import os
import signal
import time

import pytest

import sandpool
from sandpool import ProtocolError, SandboxDefaults, SandboxError, SandboxFailedError, SandboxFileError, SandboxNotRunningError, SandboxStatus, SandboxTimeoutError, Session
from _sandpool_agent import wire as _wire

NOT_REGULAR = "CWSANDBOX_FILE_NOT_REGULAR"


@pytest.fixture
def session():
    with Session(SandboxDefaults(tags=("agent-input",))) as s:
        yield s


def works(sb) -> None:
    """The sandbox still runs commands and moves files."""
    assert sb.exec(["echo", "alive"]).result(timeout=30).stdout == "alive\n"
    sb.write_file("/tmp/alive.txt", b"ok").result(timeout=30)
    assert sb.read_file("/tmp/alive.txt").result(timeout=30) == b"ok"


@pytest.mark.parametrize("call, words", [
    (lambda sb: sb.exec(["echo", "a\x00b"]), "argument 1 of command contains a NUL byte"),
    (lambda sb: sb.exec(["ec\x00ho"]), "argument 0 of command contains a NUL byte"),
    (lambda sb: sb.exec(["env"], env={"A": "x\x00y"}), "env value of 'A' contains a NUL byte"),
    (lambda sb: sb.exec(["env"], env={"A\x00": "x"}), "env name contains a NUL byte"),
    (lambda sb: sb.exec(["env"], env={"A=B": "x"}), "env name 'A=B' contains '='"),
    (lambda sb: sb.exec(["env"], env={"": "x"}), "env has an empty variable name"),
    (lambda sb: sb.exec(["pwd"], cwd="/tmp\x00/x"), "cwd contains a NUL byte"),
    (lambda sb: sb.read_file("/tmp/a\x00b"), "filepath contains a NUL byte"),
    (lambda sb: sb.write_file("/tmp/a\x00b", b"x"), "filepath contains a NUL byte"),
    (lambda sb: sb.exec(["echo"] * (_wire.MAX_ARGS + 1)), f"above the limit of {_wire.MAX_ARGS}"),
])
def test_client_refuses_nul_and_bad_env_names_naming_field_value_and_fix(session, call, words):
    """NUL bytes in an argument, env name or value, cwd or path, and '=' or nothing as an env name, are
    a ValueError before anything is sent; the sandbox runs on."""
    sb = session.sandbox()
    sb.wait()
    with pytest.raises(ValueError) as info:
        call(sb)
    assert words in str(info.value)
    assert "remove it" in str(info.value) or "'='" in str(info.value) or "give every" in str(info.value) \
        or "pass fewer" in str(info.value)
    works(sb)


def request(sb, frame: dict, timeout: float = 30) -> dict:
    """Send a raw frame as a broken client would (no client-side checks) and return the agent's answer."""
    return sandpool.OperationRef.spawn(sb._host, sb._request, frame, timeout).result()


@pytest.mark.parametrize("frame, words", [
    ({"t": "exec", "argv": ["echo", "a\x00b"]}, "argument 1 of 'exec' frame field 'argv' contains a NUL byte"),
    ({"t": "exec", "argv": ["env"], "env": {"A": "x\x00"}}, "contains a NUL byte"),
    ({"t": "exec", "argv": ["env"], "env": {"A=B": "x"}}, "name 'A=B' contains '='"),
    ({"t": "exec", "argv": ["env"], "env": {"": "x"}}, "empty variable name"),
    ({"t": "exec", "argv": ["env"], "env": {1: "x"}}, "must map str to str"),
    ({"t": "exec", "argv": ["pwd"], "cwd": "/\x00"}, "'exec' frame field 'cwd' contains a NUL byte"),
    ({"t": "exec", "argv": []}, "'argv' is empty"),
    ({"t": "exec", "argv": [1, 2]}, "argument 0 of 'exec' frame field 'argv' must be str"),
    ({"t": "read_file", "path": "/tmp/\x00"}, "'read_file' frame field 'path' contains a NUL byte"),
    ({"t": "write_file", "path": "/tmp/x", "data": "text"}, "'data' must be bytes"),
    ({"t": "write_file", "path": "/tmp/x", "data": b"", "mode": 1 << 40}, "'mode' must be between"),
    ({"t": "signal", "sig": 1 << 40}, "'sig' must be between 1 and 64"),
    ({"t": "stdin", "data": None}, "'data' must be bytes"),
    ({"t": "output", "fd": 1, "data": b"x"}, "does not accept 'output' frames"),
    ({"t": "spawn", "config": {}}, "does not accept 'spawn' frames"),
    ({"t": "hello", "version": _wire.PROTOCOL_VERSION + 7}, "same sandpool version"),
])
def test_agent_answers_a_bad_frame_with_an_error_and_keeps_serving(session, frame, words):
    """A frame that bypasses the client's checks (NUL, '=' in an env name, wrong types, out-of-range
    numbers, kinds only an agent sends) is answered with a protocol error naming the field; the agent
    lives on and serves the next request."""
    sb = session.sandbox()
    sb.wait()
    answer = request(sb, dict(frame))
    assert answer["t"] == "error" and answer["kind"] == "protocol", answer
    assert words in answer["message"], answer["message"]
    assert sb.status == SandboxStatus.RUNNING
    works(sb)


def test_agent_survives_undecodable_and_unaddressed_frames(session):
    """Bytes that are not msgpack, a frame that is not a map, a NaN stop grace and a frame without a kind
    reach the agent in one write; it answers each, stays up, and its neighbour never notices."""
    victim, bystander = session.sandbox(), session.sandbox()
    victim.wait()
    bystander.wait()
    garbage = b"".join([
        b"\x00\x00\x00\x03\xc1\xc1\xc1",
        _wire.encode([1, 2, 3]),  # type: ignore[arg-type]
        _wire.encode({"t": "stop", "grace": math.nan}),
        _wire.encode({"t": "stop", "grace": math.inf}),
        _wire.encode({"x": 5}),
    ])

    async def send():
        await victim._record.channel.send_bytes(garbage)

    sandpool.OperationRef.spawn(victim._host, send).result()
    works(victim)
    assert victim.status == SandboxStatus.RUNNING
    works(bystander)


def test_read_of_a_fifo_is_refused_at_once(session):
    """read_file of a FIFO (which would block for good) fails at once with CWSANDBOX_FILE_NOT_REGULAR; so
    does a write over it; the sandbox serves on."""
    sb = session.sandbox()
    sb.exec(["mkfifo", "/tmp/fifo"], check=True).result()
    started = time.monotonic()
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/tmp/fifo", timeout_seconds=30).result()
    assert info.value.reason == NOT_REGULAR and "FIFO" in str(info.value)
    assert "allow_special_files=True" in str(info.value)
    with pytest.raises(SandboxFileError) as info:
        sb.write_file("/tmp/fifo", b"x", timeout_seconds=30).result()
    assert info.value.reason == NOT_REGULAR
    assert time.monotonic() - started < 10
    works(sb)


def test_read_of_dev_zero_is_refused_instead_of_exhausting_memory(session):
    """read_file('/dev/zero') (which never ends) fails at once with CWSANDBOX_FILE_NOT_REGULAR; the
    sandbox serves on."""
    sb = session.sandbox()
    assert sb.exec(["test", "-c", "/dev/zero"]).result().returncode == 0
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/dev/zero", timeout_seconds=30).result()
    assert info.value.reason == NOT_REGULAR and "character device" in str(info.value)
    works(sb)


def test_special_files_on_request_are_read_off_the_agents_loop(session):
    """With allow_special_files a FIFO is read until its writer closes it; while that read waits, an
    exec's timeout still fires on time, other execs run, and stop ends the pending read with the
    sandbox's reason."""
    sb = session.sandbox()
    sb.exec(["mkfifo", "/tmp/fifo"], check=True).result()
    pending = sb.read_file("/tmp/fifo", allow_special_files=True, timeout_seconds=120)
    started = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        sb.exec(["sleep", "60"], timeout_seconds=1).result()
    assert time.monotonic() - started < 15
    assert not pending.done()
    works(sb)
    sb.exec(["sh", "-c", "echo through > /tmp/fifo"], check=True).result(timeout=30)
    assert pending.result(timeout=30) == b"through\n"

    stuck = sb.read_file("/tmp/fifo", allow_special_files=True, timeout_seconds=120)
    started = time.monotonic()
    sb.stop(graceful_shutdown_seconds=0).result(timeout=30)
    with pytest.raises(SandboxError):
        stuck.result(timeout=30)
    assert time.monotonic() - started < 15
    assert sb.status == SandboxStatus.TERMINATED


def test_write_beyond_the_limit_is_too_large_and_nothing_is_sent(session):
    """A write of more than MAX_FILE_BYTES fails with CWSANDBOX_FILE_TOO_LARGE before a byte is sent
    (the buffer here is an untouched mapping: no memory is spent on it); the sandbox serves on."""
    sb = session.sandbox()
    sb.wait()
    with mmap.mmap(-1, _wire.MAX_FILE_BYTES + 1) as huge:
        with pytest.raises(SandboxFileError) as info:
            sb.write_file("/tmp/huge", memoryview(huge)).result(timeout=30)
    assert info.value.reason == "CWSANDBOX_FILE_TOO_LARGE" and str(_wire.MAX_FILE_BYTES) in str(info.value)
    assert sb.exec(["test", "-e", "/tmp/huge"]).result().returncode == 1
    works(sb)


def test_stdin_of_a_process_in_a_dead_sandbox_fails_at_once_with_its_reason(session):
    """Writes to the stdin of a process whose sandbox died (its agent killed) fail at once with the
    sandbox's reason; so do writes to an exec issued after the sandbox was stopped. A neighbour works."""
    sb, neighbour = session.sandbox(), session.sandbox()
    proc = sb.exec(["cat"], stdin=True)
    proc.stdin.write(b"first\n").result(timeout=30)
    os.kill(sb._record.agent_pid, signal.SIGKILL)
    with pytest.raises(SandboxFailedError):
        sb.wait_until_complete(timeout=30).result()
    assert sb.status == SandboxStatus.FAILED
    started = time.monotonic()
    with pytest.raises(SandboxError) as info:
        proc.stdin.write(b"second\n").result(timeout=30)
    assert "killed by SIGKILL" in str(info.value)
    with pytest.raises(SandboxError):
        proc.result(timeout=30)
    for late in (lambda: sb.exec(["true"]), lambda: sb.read_file("/tmp/x"), lambda: sb.write_file("/tmp/x", b"")):
        with pytest.raises(SandboxError, match="killed by SIGKILL"):
            late().result(timeout=30)

    stopped = session.sandbox()
    stopped.stop().result()
    late = stopped.exec(["cat"], stdin=True)
    with pytest.raises(SandboxNotRunningError, match="stopped"):
        late.stdin.write(b"x").result(timeout=30)
    assert time.monotonic() - started < 10
    works(neighbour)


def test_stdout_of_an_exec_on_a_stopped_sandbox_ends_with_its_error(session):
    """Reading proc.stdout (sync and async) of an exec on a stopped sandbox ends at once with the
    sandbox's error instead of waiting for good; the session's other sandboxes work."""
    sb, neighbour = session.sandbox(), session.sandbox()
    sb.wait()
    sb.stop().result()
    proc = sb.exec(["echo", "hi"])
    started = time.monotonic()
    with pytest.raises(SandboxNotRunningError, match="has been stopped"):
        list(proc.stdout)
    with pytest.raises(SandboxNotRunningError):
        list(proc.stderr)

    async def read_async():
        return [chunk async for chunk in sb.exec(["echo", "hi"]).stdout]

    with pytest.raises(SandboxNotRunningError):
        sandpool.OperationRef.spawn(sb._host, read_async).result(timeout=30)
    assert time.monotonic() - started < 10
    works(neighbour)


def test_stdout_of_a_running_exec_ends_with_the_error_when_its_sandbox_dies(session):
    """A live reader of a process whose sandbox is killed under it ends with the sandbox's death."""
    sb = session.sandbox()
    proc = sb.exec(["sh", "-c", "echo ready; sleep 600"])
    chunks = iter(proc.stdout)
    assert next(chunks) == "ready\n"
    os.kill(sb._record.agent_pid, signal.SIGKILL)
    with pytest.raises(SandboxError, match="killed by SIGKILL"):
        list(chunks)


def test_file_operation_protocol_errors_are_not_file_errors(session):
    """An agent's protocol refusal of a file operation surfaces as ProtocolError, not as a file reason."""
    sb = session.sandbox()
    sb.wait()
    answer = request(sb, {"t": "read_file", "path": ""})
    assert answer["kind"] == "protocol" and "'path' is empty" in answer["message"]
    with pytest.raises(ValueError, match="non-empty string"):
        sb.read_file("")
    works(sb)
    assert issubclass(ProtocolError, sandpool.SandpoolError)


def agent_rss(sb) -> int:
    with open(f"/proc/{sb._record.agent_pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_stdin_for_a_process_that_never_reads_is_held_to_a_window(session):
    """Writing 64 MiB to a process that never reads its stdin does not pile up in the agent: the write
    waits once the window is full (the agent holds a few MiB), and ends when the process does."""
    sb = session.sandbox().wait()
    proc = sb.exec(["sleep", "600"], stdin=True)
    before = agent_rss(sb)
    write = proc.stdin.write(b"x" * (64 * 1024 * 1024))
    with pytest.raises(TimeoutError):
        write.result(timeout=3)  # a real clock is the point: it must still be waiting
    assert agent_rss(sb) - before < 16 * 1024 * 1024
    proc.kill().result(timeout=30)
    with pytest.raises(SandboxError, match="exited"):
        write.result(timeout=30)
    works(sb)


def test_stdin_flood_from_a_client_ignoring_the_window_is_refused(session):
    """A broken client that sends more stdin than the window for a process that does not read gets a
    protocol error for that process; the agent keeps a bounded amount and serves on."""
    sb = session.sandbox().wait()
    proc = sb.exec(["sleep", "600"], stdin=True)
    before = agent_rss(sb)

    async def flood():
        await proc._sent.wait()
        for _ in range(8):
            await sb._send({"t": "stdin", "id": proc._req_id, "data": b"y" * (2 * 1024 * 1024)})

    sandpool.OperationRef.spawn(sb._host, flood).result(timeout=30)
    with pytest.raises(ProtocolError, match="wait for 'stdin_taken'"):
        proc.result(timeout=30)
    assert agent_rss(sb) - before < 16 * 1024 * 1024
    works(sb)


def test_signal_numbers_and_grace_periods_out_of_range_are_refused_by_the_client(session):
    """A signal that is no signal, or a grace period of years, is a ValueError at the call; the process
    and the sandbox run on."""
    sb = session.sandbox()
    proc = sb.exec(["sleep", "600"])
    for sig in (0, 65, 1 << 40):
        with pytest.raises(ValueError, match="sig must be between 1 and 64"):
            proc.send_signal(sig)
    with pytest.raises(ValueError, match="graceful_shutdown_seconds must be between 0 and"):
        sb.stop(graceful_shutdown_seconds=1e12)
    assert proc.poll() is None
    works(sb)
    proc.kill().result(timeout=30)
    assert proc.result(timeout=30).returncode != 0


def test_cli_exec_on_a_stopped_sandbox_ends_at_once_with_its_reason(tmp_path):
    """`sandpool exec ID -- echo hi` on a stopped sandbox of a server prints the sandbox's reason and
    exits 1 at once (it used to wait for good); the server's other sandbox still runs commands."""
    import subprocess
    import sys

    from service_helpers import REPO, ServerProcess

    with ServerProcess(str(tmp_path), token="t") as server, \
            Session(address=server.address, token="t", defaults={"tags": ["cli-dead"]}) as remote:
        stopped, other = remote.sandbox(), remote.sandbox()
        stopped.wait()
        stopped.stop().result(timeout=60)
        env = {**os.environ, "SANDPOOL_ADDRESS": server.address, "SANDPOOL_TOKEN": "t"}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "sandpool", "exec", stopped.sandbox_id, "--", "echo", "hi"],
                              capture_output=True, env=env, cwd=REPO, timeout=60)
        assert done.returncode == 1 and b"has been stopped" in done.stderr and b"Traceback" not in done.stderr, done
        assert time.monotonic() - started < 30
        assert other.exec(["echo", "alive"]).result(timeout=30).stdout == "alive\n"
