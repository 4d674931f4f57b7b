"""File operations confined to a sandbox's root directory.

A path is read the way a process inside the sandbox would read it: absolute paths start at the
sandbox root, relative ones at the sandbox's working directory. After resolving symlinks the result
must stay inside the root; anything else is refused with reason ``CWSANDBOX_FILE_OUTSIDE_SANDBOX``.
Only regular files are read or written unless asked (``CWSANDBOX_FILE_NOT_REGULAR``: a FIFO would
block for good, ``/dev/zero`` never ends), and no operation moves more than its size limit
(``CWSANDBOX_FILE_TOO_LARGE``). The agent runs them in threads (``FileWork``).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import stat
import threading
import time
from collections.abc import Callable

_REASONS = {
    errno.ENOENT: "CWSANDBOX_FILE_NOT_FOUND",
    errno.EISDIR: "CWSANDBOX_FILE_IS_DIRECTORY",
    errno.EACCES: "CWSANDBOX_FILE_PERMISSION_DENIED",
    errno.EPERM: "CWSANDBOX_FILE_PERMISSION_DENIED",
    errno.ENOSPC: "CWSANDBOX_FILE_NO_SPACE",
    errno.EDQUOT: "CWSANDBOX_FILE_NO_SPACE",
    errno.EFBIG: "CWSANDBOX_FILE_TOO_LARGE",
}


#: A FIFO, device or socket asked for without ``allow_special_files``.
NOT_REGULAR = "CWSANDBOX_FILE_NOT_REGULAR"


class FileOpError(Exception):
    """A refused or failed file operation; ``reason`` is a cwsandbox file reason code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def confine(root: str, cwd: str, path: str) -> str:
    """Map a sandbox path to a host path inside ``root``, or raise FileOpError."""
    if not path:
        raise FileOpError("empty path; pass a file path such as '/tmp/data.txt'", "CWSANDBOX_FILE_INVALID")
    base = root if path.startswith("/") else cwd
    candidate = os.path.realpath(os.path.join(base, path.lstrip("/") if path.startswith("/") else path))
    real_root = os.path.realpath(root)
    if candidate != real_root and not candidate.startswith(real_root.rstrip(os.sep) + os.sep):  # root may be /
        raise FileOpError(
            f"path {path!r} resolves outside the sandbox's filesystem; use a path inside it",
            "CWSANDBOX_FILE_OUTSIDE_SANDBOX",
        )
    return candidate


def _translate(exc: OSError, path: str) -> FileOpError:
    reason = _REASONS.get(exc.errno or 0, "CWSANDBOX_FILE_IO_FAILED")
    return FileOpError(f"{path}: {exc.strerror or exc}", reason)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _not_regular(path: str, mode: int) -> FileOpError:
    return FileOpError(
        f"{path}: is a {_kind(mode)}, not a regular file; reading or writing it may block for good or "
        "never end. Pass allow_special_files=True to use it anyway (reads stop at the size limit)",
        NOT_REGULAR,
    )


def _too_large(path: str, size: object, max_bytes: int) -> FileOpError:
    return FileOpError(f"{path}: {size} bytes exceeds the {max_bytes}-byte limit of one file operation; "
                       "move it in parts (e.g. split it with exec)", "CWSANDBOX_FILE_TOO_LARGE")


def read_file(root: str, cwd: str, path: str, max_bytes: int, special: bool = False) -> bytes:
    """Contents of ``path``, at most ``max_bytes`` (more is refused as too large, even for a file that
    grows while it is read). Only regular files unless ``special`` (FIFOs, devices, sockets)."""
    host_path = confine(root, cwd, path)
    try:
        info = os.stat(host_path)
        if stat.S_ISDIR(info.st_mode):
            raise FileOpError(f"{path}: is a directory; read a file inside it", "CWSANDBOX_FILE_IS_DIRECTORY")
        if not stat.S_ISREG(info.st_mode) and not special:
            raise _not_regular(path, info.st_mode)
        if info.st_size > max_bytes:
            raise _too_large(path, info.st_size, max_bytes)
        # Unasked, O_NONBLOCK: should the path become a FIFO meanwhile, opening it does not wait for a
        # writer, and fstat refuses it. Asked, a FIFO's open waits for its writer (in a thread).
        nonblock = 0 if special else os.O_NONBLOCK
        fd = os.open(host_path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | nonblock)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode) and not special:
                raise _not_regular(path, mode)
            return _read_at_most(fd, path, max_bytes)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _translate(exc, path) from None


def _read_at_most(fd: int, path: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(path, f"more than {max_bytes}", max_bytes)


def write_file(root: str, cwd: str, path: str, data: bytes, mode: int = 0o644, max_bytes: int | None = None,
               special: bool = False) -> None:
    """Write ``data`` atomically (temp file and rename), creating parent directories. Refused when
    above ``max_bytes``, or when ``path`` is a FIFO, device or socket unless ``special`` (then the
    data is written into it, as it is)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(path, len(data), max_bytes)
    host_path = confine(root, cwd, path)
    try:
        existing = os.stat(host_path).st_mode
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing) and not stat.S_ISDIR(existing):
        if not special:
            raise _not_regular(path, existing)
        try:
            fd = os.open(host_path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _translate(exc, path) from None
        return
    tmp = f"{host_path}.sandpool-{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(host_path), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, host_path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _translate(exc, path) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_range(root: str, cwd: str, path: str, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of regular file ``path`` at ``offset`` (b"" at its end): one chunk of
    a streamed read, so no size limit applies to the file."""
    host_path = confine(root, cwd, path)
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise FileOpError(f"{path}: is a directory; read a file inside it", "CWSANDBOX_FILE_IS_DIRECTORY")
            if not stat.S_ISREG(mode):
                raise _not_regular(path, mode)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _translate(exc, path) from None


def write_at(root: str, cwd: str, path: str, data: bytes, offset: int, mode: int = 0o644) -> None:
    """Write ``data`` at ``offset`` of regular file ``path``: one chunk of a streamed write. Offset 0
    creates the file (and its parent directories) or truncates it; a later chunk needs it to exist."""
    host_path = confine(root, cwd, path)
    try:
        flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
        if offset == 0:
            os.makedirs(os.path.dirname(host_path), exist_ok=True)
            flags |= os.O_CREAT | os.O_TRUNC
        fd = os.open(host_path, flags, mode)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(path, info.st_mode)
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)
    except OSError as exc:
        raise _translate(exc, path) from None


class FileWork:
    """File operations off the agent's loop: each runs in a thread of its own (at most
    ``MAX_THREADS`` at once, the rest wait their turn), so a slow disk, a FIFO read on request or a
    huge file never delays execs, signals, timeouts or stop. Finished operations are collected in the
    loop's thread (``collect``), woken through ``fileno``, so frames are only ever sent from there."""

    MAX_THREADS = 8

    def __init__(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._done: collections.deque[dict] = collections.deque()
        self._waiting: collections.deque[tuple[int, str, Callable[[], bytes | None]]] = collections.deque()
        self._running = 0

    def fileno(self) -> int:
        return self._wake_r

    def submit(self, req_id: int, path: str, operation: Callable[[], bytes | None]) -> None:
        """Run ``operation`` (returns the data to answer, or None) for request ``req_id``."""
        self._waiting.append((req_id, path, operation))
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self._waiting and self._running < self.MAX_THREADS:
            self._running += 1
            threading.Thread(target=self._run, args=self._waiting.popleft(), daemon=True).start()

    def _run(self, req_id: int, path: str, operation: Callable[[], bytes | None]) -> None:
        try:
            data = operation()
            answer = {"t": "result", "id": req_id} if data is None else {"t": "result", "id": req_id, "data": data}
        except FileOpError as exc:
            answer = {"t": "error", "id": req_id, "kind": exc.reason, "message": str(exc), "path": path}
        except Exception as exc:  # a failure of the operation itself must still answer its request
            answer = {"t": "error", "id": req_id, "kind": "CWSANDBOX_FILE_IO_FAILED", "message": f"{path}: {exc}",
                      "path": path}
        self._done.append(answer)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the loop has wake-ups pending already
            pass

    def drain(self, timeout: float) -> list[dict]:
        """The answers of every operation that finishes within ``timeout`` seconds (at the end of
        the sandbox: a write that finished as the main command ended still answers); operations
        still running then (a FIFO nobody opens) are left unanswered."""
        deadline = time.monotonic() + timeout
        answers = self.collect()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while self._running or self._waiting:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                break
            answers += self.collect()
        return answers

    def collect(self) -> list[dict]:
        """The answers of finished operations (call in the loop's thread when ``fileno`` is readable)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        answers = []
        while self._done:
            answers.append(self._done.popleft())
            self._running -= 1
        self._start_waiting()
        return answers
