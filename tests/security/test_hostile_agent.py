"""A hostile agent can fail its own sandbox and nothing more.

Code inside a sandbox runs as the agent's user in the agent's pid namespace, so it can take the agent
over (ptrace, /proc/1/mem) and speak for it. These tests give the client exactly that: a real
sandbox starts, then its client talks to a hostile driver (a separate process running one attack)
instead of its agent. The substitution is test-only (``HostileRuntime`` below, chosen with a
``hostile:ATTACK`` tag by the test itself); nothing in a sandbox can trigger it. Each attack must end
in a sandpool error for that sandbox only: no code run in the client, client memory bounded, nothing
hung, and a second sandbox of the same session (with a command running during the attack) fine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import trio

import sandpool
from sandpool import (
    SandboxDefaults,
    SandboxFailedError,
    SandboxStatus,
    SandboxTimeoutError,
    SandpoolError,
    Session,
)
from sandpool._core.channel import FrameChannel
from sandpool._runtime.local import LocalRuntime

import leaks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The hostile driver: speaks for a taken-over agent. argv: ATTACK, socket fd, marker path.
DRIVER = r'''
import os, pickle, socket, sys, time
from _sandpool_agent import wire as _wire

attack, sock, marker = sys.argv[1], socket.socket(fileno=int(sys.argv[2])), sys.argv[3]
buf, queue = _wire.FrameBuffer(), []

def send(frame):
    sock.sendall(_wire.encode(frame))  # encode does not validate: any map goes out

def request(*kinds):
    """The next client frame of one of these kinds; direct-worker requests are refused on the way."""
    while True:
        while queue:
            frame = queue.pop(0)
            if frame["t"] == "worker":
                send({"t": "error", "id": frame["id"], "kind": "protocol", "message": "no direct worker"})
            elif frame["t"] in kinds:
                return frame
        data = sock.recv(1 << 20)
        if not data:
            sys.exit(0)
        queue.extend(buf.feed(data))

class Bomb:  # unpickling it runs a command in the unpickler's process
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))

send(_wire.hello(pid=os.getpid(), sandbox_id="taken-over"))
if attack in ("pickle_result", "pickle_error"):
    call = request("call")
    if attack == "pickle_result":
        send({"t": "result", "id": call["id"], "us": 1, "data": pickle.dumps(Bomb())})
    else:
        send({"t": "error", "id": call["id"], "kind": "user", "message": "boom", "type_name": "builtins.ValueError",
              "traceback": "", "data": pickle.dumps(Bomb()), "exc": pickle.dumps(Bomb())})
    request("never")
if attack == "file_answers":
    read = request("read_file")
    send({"t": "pong", "id": read["id"]})
    read = request("read_file")
    send({"t": "result", "id": read["id"]})
    request("never")
ex = request("exec")
eid = ex["id"]
if attack == "garbage":
    sock.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
elif attack == "oversized":
    sock.sendall((_wire.MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"x" * 65536)
elif attack == "not_a_map":
    sock.sendall(_wire.encode([1, 2, 3]))
elif attack == "wrong_types":
    send({"t": "output", "id": eid, "fd": 1, "data": "text, not bytes"})
elif attack == "bad_fd":
    send({"t": "output", "id": eid, "fd": 9, "data": b"x"})
elif attack == "huge_code":
    send({"t": "exit", "id": eid, "code": 1 << 60})
elif attack == "client_kind":
    send({"t": "exec", "id": 1, "argv": ["rm", "-rf", "/"]})
elif attack == "unknown_id":
    send({"t": "started", "id": eid, "pid": 1})
    send({"t": "output", "id": eid + 1000, "fd": 1, "data": b"for nobody"})
elif attack == "wrong_answer":
    send({"t": "pong", "id": eid})
elif attack == "nested":  # a map whose one value is 100000 arrays deep
    body = b"\x81\xa1t" + b"\x91" * 100000 + b"\xc0"
    sock.sendall(len(body).to_bytes(4, "big") + body)
elif attack in ("flood", "endless"):
    send({"t": "started", "id": eid, "pid": 1})
    chunk = _wire.encode({"t": "output", "id": eid, "fd": 1, "data": b"x" * 65536})
    noise = b"".join(_wire.encode({"t": "pong", "id": 0}) for _ in range(2000))
    try:
        while True:  # credit is never awaited, and the stream never ends
            sock.sendall(chunk if attack == "flood" else noise)
    except OSError:
        sys.exit(0)
request("never")
'''


#: Code inside a sandbox taking its agent over, for real: stop the agent, steal its socket to the client
#: (pidfd_getfd, as its own user may), speak garbage for it, let it run on.
TAKEOVER = r'''
import ctypes, os, signal, socket, sys
agent = os.getppid()
try:  # rootless, the agent lives in the template's user namespace: even its fd list is refused
    fds = [int(n) for n in os.listdir(f"/proc/{agent}/fd")
           if os.readlink(f"/proc/{agent}/fd/{n}").startswith("socket:")]
    pidfd = os.pidfd_open(agent)
except PermissionError as e:
    sys.exit(f"refused: {e}")
libc = ctypes.CDLL(None, use_errno=True)
os.kill(agent, signal.SIGSTOP)
try:
    for fd in fds:
        stolen = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if stolen < 0:
            sys.exit(f"refused: pidfd_getfd: {os.strerror(ctypes.get_errno())}")
        socket.socket(fileno=stolen).sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1")
finally:
    os.kill(agent, signal.SIGCONT)
print("took over", fds)
'''


def _attack(spec) -> str | None:
    return next((t.split(":", 1)[1] for t in spec.tags if t.startswith("hostile:")), None)


class HostileRuntime(LocalRuntime):
    """A local runtime whose sandboxes tagged ``hostile:ATTACK`` start for real, after which their
    client's channel leads to a hostile driver instead of the agent (the real agent's channel is
    kept for stopping it). Test-only: the tag is chosen by the test, never by sandbox contents."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.taken: dict[str, tuple[subprocess.Popen, FrameChannel]] = {}

    async def start(self, record):
        real = await super().start(record)
        attack = _attack(record.spec)
        if attack is None:
            return real
        ours, theirs = socket.socketpair()
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, attack, str(theirs.fileno()), self.marker],
                                  pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": REPO})
        theirs.close()
        self.taken[record.sandbox_id] = (driver, real)
        hostile = FrameChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        await hostile.handshake()
        record.channel = hostile
        return hostile

    async def stop(self, record, grace_seconds):
        taken = self.taken.pop(record.sandbox_id, None)
        if taken is not None:
            driver, real = taken
            driver.kill()
            await trio.to_thread.run_sync(driver.wait)
            await record.channel.aclose()
            record.channel = real
        await super().stop(record, grace_seconds)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def marker(tmp_path):
    path = str(tmp_path / "code-ran-in-the-client")
    yield path
    assert not os.path.exists(path), "a hostile agent ran code in the client"


@pytest.fixture
def session(marker):
    runtime = HostileRuntime(marker)
    try:
        with Session(SandboxDefaults(tags=("hostile-test",)), runtime=runtime) as s:
            yield s
    finally:
        leaks.close_runtime(runtime)


def bystander_running(session):
    """A second sandbox with a command in flight during the attack; check() asserts it was unharmed."""
    sb = session.sandbox()
    proc = sb.exec(["sh", "-c", "read line; echo got $line"], stdin=True)

    def check():
        proc.stdin.writeline("through").result(timeout=30)
        assert proc.result(timeout=30).stdout == "got through\n"
        assert sb.exec(["echo", "fine"]).result(timeout=30).stdout == "fine\n"
        assert sb.status == SandboxStatus.RUNNING

    return check


def fails_only_itself(sb, words: str, started: float) -> None:
    with pytest.raises(SandboxFailedError):
        sb.wait_until_complete(timeout=60).result()
    assert sb.status == SandboxStatus.FAILED, sb.status
    assert "protocol error" in sb.status_reason and words in sb.status_reason, sb.status_reason
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("attack, words", [
    ("garbage", "undecodable frame"),
    ("oversized", "above the"),
    ("not_a_map", "frame is not a map"),
    ("wrong_types", "'data' must be bytes"),
    ("bad_fd", "'fd' must be between 1 and 2"),
    ("huge_code", "'code' must be between"),
    ("client_kind", "which only a client sends"),
    ("unknown_id", "which this client never made"),
    ("wrong_answer", "answered an exec with a 'pong' frame"),
    ("nested", "undecodable frame"),
])
def test_malformed_frames_fail_only_the_hostile_sandbox(session, attack, words):
    """Oversized frames, garbage msgpack, wrong types and ranges, kinds only a client sends, output for
    ids never issued, answers of the wrong kind, and absurd nesting: the exec fails with a sandpool
    error, the sandbox FAILED with a protocol error naming it, and the bystander carries on."""
    check = bystander_running(session)
    before = rss_bytes()
    hostile = session.sandbox(tags=[f"hostile:{attack}"])
    started = time.monotonic()
    with pytest.raises(SandpoolError):
        hostile.exec(["echo", "hi"]).result(timeout=60)
    fails_only_itself(hostile, words, started)
    assert rss_bytes() - before < 64 * 1024 * 1024
    check()


def test_output_flood_ignoring_credit_fails_the_sandbox_with_bounded_memory(session):
    """An agent that keeps sending output while a live reader holds its credit back is cut off once it
    passes its window: the sandbox fails, the reader ends with that error, memory stays bounded."""
    check = bystander_running(session)
    before = rss_bytes()
    hostile = session.sandbox(tags=["hostile:flood"])
    proc = hostile.exec(["yes"])
    chunks = iter(proc.stdout)
    next(chunks)  # a live reader that then stops reading: credit is owed no further
    started = time.monotonic()
    fails_only_itself(hostile, "without waiting for credit", started)
    with pytest.raises(SandpoolError):
        list(chunks)
    assert rss_bytes() - before < 64 * 1024 * 1024
    check()


def test_never_ending_stream_is_bounded_by_the_callers_timeout(session):
    """An agent that streams frames forever and never answers holds nothing: the exec's timeout fires
    on time, memory stays bounded, stop ends it, the bystander carries on."""
    check = bystander_running(session)
    before = rss_bytes()
    hostile = session.sandbox(tags=["hostile:endless"])
    started = time.monotonic()
    with pytest.raises(SandboxTimeoutError):
        hostile.exec(["sleep", "600"], timeout_seconds=2).result(timeout=60)
    assert time.monotonic() - started < 20
    assert rss_bytes() - before < 64 * 1024 * 1024
    hostile.stop(graceful_shutdown_seconds=0).result(timeout=60)
    assert hostile.status == SandboxStatus.TERMINATED
    check()


@pytest.mark.parametrize("attack", ["pickle_result", "pickle_error"])
def test_pickled_result_or_exception_runs_no_code_in_the_client(session, marker, attack):
    """A call answered with a result, or an exception, whose pickle runs a command when unpickled: the
    call fails with a sandpool error or comes back as plain data, and the command never runs in the
    client (the marker fixture checks); the bystander carries on."""
    check = bystander_running(session)

    @session.function(tags=[f"hostile:{attack}"])
    def innocent():
        return 1

    with pytest.raises(Exception) as info:
        innocent.remote().result(timeout=60)
    assert not os.path.exists(marker)
    assert isinstance(info.value, (SandpoolError, ValueError)), repr(info.value)
    check()
    assert sandpool.SandpoolError


@pytest.mark.parametrize("isolation", ["process", "namespaces"])
def test_code_inside_a_sandbox_taking_its_agent_over_fails_only_that_sandbox(isolation):
    """The real attack, no substitution: a command in the sandbox stops its agent, steals the agent's
    socket and sends garbage for it. Either the isolation level refuses the theft (the sandbox serves
    on; rootless, already reading the agent's /proc/<pid>/fd is refused), or the client fails that
    sandbox alone with a protocol error, at once; the bystander works."""
    with Session(SandboxDefaults(isolation=isolation, tags=("takeover",))) as session:
        check = bystander_running(session)
        sb = session.sandbox()
        sb.write_file("takeover.py", TAKEOVER.encode()).result(timeout=30)
        started = time.monotonic()
        try:
            result = sb.exec([sys.executable, "takeover.py"]).result(timeout=60)
        except SandpoolError:
            fails_only_itself(sb, "undecodable frame", started)
        else:
            assert result.returncode != 0 and "refused" in result.stderr, result
            assert sb.exec(["echo", "on"]).result(timeout=30).stdout == "on\n"
        check()


def test_wrong_answers_to_file_requests_are_protocol_errors(session):
    """A read_file answered with a pong, or with a result carrying no data, raises ProtocolError for that
    call, never hands the caller something that is not the file's bytes; the bystander carries on."""
    check = bystander_running(session)
    hostile = session.sandbox(tags=["hostile:file_answers"])
    for _ in range(2):
        with pytest.raises(sandpool.ProtocolError, match="answered read_file"):
            hostile.read_file("/etc/hostname").result(timeout=30)
    check()
