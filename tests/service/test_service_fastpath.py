"""The same-host fast data plane of ``sandpool serve`` (``_service/fastpath.py``, ``workerlink.py``):
the same results, errors, cancellation and cleanup as the gRPC data plane it bypasses, and the
same authorization (token, peer uid, frame checks).

A client on the server's machine takes the fast plane by default; ``SANDPOOL_DATA_PLANE=grpc``
makes it use gRPC, as a client on another machine does. Each test checks which plane it used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import cloudpickle
import grpc
import pytest
from security.test_service_policy import as_user, run_dir  # noqa: F401 (run_dir: a fixture)
from service_helpers import ServerProcess, wait_until

import sandpool
from sandpool import OperationCancelled, Sandbox, Session
from _sandpool_agent import wire as _wire
from sandpool._grpc import endpoint
from sandpool._service import fastpath
from sandpool._grpc import messages as m

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def divide(a, b):
    return a / b


def block_or_answer(block):
    import time

    if block:
        time.sleep(120)
        return "not interrupted"
    return "answered"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


def planes_used(session: Session) -> set:
    return {record.extra.get("data_plane") for record in session._runtime.list()}


def use_plane(monkeypatch, plane: str) -> None:
    if plane == "grpc":
        monkeypatch.setenv("SANDPOOL_DATA_PLANE", "grpc")
    else:
        monkeypatch.delenv("SANDPOOL_DATA_PLANE", raising=False)


def scenario(session: Session) -> dict:
    """What a client sees of exec (output, exit code, stdin, a signal) and of calls (a result, an
    exception with its remote traceback)."""
    sb = session.sandbox()
    seen = {}
    done = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"]).result()
    seen["exec"] = (done.stdout, done.stderr, done.returncode)
    cat = sb.exec(["cat"], stdin=True)
    refs = [cat.stdin.write(f"{i},".encode()) for i in range(50)]
    cat.stdin.writeline("end")
    cat.stdin.close().result()
    sandpool.results(refs)
    seen["stdin"] = cat.result().stdout
    trapped = sb.exec(["sh", "-c", "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.05; done"])
    assert next(iter(trapped.stdout)) == "ready\n"
    trapped.send_signal(2).result()
    seen["signal"] = trapped.result(timeout=10).returncode
    killed = sb.exec(["sleep", "30"])
    killed.kill().result()
    seen["kill"] = killed.wait(timeout=10)
    f = session.function(max_concurrency=1)(divide)
    seen["call"] = [ref.result() for ref in f.map([(6, 3), (1, 4)])]
    with pytest.raises(ZeroDivisionError) as info:
        f.remote(1, 0).result()
    seen["error"] = (type(info.value).__name__, str(info.value).splitlines()[0])
    return seen


def test_exec_and_calls_give_the_same_results_on_both_planes(server, monkeypatch):
    """The same exec (output, exit code, stdin, signals) and calls (result, exception) give the same
    results over the fast plane as over gRPC; the fast plane's calls take a direct worker line."""
    seen = {}
    for plane in ("grpc", "unix"):
        use_plane(monkeypatch, plane)
        with Session(address=server.address) as s:
            seen[plane] = scenario(s)
            assert planes_used(s) == {plane}
            assert (s._runtime.worker_lines > 0) == (plane == "unix"), repr(s._runtime)
    assert seen["unix"] == seen["grpc"]
    assert seen["unix"]["exec"] == ("out\n", "err\n", 3) and seen["unix"]["signal"] == 7
    assert seen["unix"]["kill"] == 137 and seen["unix"]["call"] == [2.0, 0.25]


@pytest.mark.parametrize("plane", ["unix", "grpc"])
def test_cancelling_a_running_call_interrupts_it(server, monkeypatch, plane):
    """ref.cancel() on a running call interrupts it in the sandbox (the next call on the same
    sandbox is answered at once, not after the 120 s the first one would take)."""
    use_plane(monkeypatch, plane)
    with Session(address=server.address) as s:
        f = s.function(max_concurrency=1)(block_or_answer)  # one sandbox: the next call waits for the first
        assert f.remote(False).result() == "answered"
        ref = f.remote(True)
        assert wait_until(lambda: s.statistics().calls_running == 1 and s.statistics().sandboxes_busy == 1)
        assert ref.cancel()
        with pytest.raises(OperationCancelled):
            ref.result(timeout=30)
        assert f.remote(False).result(timeout=30) == "answered"
        assert s.statistics().calls_cancelled == 1 and len(s._runtime.list()) == 1
        assert planes_used(s) == {plane} and (s._runtime.worker_lines == 1) == (plane == "unix")


DYING_CLIENT = """
import sys, sandpool
s = sandpool.Session(address=sys.argv[1])
sb = s.sandbox(tags=["fastpath-dies"])
sleeper = sb.exec(["sh", "-c", "echo running; sleep 60"])
assert next(iter(sleeper.stdout)) == "running\\n"
f = s.function(max_concurrency=1, tags=["fastpath-dies"])(lambda: __import__("time").sleep(60))
ref = f.remote()
while s.statistics().calls_running == 0:
    __import__("time").sleep(0.01)
print(sorted(r.extra.get("data_plane") for r in s._runtime.list()), s._runtime.worker_lines, flush=True)
sys.stdin.read()
"""


def _fds(pid: int) -> int:
    """The server's open descriptors, less the main logs it keeps readable while it keeps a sandbox's
    record (``stream_logs`` after the end): those go with the record, not with the client."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        count += not target.split(" (deleted)")[0].endswith("/main.log")
    return count


def test_a_client_killed_mid_exec_leaves_nothing(tmp_path):
    """A fast-plane client SIGKILLed during an exec and a call: the server closes its sockets and
    worker lines (its descriptors go back to what they were), and stops its sandboxes once the
    grace period passes; the leak check then finds nothing."""
    with ServerProcess(str(tmp_path), grace=1.0) as srv:
        with Session(address=srv.address) as s:  # warm: the server's own lazily opened descriptors
            s.sandbox().exec(["true"]).result()
        assert wait_until(lambda: not Sandbox.list(address=srv.address).result())
        baseline = _fds(srv.pid)
        client = subprocess.Popen([sys.executable, "-c", DYING_CLIENT, srv.address], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "['unix', 'unix'] 1"
        assert _fds(srv.pid) > baseline
        client.kill()
        client.wait()
        client.stdout.close()
        client.stdin.close()
        assert wait_until(lambda: not Sandbox.list(address=srv.address, tags=["fastpath-dies"]).result(), timeout=20)
        ended = Sandbox.list(address=srv.address, tags=["fastpath-dies"], show_terminated=True).result()
        assert len(ended) == 2 and all("orphaned" in sb.status_reason for sb in ended)
        assert wait_until(lambda: _fds(srv.pid) <= baseline, timeout=10), (_fds(srv.pid), baseline)


class RawFastClient:
    """A hand-made fast-plane client: the Attach call asking for the fast plane, then the socket."""

    def __init__(self, srv: ServerProcess, sandbox_id: str, metadata: tuple = ()) -> None:
        self.channel = grpc.insecure_channel(srv.address)
        attach = self.channel.stream_stream(m.path(m.ATTACH_METHOD))
        self.call = attach(iter(()), timeout=30, metadata=(*(metadata or srv.metadata), (m.META_SANDBOX, sandbox_id),
                                                           (m.META_DATA_PLANE, m.DATA_PLANE_FAST)))

    def offer(self) -> dict:
        return m.unpack(next(self.call))

    def end(self) -> grpc.RpcError | None:
        """How the Attach call ended: its error, or None."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            return exc
        return None

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def redeem(path: str, secret: bytes, kind: bytes = fastpath.ATTACH) -> tuple[socket.socket, bytes]:
    """Connect to the fast socket and show ``secret``; the socket and the server's answer (b"" if refused)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(path)
    sock.sendall(kind + secret)
    return sock, sock.recv(1)


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_until(sock: socket.socket, kind: str) -> list[dict]:
    """The frames the server sends on ``sock`` up to the first of ``kind``."""
    decoder, frames = _wire.FrameBuffer(), []
    while not any(frame["t"] == kind for frame in frames):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the socket before a {kind!r} frame: {frames}"
        frames += decoder.feed(chunk)
    return frames


def test_a_bad_token_or_ticket_gets_no_fast_socket(tmp_path):
    """Without the right token the Attach call is refused before any offer; a made-up, reused or
    wrong-kind secret on the fast socket is closed without an answer. The real client, and the
    socket's rightful user, carry on."""
    with ServerProcess(str(tmp_path), token="s3cret") as srv, Session(address=srv.address, token="s3cret") as s:
        sb = s.sandbox()
        sb.wait()
        for metadata in (((m.META_TOKEN, "Bearer wrong"),), ((m.META_TOKEN, "Bearer "),)):
            raw = RawFastClient(srv, sb.sandbox_id, metadata)
            with pytest.raises(grpc.RpcError) as info:
                raw.offer()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            raw.close()
        raw = RawFastClient(srv, sb.sandbox_id)
        offer = raw.offer()
        for secret, kind in ((os.urandom(fastpath.TICKET_BYTES), fastpath.ATTACH),
                             (offer["ticket"], fastpath.WORKER),  # a ticket is not a key
                             (offer["key"], fastpath.ATTACH)):  # nor a key a ticket
            sock, answer = redeem(offer["path"], secret + (b"\x00" if kind == fastpath.WORKER else b""), kind)
            assert answer == b"" and read_to_end(sock) == b""
            sock.close()
        sock, answer = redeem(offer["path"], offer["ticket"])
        assert answer == fastpath.ACK
        again, answer = redeem(offer["path"], offer["ticket"])  # used once already
        assert answer == b""
        again.close()
        sock.sendall(_wire.encode(_wire.hello()) + _wire.encode({"t": "exec", "id": 1, "argv": ["echo", "raw"]}))
        frames = read_until(sock, "exit")
        assert {"t": "output", "id": 1, "fd": 1, "data": b"raw\n"} in frames and frames[-1]["code"] == 0
        sock.close()
        raw.close()
        assert sb.exec(["echo", "still"]).result().stdout == "still\n" and planes_used(s) == {"unix"}


BAD_FRAMES = [
    (b"\x00\x00\x00\x05garbage", "undecodable frame"),
    (_wire.encode({"t": "stop", "grace": 0.0}), "clients may not send 'stop'"),
    (_wire.encode({"t": "ping", "id": 1 << 40}), "outside"),
    (_wire.encode({"t": "worker", "id": 2, "listen": "/etc/evil"}), "/tmp/.sandpool-worker-<hex>"),
    (b"\x7f\xff\xff\xff", "above the"),
]


@pytest.mark.parametrize("data,text", BAD_FRAMES, ids=["undecodable", "stop", "id", "worker-path", "oversized"])
def test_malformed_frames_on_the_fast_plane_end_only_that_client(server, data, text):
    """A bad frame on the fast socket ends that client's socket, and its Attach call with
    INVALID_ARGUMENT naming the problem (the checks of ``frames.py``, as on gRPC); the sandbox and
    its other clients carry on, and a worker line with anything but calls is cut."""
    with Session(address=server.address) as s:
        sb = s.sandbox()
        assert sb.exec(["echo", "before"]).result().stdout == "before\n"
        raw = RawFastClient(server, sb.sandbox_id)
        offer = raw.offer()
        sock, answer = redeem(offer["path"], offer["ticket"])
        assert answer == fastpath.ACK
        sock.sendall(_wire.encode(_wire.hello()) + data)
        replies = _wire.FrameBuffer().feed(read_to_end(sock))  # the socket ends (after a hello, if it was read first)
        assert [frame["t"] for frame in replies] in ([], ["hello"])
        error = raw.end()
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details()
        sock.close()
        raw.close()
        assert sb.exec(["echo", "after"]).result().stdout == "after\n"
        assert s.function(max_concurrency=1)(divide).remote(1, 2).result() == 0.5
        assert planes_used(s) == {"unix"} and s._runtime.worker_lines == 1


def test_a_worker_line_carries_only_calls(server):
    """A worker line through which a client sends anything but a call frame is cut at once; the
    sandbox's other work carries on."""
    with Session(address=server.address) as s:
        sb = s.sandbox()
        sb.wait()
        raw = RawFastClient(server, sb.sandbox_id)
        offer = raw.offer()
        sock, answer = redeem(offer["path"], offer["ticket"])
        assert answer == fastpath.ACK
        name = b".sandpool-worker-abc123"
        worker = {"t": "worker", "id": 5, "listen": f"/tmp/{name.decode()}"}
        sock.sendall(_wire.encode(_wire.hello()) + _wire.encode(worker))
        read_until(sock, "started")
        line, answer = redeem(offer["path"], offer["key"] + bytes([len(name)]) + name, fastpath.WORKER)
        assert answer == fastpath.ACK
        line.sendall(_wire.encode({"t": "ping", "id": 1}))
        assert read_to_end(line) == b""
        line.close()
        sock.close()
        raw.close()
        assert sb.exec(["echo", "after"]).result().stdout == "after\n"


ATTACK = """
import socket, grpc, sandpool
from sandpool._grpc import messages as m
with sandpool.Session(address={address!r}) as s:
    sb = s.sandbox()
    print("EXEC", sb.exec(["echo", "inside"]).result(timeout=60).stdout.strip(),
          sorted(r.extra.get("data_plane") for r in s._runtime.list()), s._runtime.worker_lines)
    channel = grpc.insecure_channel({address!r})
    call = channel.stream_stream(m.path(m.ATTACH_METHOD))(iter(()), timeout=30, metadata=(
        (m.META_SANDBOX, sb.sandbox_id), (m.META_DATA_PLANE, m.DATA_PLANE_FAST)))
    offer = m.unpack(next(call))
    print("PATH", offer["path"])
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    try:
        sock.connect(offer["path"])
    except PermissionError:
        print("DENIED PermissionError")
    else:
        try:
            sock.sendall(b"A" + offer["ticket"])
            answer = sock.recv(1)
        except ConnectionError:  # closed unread: a reset or a broken pipe, by timing
            answer = b""
        print("ANSWER", answer)
    call.cancel()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the server under attack runs as root")
def test_another_user_cannot_use_a_root_servers_fast_plane(unprivileged_user, run_dir, tmp_path):
    """An ordinary user allowed on a root server's unix socket (--allow-uid) gets sandboxes, but over
    gRPC: the fast socket lies in root's 0700 directory. With its modes loosened by hand, the uid
    check still closes the user's connection, with a valid ticket. Root's client keeps the fast plane."""
    _name, uid, _gid, _home = unprivileged_user
    with ServerProcess(str(tmp_path), "--allow-uid", str(uid), listen=None, env={endpoint.ENV_RUN_DIR: run_dir}) as srv:
        first = as_user(unprivileged_user, ATTACK.format(address=srv.address))
        assert "EXEC inside ['grpc'] 0" in first.stdout and "DENIED PermissionError" in first.stdout, first
        path = first.stdout.split("PATH ", 1)[1].split()[0]
        assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        with Session(address=srv.address) as s:
            assert s.sandbox().exec(["echo", "root"]).result().stdout == "root\n" and planes_used(s) == {"unix"}
        os.chmod(os.path.dirname(path), 0o711)  # a careless operator opens the directory and the socket
        os.chmod(path, 0o666)
        second = as_user(unprivileged_user, ATTACK.format(address=srv.address))
        # refused at accept, closed without an answer; its own client fell back to gRPC
        assert "EXEC inside ['grpc'] 0" in second.stdout and "ANSWER b''" in second.stdout, second
        assert wait_until(lambda: "refused a fast data-plane connection from uid" in srv.stderr()), srv.stderr()
        with Session(address=srv.address) as s:
            assert s.sandbox().exec(["echo", "root"]).result().stdout == "root\n" and planes_used(s) == {"unix"}
