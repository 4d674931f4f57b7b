"""The cwsandbox listener's log-stream resume and exec stdin timeouts, as cwsandbox's service does them:
each log entry names its session and the offset after it; a resume continues from there, an unknown
session is refused in band (SESSION_NOT_FOUND). Driven by raw calls (the exact protocol) and by the
published client through a loopback relay whose connections the test cuts mid-stream."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from sandpool._cwsandbox._proto import SERVICE, pb

from relay_helpers import Relay
from service_helpers import wait_until
from test_cwsandbox_client import PYTHON, REPO, Server, _server, _spec, assert_nothing_left, run  # noqa: F401
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def server(cwsandbox_client, tmp_path_factory):  # noqa: F811
    yield from _server(tmp_path_factory)


def _logs(server: Server, request) -> list:
    rpc = server.channel.unary_stream(f"/{SERVICE}/StreamLogs", request_serializer=type(request).SerializeToString,
                                      response_deserializer=pb.LogEntry.FromString)
    return list(rpc(request, metadata=(("authorization", f"Bearer {server.token}"),), timeout=30))


def _finished(server: Server, script: str) -> str:
    created = server.call("CreateSandbox", pb.CreateSandboxRequest(sandbox=pb.Sandbox(
        spec=_spec("logs-resume", command="sh", args=("-c", script)))), pb.Sandbox)
    def finished() -> bool:
        got = server.call("GetSandbox", pb.GetSandboxRequest(sandbox_id=created.sandbox_id), pb.Sandbox)
        return got.status.state != pb.State.Value("STATE_RUNNING")

    assert wait_until(finished, timeout=30), "the sandbox's main command did not end"
    return created.sandbox_id


def test_entries_name_their_session_and_a_resume_continues_from_its_offset(server):
    """A fresh stream's entries carry one session id and increasing offsets; a resume with the id and
    an offset sends exactly the lines after it, formatted as the session was (timestamps)."""
    sandbox_id = _finished(server, "sleep 0.2; for i in 1 2 3 4 5; do echo line$i; done")
    first = _logs(server, pb.StreamLogsRequest(sandbox_id=sandbox_id, timestamps=True))
    assert [e.data.split(b" ", 1)[1] for e in first] == [b"line%d\n" % i for i in range(1, 6)]
    [session] = {e.log_session_id for e in first}
    assert session and [e.next_log_offset for e in first] == [1, 2, 3, 4, 5]
    resumed = _logs(server, pb.StreamLogsRequest(sandbox_id=sandbox_id, resume_log_session_id=session,
                                                 resume_log_offset=first[2].next_log_offset))
    assert [e.data for e in resumed] == [e.data for e in first[3:]]  # timestamps kept: the session's
    assert {e.log_session_id for e in resumed} == {session} and [e.next_log_offset for e in resumed] == [4, 5]
    assert _logs(server, pb.StreamLogsRequest(sandbox_id=sandbox_id, resume_log_session_id=session,
                                              resume_log_offset=5)) == []
    [past] = _logs(server, pb.StreamLogsRequest(sandbox_id=sandbox_id, resume_log_session_id=session,
                                                resume_log_offset=99))
    assert past.error.code == "INVALID_RESUME_OFFSET" and not past.data
    server.call("DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sandbox_id), pb.DeleteSandboxResponse)


def test_an_unknown_session_is_refused_in_band(server):
    """A session id the server never gave, or one of another sandbox, gets one SESSION_NOT_FOUND entry
    (not a gRPC error: the client then starts afresh); a fresh stream still works."""
    a = _finished(server, "sleep 0.2; echo a")
    b = _finished(server, "sleep 0.2; echo b")
    session_of_a = _logs(server, pb.StreamLogsRequest(sandbox_id=a))[0].log_session_id
    for sandbox_id, session in ((a, "logs-never-given"), (b, session_of_a)):
        [refusal] = _logs(server, pb.StreamLogsRequest(sandbox_id=sandbox_id, resume_log_session_id=session,
                                                       resume_log_offset=1))
        assert refusal.error.code == "SESSION_NOT_FOUND" and sandbox_id in refusal.error.message
    assert [e.data for e in _logs(server, pb.StreamLogsRequest(sandbox_id=b))] == [b"b\n"]
    for sandbox_id in (a, b):
        server.call("DeleteSandbox", pb.DeleteSandboxRequest(sandbox_id=sandbox_id), pb.DeleteSandboxResponse)


FOLLOW_ACROSS_A_CUT = """
import sys
from cwsandbox import Sandbox

GO = sys.argv[1]  # a name of this run: wherever the sandbox's /tmp is, no earlier run left it
sb = Sandbox.run("sh", "-c", f"echo one; while [ ! -e {GO} ]; do sleep 0.05; done; rm -f {GO}; "
                 "for i in 2 3 4; do echo line$i; done")
sb.wait()
print(sb.sandbox_id, flush=True)
lines = []
for line in sb.stream_logs(follow=True):
    lines.append(line)
    if len(lines) == 1:
        print("first", flush=True)
        sys.stdin.readline()  # the test cuts the connection, lets the command go on, then says so
print(lines, flush=True)
assert lines == ["one\\n", "line2\\n", "line3\\n", "line4\\n"], lines
sb.wait_until_complete(timeout=30).result()
"""


def test_the_published_client_resumes_a_follow_stream_across_a_cut_connection(server, tmp_path):
    """The client's follow stream breaks (every connection of the relay cut); it reconnects and the
    rest of the log arrives, each line once, and the stream ends with the sandbox."""
    relay = Relay(server.address)
    program = tmp_path / "follow.py"
    program.write_text(FOLLOW_ACROSS_A_CUT)
    env = {**server.env(), "CWSANDBOX_BASE_URL": f"http://{relay.address}"}
    go = f"/tmp/cwsandbox-logs-go-{time.monotonic_ns()}"
    client = subprocess.Popen([PYTHON, str(program), go], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        sandbox_id = client.stdout.readline().strip()
        assert client.stdout.readline() == "first\n", client.stderr.read()
        relay.cut()
        server.call("WriteFile", pb.WriteFileRequest(sandbox_id=sandbox_id, path=go, content=b""),
                    pb.WriteFileResponse)
        client.stdin.write("\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, f"{out}\n{err}"
        assert relay.accepted >= 2  # the stream came back over a new connection
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        relay.close()
    assert_nothing_left(server)


SCAN_PROCESSES = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        print(open(f"/proc/{pid}/cmdline", "rb").read().replace(bytes(1), b" ").decode())
    except OSError:
        pass
"""


def test_exec_stdin_timeout_kills_a_command_waiting_for_input(server):
    """exec(stdin=True, timeout_seconds=...) of a command that waits for input that never comes: the
    client gets its ready frame at once (it waits at most 5 s for it), then SandboxTimeoutError at the
    timeout; the command is gone and the sandbox and other commands' stdin go on working."""
    run(server, f"""
        import time
        from cwsandbox import Sandbox, SandboxTimeoutError
        SCAN = {SCAN_PROCESSES!r}

        with Sandbox.run() as sb:
            started = time.monotonic()
            proc = sb.exec(["sh", "-c", "read line; echo never $line"], stdin=True, timeout_seconds=1)
            proc.stdin.write(b"no newline, no eof").result()
            try:
                proc.result()
            except SandboxTimeoutError:
                pass
            else:
                raise AssertionError("no timeout")
            took = time.monotonic() - started
            assert 0.9 < took < 10, took
            seen = sb.exec(["python3", "-c", SCAN]).result().stdout
            assert "python3 -c" in seen and "sh -c read line" not in seen, seen
            echo = sb.exec(["cat"], stdin=True, timeout_seconds=30)
            echo.stdin.writeline("still fed").result()
            echo.stdin.close().result()
            assert echo.result().stdout == "still fed\\n"
    """)


def test_serve_cwsandbox_streams_the_fleets_own_logs(cwsandbox_client, tmp_path, monkeypatch):  # noqa: F811
    """Behind ``sandpool serve --cwsandbox`` (the listener's sandboxes live on the server's fleet) the
    published client's stream_logs reads the main log the server keeps: whole, tail and follow, and
    sandpool's own client sees the same lines."""
    import socket

    from sandpool import Sandbox
    from sandpool._grpc import endpoint
    from service_helpers import ServerProcess, wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")
    with ServerProcess(str(tmp_path), "--cwsandbox", f"127.0.0.1:{port}") as srv:
        api_key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        program = tmp_path / "logs.py"
        program.write_text(
            "from cwsandbox import Sandbox\n"
            "sb = Sandbox.run('sh', '-c', 'for i in 1 2 3; do echo line$i; done; sleep 0.3; echo last')\n"
            "sb.wait()\n"
            "followed = list(sb.stream_logs(follow=True))\n"
            "assert followed == ['line1\\n', 'line2\\n', 'line3\\n', 'last\\n'], followed\n"
            "assert list(sb.stream_logs(tail_lines=2)) == ['line3\\n', 'last\\n']\n"
            "print(sb.sandbox_id)\n")
        env = {**os.environ, "CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": api_key,
               "GRPC_VERBOSITY": "ERROR"}
        done = subprocess.run([PYTHON, str(program)], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr
        sandbox_id = done.stdout.strip().splitlines()[-1]
        found = Sandbox.from_id(sandbox_id, address=srv.address).result()
        assert list(found.stream_logs(tail_lines=1)) == ["last\n"]
