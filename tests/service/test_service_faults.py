"""The service under faults, on loopback with real server and client processes: auth, a client
killed mid-exec (the orphan grace rule), the server killed mid-call, a server restart, graceful
SIGTERM, malformed and oversized messages, and a slow reader."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
from proc_helpers import running
from service_helpers import ServerProcess, run_client, wait_until

from sandpool import CWSandboxAuthenticationError, Sandbox, SandboxDiedError, SandboxNotRunningError, SandboxSpec, SandboxStatus, SandboxUnavailableError, Session
from _sandpool_agent import wire as _wire
from sandpool._grpc import messages as m
from sandpool._service.journal import RESTART_REASON


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_wrong_or_missing_token_is_unauthenticated_and_creates_nothing(tmp_path):
    """A server with a token refuses calls without it or with another one, before anything runs."""
    with ServerProcess(str(tmp_path), token="s3cret") as srv:
        for token in (None, "wrong"):
            with pytest.raises(CWSandboxAuthenticationError, match="token"):
                with Session(address=srv.address, token=token) as s:
                    s.sandbox().exec(["true"]).result()
        channel = grpc.insecure_channel(srv.address)
        spec = m.spec_to_dict(SandboxSpec())
        for method, call in (("Create", channel.unary_unary(m.path("Create"))),
                             ("Attach", channel.stream_stream(m.path("Attach")))):
            with pytest.raises(grpc.RpcError) as info:
                request = m.pack({"spec": spec})
                reply = call(request, metadata=((m.META_TOKEN, "Bearer nope"),)) if method == "Create" else \
                    list(call(iter([request]), metadata=((m.META_TOKEN, "Bearer nope"), (m.META_SANDBOX, "sb-x"))))
                del reply
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        channel.close()
        assert Sandbox.list(address=srv.address, token="s3cret", show_terminated=True).result() == []
        with Session(address=srv.address, token="s3cret") as s:
            assert s.sandbox().exec(["echo", "ok"]).result().stdout == "ok\n"


CLIENT_THAT_DIES = """
import sys, time, sandpool
s = sandpool.Session(address=sys.argv[1] if len(sys.argv) > 1 else None, defaults={"tags": ["orphan-test"]})
s.__enter__()
a, b = s.sandbox(), s.sandbox()
proc = a.exec(["sh", "-c", "echo started; sleep 30"])
next(iter(proc.stdout))
b.wait()
print(a.sandbox_id, b.sandbox_id, flush=True)
time.sleep(60)
"""


def test_killed_client_sandboxes_stay_adoptable_for_the_grace_period_then_stop(tmp_path):
    """A client SIGKILLed mid-exec: its sandboxes stay listed; one adopted by another client lives
    on, the other is stopped once the grace period passes, with a reason saying so."""
    with ServerProcess(str(tmp_path), grace=2.0) as srv:
        client = subprocess.Popen([sys.executable, "-c", CLIENT_THAT_DIES], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "SANDPOOL_ADDRESS": srv.address})
        a_id, b_id = client.stdout.readline().split()
        client.kill()
        client.wait()
        client.stdout.close()
        listed = {sb.sandbox_id: sb for sb in Sandbox.list(tags=["orphan-test"], address=srv.address).result()}
        assert set(listed) == {a_id, b_id} and all(sb.status == SandboxStatus.RUNNING for sb in listed.values())
        with Session(address=srv.address) as s:
            adopted = s.from_id(a_id).result()  # adopt=True: this session stops it when it closes
            assert s.sandbox_count == 1
            assert adopted.exec(["echo", "mine"]).result().stdout == "mine\n"  # attached: held
            orphan = wait_until(lambda: (sb := Sandbox.from_id(b_id, address=srv.address).result()).status
                                == SandboxStatus.TERMINATED and sb, timeout=10)
            assert orphan and "orphaned" in orphan.status_reason
            assert adopted.exec(["echo", "still"]).result().stdout == "still\n"
        assert adopted.status == SandboxStatus.TERMINATED


def test_server_killed_mid_call_fails_fast_and_leaves_no_sandbox_process(tmp_path):
    """SIGKILL the server during an exec: the call fails with SandboxUnavailableError within
    seconds, later calls too, the session closes promptly, and the server's template and every
    sandbox process die with it (the template sees its control socket close)."""
    srv = ServerProcess(str(tmp_path)).start()
    try:
        with Session(address=srv.address) as s:
            sb = s.sandbox()
            proc = sb.exec(["sh", "-c", "echo go; sleep 30"])
            assert next(iter(proc.stdout)) == "go\n"
            other = s.sandbox()
            other.wait()
            tree = _descendants(srv.pid)
            assert len(tree) >= 3  # the template and two agents (plus the sleep)
            started = time.monotonic()
            srv.proc.kill()
            with pytest.raises(SandboxUnavailableError, match="unavailable|lost"):
                proc.result(timeout=15)
            assert time.monotonic() - started < 10  # at the connection's end, not at the 15 s timeout
            with pytest.raises(SandboxUnavailableError):
                other.exec(["true"]).result(timeout=15)
            with pytest.raises(SandboxUnavailableError):
                s.sandbox().exec(["true"]).result(timeout=15)
            assert wait_until(lambda: not _alive(tree), timeout=10), _alive(tree)
            closing = time.monotonic()
        assert time.monotonic() - closing < 10  # no stop waits on the dead server's grace
    finally:
        srv.kill()


def test_restarted_server_reports_earlier_sandboxes_terminated_with_the_reason(tmp_path):
    """After a server is killed and started again on the same record, its earlier sandboxes are
    TERMINATED with the reason, listed with show_terminated, and refuse work; not unknown."""
    record = str(tmp_path / "record.jsonl")
    first = ServerProcess(str(tmp_path), record_file=record).start()
    try:
        with Session(address=first.address, defaults={"tags": ["restart"]}) as s:
            sb = s.sandbox()
            sb.wait()
            first.proc.kill()
            first.wait(10)
    finally:
        first.kill()
    with ServerProcess(str(tmp_path), record_file=record) as second:
        found = Sandbox.from_id(sb.sandbox_id, address=second.address).result()
        assert found is not sb
        assert found.status == SandboxStatus.TERMINATED and found.status_reason == RESTART_REASON
        listed = Sandbox.list(tags=["restart"], show_terminated=True, address=second.address).result()
        assert [x.sandbox_id for x in listed] == [sb.sandbox_id]
        assert Sandbox.list(tags=["restart"], address=second.address).result() == []
        with pytest.raises(SandboxNotRunningError):
            found.exec(["true"]).result()


def test_sigterm_stops_every_sandbox_and_exits_zero(tmp_path):
    """Graceful SIGTERM: every sandbox stopped (clients see why), the server exits 0 promptly."""
    srv = ServerProcess(str(tmp_path)).start()
    try:
        with Session(address=srv.address) as s:
            sandboxes = [s.sandbox() for _ in range(3)]
            procs = [sb.exec(["sleep", "30"]) for sb in sandboxes]
            for sb in sandboxes:
                sb.wait()
            started = time.monotonic()
            assert srv.terminate(timeout=20) == 0
            assert time.monotonic() - started < 10
            for sb, proc in zip(sandboxes, procs):
                with pytest.raises(SandboxDiedError, match="the sandpool server shut down"):
                    proc.result(timeout=10)
                sb.wait_until_complete(timeout=10, raise_on_termination=False).result()
                assert sb.status == SandboxStatus.TERMINATED and "shut down" in sb.status_reason
    finally:
        srv.kill()


def _stalled(argv: list[str]):
    """A predicate: the process running ``argv`` has read nothing new over the last three looks (it
    is blocked writing to a full pipe)."""
    seen: list[int | None] = []

    def check() -> bool:
        pids = running(argv)
        try:
            with open(f"/proc/{pids[0]}/io") as f:
                seen.append(int(f.read().split()[1]))  # rchar
        except (IndexError, OSError):
            seen.append(None)
        return len(seen) >= 3 and seen[-1] is not None and seen[-1] == seen[-3]

    return check


def test_malformed_and_oversized_messages_get_a_clear_error_and_others_are_served(tmp_path):
    """Undecodable, mistyped and oversized control messages, and bad data-plane frames, each end
    only their own call with a status naming the problem; sandboxes and other clients carry on."""
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        sb = s.sandbox()
        sb.wait()
        channel = grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", 64 << 20)])
        create = channel.unary_unary(m.path("Create"))
        cases = [
            (b"\xc1 not msgpack", grpc.StatusCode.INVALID_ARGUMENT, "undecodable Create request"),
            (m.pack([1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "must be a msgpack map"),
            (m.pack({"spec": "python"}), grpc.StatusCode.INVALID_ARGUMENT, "'spec' must be"),
            (m.pack({"spec": {"tgas": ["x"]}}), grpc.StatusCode.INVALID_ARGUMENT, "tags"),
            (b"x" * (m.MAX_MESSAGE_BYTES + 1), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.RpcError) as info:
                create(request, timeout=10, metadata=srv.metadata)
            assert info.value.code() == code and text in info.value.details(), (text, info.value.details())
        attach = channel.stream_stream(m.path("Attach"))
        hello = _wire.encode(_wire.hello())
        frames = [
            (b"\x00\x00\x00\x05garbage", "undecodable frame"),
            (_wire.encode({"t": "stop", "grace": 0.0}), "clients may not send 'stop'"),
            (_wire.encode({"t": "ping", "id": 1 << 40}), "outside"),
            (b"\x7f\xff\xff\xff", "above the"),
        ]
        for data, text in frames:
            with pytest.raises(grpc.RpcError) as info:
                list(attach(iter([hello, data]), metadata=(*srv.metadata, (m.META_SANDBOX, sb.sandbox_id)), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(attach(iter([hello]), metadata=(*srv.metadata, (m.META_SANDBOX, "sb-nope")), timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        channel.close()
        assert sb.exec(["echo", "still"]).result().stdout == "still\n"
        assert s.sandbox().exec(["echo", "new"]).result().stdout == "new\n"


def test_a_slow_reader_stalls_only_its_own_sandbox(tmp_path):
    """A client that keeps acknowledging output but does not read its stream holds back only its
    own sandbox: the server buffers a bounded amount, and other sandboxes stay fast."""
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        slow, fast = s.sandbox(), s.sandbox()
        slow.wait()
        fast.wait()
        channel = grpc.insecure_channel(srv.address)
        release = threading.Event()

        def requests():  # acknowledges output as if it read it, but never does
            yield _wire.encode(_wire.hello())
            yield _wire.encode({"t": "exec", "id": 1, "argv": ["head", "-c", "1000000000", "/dev/zero"]})
            while not release.wait(0.002):
                yield _wire.encode({"t": "credit", "id": 1, "n": 1 << 20})

        call = channel.stream_stream(m.path("Attach"))(requests(), metadata=(*srv.metadata, (m.META_SANDBOX, slow.sandbox_id)))
        try:
            # the flood fills every buffer between the agent and this unread stream: its producer stalls
            assert wait_until(_stalled(["head", "-c", "1000000000", "/dev/zero"]), timeout=30, interval=0.1)
            started = time.monotonic()
            for _ in range(20):
                assert fast.exec(["true"]).result(timeout=10).returncode == 0
            per_exec = (time.monotonic() - started) / 20
            assert per_exec < 1.0, per_exec  # ~0.01 s idle; a sandbox held up behind the flood would take seconds
            rss = psutil.Process(srv.pid).memory_info().rss
            assert rss < 400 * 1024 * 1024, rss  # backpressure, not a 1 GB buffer
        finally:
            release.set()
            call.cancel()
            channel.close()


def test_tls_with_token(tmp_path):
    """With a certificate the port speaks TLS only: a client trusting the CA works, plaintext fails."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    with ServerProcess(str(tmp_path), "--tls-cert", str(cert), "--tls-key", str(key), token="t0k") as srv:
        port = srv.address.rsplit(":", 1)[1]
        result = run_client(
            "import sandpool\n"
            f"with sandpool.Session(address='tls://localhost:{port}', token='t0k') as s:\n"
            "    print(s.sandbox().exec(['echo', 'secure']).result().stdout, end='')\n",
            env={"SANDPOOL_TLS_CA": str(cert)})
        assert result.returncode == 0 and result.stdout == "secure\n", result.stderr
        with pytest.raises(SandboxUnavailableError):
            with Session(address=f"localhost:{port}", token="t0k"):
                pass


def test_non_loopback_listen_needs_a_token(tmp_path):
    """serve refuses a non-loopback address without --token-file, naming the fix."""
    result = run_client("import sys, sandpool.__main__ as m; sys.exit(m.main(['serve', '--listen', '0.0.0.0:0']))")
    assert result.returncode == 1 and "without a token" in result.stderr and "--token-file" in result.stderr
