"""Where a server listens by default, and the per-listener record its clients find it by.

- The run directory: ``$SANDPOOL_RUN_DIR``, else ``/run/sandpool`` for root, else
  ``$XDG_RUNTIME_DIR/sandpool``, else ``<tmp>/sandpool-run-<uid>``. Made mode 0700 and refused
  (with the fix) if it is a symlink or belongs to another user, so nobody else can plant or
  replace what lies in it.
- The default address: ``unix:<run dir>/serve.sock`` (the socket is 0600; see ``peergate.py``).
- A listener record: ``<run dir>/listeners/<address>.json`` (0600), ``{address, pid, token,
  token_file}``, written by the server and held under an exclusive ``flock`` for as long as it
  serves; beside it, a listener with a token writes ``<address>.token`` (0600, the token alone), for
  ``--token-file``, ``SANDPOOL_TOKEN=$(cat ...)`` or ``CWSANDBOX_API_KEY=$(cat ...)``. A second
  server for the same address cannot take the lock and stops with an error naming the first one's
  pid, before it touches the socket. A client of the same user reads the record (and a TCP
  listener's token) only while a live server holds it; a stale record is ignored.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
import time
from typing import Any

ENV_RUN_DIR = "SANDPOOL_RUN_DIR"
SOCKET_NAME = "serve.sock"


def run_dir() -> str:
    """This user's sandpool run directory (not created here)."""
    if os.environ.get(ENV_RUN_DIR):
        return os.environ[ENV_RUN_DIR]
    if os.geteuid() == 0:
        return "/run/sandpool"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "sandpool")
    return os.path.join(tempfile.gettempdir(), f"sandpool-run-{os.geteuid()}")


def default_address() -> str:
    """``unix:<run dir>/serve.sock``: where a plain ``sandpool serve`` listens, and clients look."""
    return f"unix:{os.path.join(run_dir(), SOCKET_NAME)}"


def private_dir(path: str, mode: int = 0o700) -> str:
    """``path`` as a directory of this user with ``mode`` (made if missing). OSError naming the fix if
    it is a symlink, not a directory, or another user's: its contents could not be trusted."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, mode)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a directory (a symlink or a file); remove it, or set ${ENV_RUN_DIR} "
                      f"to a directory of your own")
    if info.st_uid != os.geteuid():
        raise OSError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); someone else "
                      f"made it, so sandpool will not trust it: remove it, or set ${ENV_RUN_DIR}")
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
    return path


def _record_path(address: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", address).strip("_")[:200]
    return os.path.join(run_dir(), "listeners", f"{safe}.json")


class ListenerRecord:
    """The locked record of one listening address (see the module docstring)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.path = _record_path(address)
        self.token_path = self.path[: -len(".json")] + ".token"
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<ListenerRecord {self.path} {'held' if self._fd is not None else 'free'}>"

    def acquire(self) -> ListenerRecord:
        """Take the record's lock; OSError naming the server that holds it."""
        private_dir(os.path.dirname(self.path))
        self._fd = hold_lock(self.path, f"the address {self.address}")
        return self

    def write(self, token: str | None = None) -> None:
        """Replace the record's contents (mode 0600, only this user reads it), and the token file."""
        assert self._fd is not None, "acquire() first"
        if token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.token_path)
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        body = json.dumps({"address": self.address, "pid": os.getpid(), "token": token,
                           "token_file": self.token_path if token else None}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, body, 0)

    def release(self) -> None:
        if self._fd is not None:
            for path in (self.token_path, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(self._fd)
            self._fd = None


def hold_lock(path: str, what: str) -> int:
    """An fd of ``path`` (made 0600) holding its exclusive flock; OSError if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd).get("pid", "unknown")
        os.close(fd)
        raise OSError(f"another sandpool server (pid {holder}) holds {what} (lock {path}); stop it first, "
                      f"or give this one another address or --record-file") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find(address: str) -> dict[str, Any] | None:
    """The live record of ``address`` (this user's), or None if no live server holds one."""
    try:
        fd = os.open(_record_path(address), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a live server holds it: read what it wrote (it may be mid-write)
            for _ in range(20):
                data = _read(fd)
                if data.get("address") == address:
                    return data
                time.sleep(0.005)
        return None  # nobody holds it: the server that wrote it is gone
    finally:
        os.close(fd)


def token_for(address: str) -> str | None:
    """The token a live server of this user generated for ``address``, if any."""
    record = find(address)
    token = record.get("token") if record else None
    return token if isinstance(token, str) and token else None
