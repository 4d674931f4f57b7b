"""The newer CLI parts: --version, the hint when no server answers, exec -o json, delete, and sh on a pty."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
from service_helpers import REPO
from test_cli import sandbox, server  # noqa: F401  (test_cli's server and sandbox fixtures)

import sandpool
from sandpool import SandboxStatus, Session


def _env(address: str) -> dict:
    return {**os.environ, "SANDPOOL_ADDRESS": address, "SANDPOOL_TOKEN": "cli-token"}


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandpool", *args], capture_output=True, env=_env(server.address),
                          cwd=REPO, timeout=60)


def test_version_and_the_hint_when_no_server_answers(tmp_path):
    """--version prints the version; a command that finds no server says to run 'sandpool serve'."""
    version = subprocess.run([sys.executable, "-m", "sandpool", "--version"], capture_output=True, cwd=REPO, timeout=60)
    assert version.stdout.decode().strip() == f"sandpool {sandpool.__version__}"
    nobody = subprocess.run([sys.executable, "-m", "sandpool", "ls"], capture_output=True, cwd=REPO, timeout=60,
                            env=_env(f"unix:{tmp_path}/nobody.sock"))
    assert nobody.returncode == 1 and b"sandpool serve" in nobody.stderr


def test_exec_output_json(server, sandbox):
    """exec -o json prints one object with the result, and exits with the command's code."""
    result = cli(server, "exec", "-o", "json", sandbox.sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert json.loads(result.stdout) == {"returncode": 3, "stdout": "out\n", "stderr": "err\n", "truncated": False,
                                         "command": ["sh", "-c", "echo out; echo err >&2; exit 3"]}


def test_delete_by_id(server, sandbox):
    """delete stops the sandbox; --missing-ok makes an unknown id a success."""
    result = cli(server, "delete", sandbox.sandbox_id)
    assert result.returncode == 0 and result.stdout.decode() == f"Deleted {sandbox.sandbox_id}\n"
    sandbox.wait_until_complete(timeout=10, raise_on_termination=False).result()
    assert sandbox.status == SandboxStatus.TERMINATED
    assert cli(server, "delete", "sb-00000000").returncode == 1
    assert cli(server, "delete", "sb-00000000", "--missing-ok").returncode == 0


def test_sh_runs_on_a_terminal_and_exits_with_its_code(server, sandbox):
    """sh on a real terminal: the command sees a tty, its output reaches ours, and sh exits with its code."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "sandpool", "sh", sandbox.sandbox_id, "--cmd",
                                 "sh -c '[ -t 0 ] && echo on-a-tty; exit 5'"], stdin=slave, stdout=slave,
                                stderr=slave, env=_env(server.address), cwd=REPO)
        os.close(slave)
        slave = -1
        seen = b""
        while b"on-a-tty" not in seen:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the CLI exited and closed the terminal
                break
            if not data:
                break
            seen += data
        code = proc.wait(timeout=60)
        assert b"on-a-tty" in seen, seen
        assert code == 5, seen
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_sh_without_a_terminal_says_so(server, sandbox):
    """sh with stdin not a terminal is refused with the alternative named."""
    result = cli(server, "sh", sandbox.sandbox_id)
    assert result.returncode == 2 and b"needs a terminal" in result.stderr


def test_get_reports_runtime_class_and_placement(server):
    """get shows the runtime class and placement a sandbox asked for, beside the isolation it got."""
    with Session(address=server.address, token="cli-token") as s:
        with pytest.warns(UserWarning, match="runtime_class='gvisor-cli'"):
            sb = s.sandbox(runtime_class="gvisor-cli", placement_mode="cks")
        sb.wait()
        info = json.loads(cli(server, "get", sb.sandbox_id, "-o", "json").stdout)
    assert (info["runtime_class"], info["placement_mode"]) == ("gvisor-cli", "cks") and info["isolation"]
