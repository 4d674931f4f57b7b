"""Helpers for the service tests: a real ``sandpool serve`` subprocess on a loopback port.

The server inherits SANDPOOL_STATE_DIR from the test run, so the autouse leak check sees its
sandboxes too: a test passes only if the server stopped what the test made. Its listener records
(and the token a TCP listener makes) go to a run directory of this test run (SANDPOOL_RUN_DIR),
where clients of the run find them as they would a real server's.
"""

from __future__ import annotations

import atexit
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sandpool._grpc import endpoint
from sandpool._grpc import messages as m

import leaks

PYTHON = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if endpoint.ENV_RUN_DIR not in os.environ:  # one per test run, removed when the run ends
    os.environ[endpoint.ENV_RUN_DIR] = tempfile.mkdtemp(prefix="sandpool-run-test-")
    atexit.register(shutil.rmtree, os.environ[endpoint.ENV_RUN_DIR], True)


class ServerProcess:
    """``python -m sandpool serve --listen 127.0.0.1:0 ...``; ``address`` once it listens.

    ``listen=None`` gives the server its default (the unix socket in its run directory); ``env``
    adds to its environment (e.g. its own SANDPOOL_RUN_DIR)."""

    def __init__(self, workdir: str, *args: str, token: str | None = None, grace: float = 30.0,
                 record_file: str | None = None, listen: str | None = "127.0.0.1:0",
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.record_file = record_file or os.path.join(workdir, "record.jsonl")
        self.token_file = None
        self.given_token = token
        if token is not None:
            self.token_file = os.path.join(workdir, "token")
            with open(self.token_file, "w") as f:
                f.write(token + "\n")
        self.argv = [PYTHON, "-m", "sandpool", "serve", *(["--listen", listen] if listen else []),
                     "--record-file", self.record_file, "--orphan-grace-seconds", str(grace), *args]
        self.extra_env = env or {}
        if self.token_file:
            self.argv += ["--token-file", self.token_file]
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.stderr_path = os.path.join(workdir, f"serve-{time.monotonic_ns()}.err")

    def start(self, timeout: float = 20.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}
        env["GRPC_VERBOSITY"] = "ERROR"
        env.update(self.extra_env)
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._err, env=env, cwd=REPO)
        leaks.server_started(self.proc.pid)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"sandpool serve did not start: {line!r} {self.stderr()}")
        self.first_line = line
        self.address = line.split("listening on ", 1)[1].split()[0]
        return self

    @property
    def token(self) -> str | None:
        """The server's token: the one it was given, else the one it made (from its listener record)."""
        return self.given_token or endpoint.token_for(self.address)

    @property
    def metadata(self) -> tuple:
        """gRPC metadata carrying the token, for tests that make raw calls."""
        return ((m.META_TOKEN, f"Bearer {self.token}"),) if self.token else ()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful) and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                leaks.server_stopped(self.proc.pid)
            if self.proc.stdout:
                self.proc.stdout.close()
            self._err.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Stop the server (SIGTERM); unless the block raised, it must exit 0 and leave nothing."""
        try:
            code = self.terminate()
        finally:
            self.kill()
        if exc_type is None:
            assert code == 0, f"sandpool serve exited with {code}: {self.stderr()}"
            leaks.check("sandpool serve, once stopped,")


def run_client(code: str, *, env: dict | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (a separate client); its output as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
