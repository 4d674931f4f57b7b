"""Helpers that look at the host's processes (sandbox processes are host processes too)."""

from __future__ import annotations

import os


def running(argv: list[str]) -> list[int]:
    """Host pids whose command line is exactly ``argv`` (zombies have none, so they do not count)."""
    wanted = b"\0".join(a.encode() for a in argv) + b"\0"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == wanted:
                    found.append(int(pid))
        except OSError:
            pass
    return found


def sigkill_when_ready(script: str, env: dict[str, str]) -> int:
    """Run the Python ``script`` (it prints "ready" once its sandboxes run) as a client process with
    ``env``, SIGKILL it at that point and return its exit status (``-SIGKILL`` when it was killed)."""
    import subprocess
    import sys

    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
    finally:
        client.kill()
        client.wait()
    return client.returncode
