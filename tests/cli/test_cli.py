"""The ``sandpool`` command line against a real server: ls, get, exec, files, stop, in cwsandbox's
shape; tables or ``--output json``; exec streams and exits with the remote exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from service_helpers import REPO, ServerProcess

from sandpool import SandboxStatus, Session


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve")), token="cli-token") as srv:
        yield srv


@pytest.fixture
def sandbox(server):
    with Session(address=server.address, token="cli-token", defaults={"tags": ["cli-test"]}) as s:
        sb = s.sandbox()
        sb.wait()
        yield sb


def sandpool_cli(server, *args: str, stdin: bytes | None = None, token: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SANDPOOL_ADDRESS": server.address}
    env.pop("SANDPOOL_TOKEN", None)
    if token:
        env["SANDPOOL_TOKEN"] = "cli-token"
    return subprocess.run([sys.executable, "-m", "sandpool", *args], input=stdin, capture_output=True, env=env,
                          cwd=REPO, timeout=60)


def test_ls_table_and_json_filter_by_tag_and_status(server, sandbox):
    """ls prints a table with the sandbox; --tag/--status filter; -o json gives the fields."""
    table = sandpool_cli(server, "ls")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.decode().splitlines()
    assert header.split()[:2] == ["SANDBOX", "ID"]
    assert any(row.split()[:3] == [sandbox.sandbox_id, "running", "cli-test"] for row in rows)
    listed = json.loads(sandpool_cli(server, "ls", "--tag", "cli-test", "--status", "running", "-o", "json").stdout)
    assert [i["sandbox_id"] for i in listed] == [sandbox.sandbox_id] and listed[0]["tags"] == ["cli-test"]
    assert json.loads(sandpool_cli(server, "ls", "--tag", "no-such-tag", "-o", "json").stdout) == []
    bad = sandpool_cli(server, "ls", "--status", "RUNNING")
    assert bad.returncode == 1 and b'use "running"' in bad.stderr


def test_get_shows_one_sandbox(server, sandbox):
    """get prints key: value lines, or JSON; an unknown id is an error message, not a traceback."""
    text = sandpool_cli(server, "get", sandbox.sandbox_id).stdout.decode()
    assert f"sandbox_id:     {sandbox.sandbox_id}" in text and "status:         running" in text
    info = json.loads(sandpool_cli(server, "get", sandbox.sandbox_id, "-o", "json").stdout)
    assert info["status"] == "running" and info["isolation"]
    missing = sandpool_cli(server, "get", "sb-00000000")
    assert missing.returncode == 1 and missing.stderr.decode().startswith("Error: no sandbox 'sb-00000000'")


def test_exec_streams_output_and_exits_with_the_remote_code(server, sandbox):
    """exec ID -- CMD prints stdout and stderr as they come and exits with the command's exit code."""
    result = sandpool_cli(server, "exec", sandbox.sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    home = sandpool_cli(server, "exec", sandbox.sandbox_id, "--", "pwd")
    workdir = sandpool_cli(server, "exec", "--cwd", "/tmp", sandbox.sandbox_id, "--", "pwd")
    # "/tmp" inside a namespaced sandbox; "<its root>/tmp" at the process level, where pwd sees the host
    assert workdir.returncode == 0 and workdir.stdout.endswith(b"/tmp\n"), (workdir.stdout, workdir.stderr)
    assert home.returncode == 0 and home.stdout != workdir.stdout  # --cwd, not the default, put it there
    usage = sandpool_cli(server, "exec", sandbox.sandbox_id)
    assert usage.returncode == 2 and b"no command given" in usage.stderr


def test_files_write_then_read(server, sandbox, tmp_path):
    """files write copies a local file (or stdin) in; files read copies it out, byte for byte."""
    payload = os.urandom(100_000)
    local = tmp_path / "blob"
    local.write_bytes(payload)
    written = sandpool_cli(server, "files", "write", sandbox.sandbox_id, "/data/blob", str(local))
    assert written.returncode == 0
    assert written.stdout == f"Wrote 100000 bytes to {sandbox.sandbox_id}:/data/blob\n".encode()
    assert sandpool_cli(server, "files", "read", sandbox.sandbox_id, "/data/blob").stdout == payload
    out = tmp_path / "copy"
    sandpool_cli(server, "files", "read", sandbox.sandbox_id, "/data/blob", "-o", str(out))
    assert out.read_bytes() == payload
    piped = sandpool_cli(server, "files", "write", "-q", sandbox.sandbox_id, "/p", "-", stdin=b"from stdin")
    assert piped.returncode == 0 and piped.stdout == b""
    assert sandbox.read_file("/p").result() == b"from stdin"


def test_stop_and_missing_ok(server, sandbox):
    """stop ends the sandbox for its owner too; --missing-ok makes an unknown id a success."""
    result = sandpool_cli(server, "stop", sandbox.sandbox_id, "--graceful-shutdown-seconds", "1")
    assert result.returncode == 0 and result.stdout.decode() == f"Stopped {sandbox.sandbox_id}: terminated\n"
    sandbox.wait_until_complete(timeout=10, raise_on_termination=False).result()
    assert sandbox.status == SandboxStatus.TERMINATED
    assert sandpool_cli(server, "stop", "sb-00000000").returncode == 1
    assert sandpool_cli(server, "stop", "sb-00000000", "--missing-ok").returncode == 0


def test_token_is_required(server, sandbox):
    """Without the token the CLI says so, and exits 1."""
    result = sandpool_cli(server, "ls", token=False)
    assert result.returncode == 1 and b"requires a token" in result.stderr
