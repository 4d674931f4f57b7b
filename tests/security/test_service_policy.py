"""Attacks on ``sandpool serve`` from outside it: another local user, a client asking for more
privilege than the server's policy gives, a client without the token, a poisoning Create.

The server runs as root, as it would be deployed; the attacker is an ordinary user (the
``unprivileged_user`` fixture) running a client process through ``setpriv``. Each test checks the
attack was contained and that root's own client keeps working throughout.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import grpc
import pytest
from service_helpers import REPO, ServerProcess, wait_until

from sandpool import Sandbox, SandboxFailedError, Session
from sandpool._grpc import endpoint
from sandpool._grpc import limits
from sandpool._grpc import messages as m

pytestmark = pytest.mark.needs_root("the server under attack runs as root, as deployed; the attacker is "
                                     "the ordinary user, run through setpriv, which only root can do")

#: The attacker's interpreter: this one if the user may run it, else the system's, on the same packages.
SITE = sysconfig.get_paths()["purelib"]


def as_user(user, code: str, *, env: dict | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``code`` as the ordinary user ``user`` (name, uid, gid, home), with sandpool importable."""
    _name, uid, gid, home = user
    python = sys.executable
    probe = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", python, "-c", "pass"]
    if subprocess.run(probe, capture_output=True, cwd="/").returncode != 0:
        python = "/usr/bin/python3"  # this interpreter lives where the user cannot go (e.g. under /root)
    full_env = {"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONPATH": f"{REPO}:{SITE}", "GRPC_VERBOSITY": "ERROR",
                **(env or {})}
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", python, "-c", textwrap.dedent(code)]
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd="/", timeout=timeout)


def hold_connections(user, path: str, count: int) -> subprocess.Popen:
    """As ``user``, open ``count`` connections to the unix socket ``path`` and hold them until stdin
    closes; returns once they are open."""
    _name, uid, gid, _home = user
    code = textwrap.dedent(f"""
        import resource, socket, sys
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, {count} + 64), hard))
        held = []
        for _ in range({count}):
            s = socket.socket(socket.AF_UNIX)
            s.connect({path!r})
            held.append(s)
        print("HELD", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "/usr/bin/python3", "-c",
                             code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
    assert proc.stdout.readline().strip() == "HELD"
    return proc


@pytest.fixture
def run_dir():
    """A run directory under a parent every user may traverse (0711), as /run is: what keeps the
    attacker out is then the server's own modes and checks, not the test's temp directory."""
    parent = tempfile.mkdtemp(prefix="sandpool-sec-", dir="/tmp")
    os.chmod(parent, 0o711)
    yield os.path.join(parent, "run")
    subprocess.run(["rm", "-rf", parent], check=False)


def _root_works(address: str) -> None:
    with Session(address=address) as s:
        assert s.sandbox().exec(["echo", "root ok"]).result(timeout=60).stdout == "root ok\n"


def test_another_user_cannot_use_the_default_unix_socket(unprivileged_user, run_dir, tmp_path):
    """A default root server listens on a 0600 socket in a 0700 directory, so an ordinary user cannot
    connect; with the modes loosened by hand, the uid check at accept still refuses it with a clear
    PERMISSION_DENIED, and holding hundreds of connections does not crowd root out; gRPC's own socket
    is out of its reach. Root's client works throughout."""
    with ServerProcess(str(tmp_path), listen=None, env={endpoint.ENV_RUN_DIR: run_dir}) as srv:
        socket_path = os.path.join(run_dir, endpoint.SOCKET_NAME)
        assert srv.address == f"unix:{socket_path}"
        assert oct(os.stat(socket_path).st_mode & 0o777) == "0o600"
        assert oct(os.stat(run_dir).st_mode & 0o777) == "0o700"
        _root_works(srv.address)
        attack = f"""
            import sandpool
            try:
                with sandpool.Session(address={srv.address!r}) as s:
                    print("GOT", s.sandbox(isolation="process").exec(["id", "-u"]).result(timeout=30).stdout)
            except Exception as exc:
                print("REFUSED", type(exc).__name__, exc)
        """
        first = as_user(unprivileged_user, attack)
        assert "REFUSED" in first.stdout and "GOT" not in first.stdout, first
        assert "Permission denied" in first.stdout or "PERMISSION_DENIED" in first.stdout, first.stdout

        os.chmod(run_dir, 0o755)  # a careless operator opens the socket to everyone
        os.chmod(socket_path, 0o666)
        second = as_user(unprivileged_user, attack)
        assert "REFUSED CWSandboxAuthenticationError" in second.stdout, second
        assert "serves only uid(s) 0" in second.stdout and "--allow-uid" in second.stdout, second.stdout
        assert wait_until(lambda: "refused a connection from uid" in srv.stderr()), srv.stderr()

        flood = hold_connections(unprivileged_user, socket_path, 1100)  # more than the gate's whole capacity
        try:
            _root_works(srv.address)
        finally:
            flood.stdin.close()
            flood.wait(30)

        inner = [p for p in glob.glob("/tmp/sandpool-serve-*/grpc.sock") if os.stat(p).st_uid == 0]
        assert inner, "the server's own gRPC socket was not found"
        direct = as_user(unprivileged_user, f"""
            import socket
            for path in {inner!r}:
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(path)
                    print("CONNECTED", path)
                except OSError as exc:
                    print("DENIED", exc.errno)
        """)
        assert "CONNECTED" not in direct.stdout and "DENIED" in direct.stdout, direct
        _root_works(srv.address)


def test_an_allowed_user_gets_nothing_below_the_floor(unprivileged_user, run_dir, tmp_path):
    """With --allow-uid the ordinary user may connect, but a root server's default floor holds:
    isolation='process' and the host's network are refused with a permission error naming the fix;
    'auto' gives it a namespaces sandbox, which works. Root's client works throughout."""
    _name, uid, _gid, _home = unprivileged_user
    with ServerProcess(str(tmp_path), "--allow-uid", str(uid), listen=None,
                       env={endpoint.ENV_RUN_DIR: run_dir}) as srv:
        _root_works(srv.address)
        result = as_user(unprivileged_user, f"""
            import sandpool
            with sandpool.Session(address={srv.address!r}) as s:
                for options in ({{"isolation": "process"}}, {{"network": "host"}}, {{"isolation": "process", "network": "host"}}):
                    try:
                        out = s.sandbox(**options).exec(["id", "-u"]).result(timeout=30).stdout
                        print("GOT", options, out)
                    except sandpool.SandboxFailedError as exc:
                        cause = exc.__cause__
                        print("REFUSED", type(cause).__name__, exc)
                sb = s.sandbox()
                print("AUTO", sb.exec(["echo", "inside"]).result(timeout=60).stdout.strip(), sb.isolation)
        """)
        assert "GOT" not in result.stdout, result
        refusals = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
        assert len(refusals) == 3, result
        assert all("permission denied" in line for line in refusals), refusals
        assert "below this server's floor 'namespaces'" in refusals[0] and "--allow-host-network" in refusals[1]
        assert "AUTO inside" in result.stdout, result
        _root_works(srv.address)


def test_tcp_needs_a_token_even_on_loopback(unprivileged_user, tmp_path):
    """A TCP listener without --token-file makes a token and keeps it 0600 in root's run directory: an
    ordinary user on the same machine reaches the port but is refused UNAUTHENTICATED, with or without
    a guessed token, and cannot read the token file. Root's client finds the token and works."""
    with ServerProcess(str(tmp_path), listen="127.0.0.1:0") as srv:
        record = endpoint.ListenerRecord(srv.address)
        assert oct(os.stat(record.token_path).st_mode & 0o777) == "0o600"
        assert srv.token and f"token in {record.token_path}" in srv.first_line
        _root_works(srv.address)
        result = as_user(unprivileged_user, f"""
            import sandpool
            for token in (None, "guess"):
                try:
                    found = sandpool.Sandbox.list(address={srv.address!r}, token=token).result(timeout=30)
                    print("GOT", found)
                except sandpool.CWSandboxAuthenticationError as exc:
                    print("REFUSED", exc)
            try:
                open({record.token_path!r}).read()
                print("READ TOKEN")
            except PermissionError:
                print("TOKEN UNREADABLE")
        """, env={endpoint.ENV_RUN_DIR: os.environ[endpoint.ENV_RUN_DIR]})
        assert result.stdout.count("REFUSED") == 2 and "GOT" not in result.stdout, result
        assert "requires a token" in result.stdout and "wrong token" in result.stdout
        assert "TOKEN UNREADABLE" in result.stdout, result
        _root_works(srv.address)


def _list_bytes(srv) -> bytes:
    """The raw reply of one List call to the server: what every client's List pays for."""
    channel = grpc.insecure_channel(srv.address)
    try:
        return channel.unary_unary(m.path("List"))(m.pack({"show_terminated": True}), metadata=srv.metadata,
                                                   timeout=30)
    finally:
        channel.close()


def test_a_huge_create_is_refused_and_keeps_nothing(tmp_path):
    """The poisoning Create (600k environment entries, ~15 MiB) is refused at once naming the bound;
    so are one past the entry bound and one that fails to start. The server keeps nothing of them
    (no record, no journal line) and List answers the very bytes it did before (poisoned, it was a
    ~15 MiB reply, ~800x slower); the server serves on."""
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        keeper = s.sandbox(tags=["keeper"])
        keeper.wait()
        before_records = len(Sandbox.list(address=srv.address, show_terminated=True).result())
        with open(srv.record_file) as f:
            before_journal = f.read()
        list_before = _list_bytes(srv)

        huge = {f"VAR_{i}": "x" * 8 for i in range(600_000)}  # ~12 MiB: under gRPC's 16 MiB, past ours
        with pytest.raises((ValueError, SandboxFailedError), match=f"above this server's {limits.MAX_REQUEST_BYTES}-byte limit"):
            s.sandbox(environment_variables=huge).start().result(timeout=60)
        many = {f"V{i}": "" for i in range(limits.MAX_ENV_ENTRIES + 1)}
        with pytest.raises((ValueError, SandboxFailedError), match="environment_variables has 4097 entries, above the limit"):
            s.sandbox(environment_variables=many).start().result(timeout=60)
        with pytest.raises(SandboxFailedError):
            s.sandbox(container_image="no-such-image-anywhere:1").start().result(timeout=60)

        assert len(Sandbox.list(address=srv.address, show_terminated=True).result()) == before_records
        with open(srv.record_file) as f:
            assert f.read() == before_journal  # not one line for what never started
        assert _list_bytes(srv) == list_before
        assert keeper.exec(["echo", "still"]).result(timeout=30).stdout == "still\n"
        assert s.sandbox().exec(["echo", "new"]).result(timeout=60).stdout == "new\n"


def test_list_stays_small_whatever_the_specs(tmp_path):
    """A sandbox whose spec is as large as the bounds allow (~120 KiB of environment) is listed with a
    few KiB: many such sandboxes cannot push a List past gRPC's limit or slow it for everyone. Get still
    answers with the whole spec."""
    big_env = {f"V{i:04d}": "x" * 200 for i in range(600)}
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        sb = s.sandbox(environment_variables=big_env, tags=["big"])
        assert sb.exec(["sh", "-c", "echo $V0599 | wc -c"]).result(timeout=60).stdout.strip() == "201"
        channel = grpc.insecure_channel(srv.address)
        try:
            listed = channel.unary_unary(m.path("List"))(m.pack({}), metadata=srv.metadata, timeout=30)
            got = channel.unary_unary(m.path("Get"))(m.pack({"sandbox_id": sb.sandbox_id}), metadata=srv.metadata,
                                                     timeout=30)
        finally:
            channel.close()
        assert len(listed) < limits.MAX_SUMMARY_BYTES, len(listed)
        assert m.unpack(listed)["sandboxes"][0]["spec"]["tags"] == ["big"]
        assert m.unpack(got)["spec"]["environment_variables"] == big_env


def test_two_servers_cannot_share_an_address_or_a_record(tmp_path, run_dir):
    """A second server on the same unix socket, or on the same record file, stops at once naming the
    first one's pid; the first keeps its socket and keeps serving."""
    env = {endpoint.ENV_RUN_DIR: run_dir}
    with ServerProcess(str(tmp_path), listen=None, env=env) as first:
        for extra in ({"listen": None}, {"listen": "127.0.0.1:0", "record_file": first.record_file}):
            second = ServerProcess(str(tmp_path), env=env, **extra)
            with pytest.raises(RuntimeError, match=f"another sandpool server \\(pid {first.pid}\\) holds"):
                second.start()
        _root_works(first.address)
