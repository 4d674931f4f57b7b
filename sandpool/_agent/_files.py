"""File operations confined to a sandbox's root directory.

A path is read the way a process inside the sandbox would read it: absolute paths start at the
sandbox root, relative ones at the sandbox's working directory. After resolving symlinks the result
must stay inside the root; anything else is refused with reason ``CWSANDBOX_FILE_OUTSIDE_SANDBOX``.
"""

from __future__ import annotations

import errno
import os
import stat

_REASONS = {
    errno.ENOENT: "CWSANDBOX_FILE_NOT_FOUND",
    errno.EISDIR: "CWSANDBOX_FILE_IS_DIRECTORY",
    errno.EACCES: "CWSANDBOX_FILE_PERMISSION_DENIED",
    errno.EPERM: "CWSANDBOX_FILE_PERMISSION_DENIED",
    errno.ENOSPC: "CWSANDBOX_FILE_NO_SPACE",
    errno.EDQUOT: "CWSANDBOX_FILE_NO_SPACE",
    errno.EFBIG: "CWSANDBOX_FILE_TOO_LARGE",
}


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


def read_file(root: str, cwd: str, path: str, max_bytes: int) -> bytes:
    """Contents of ``path``; files above ``max_bytes`` are refused as too large."""
    host_path = confine(root, cwd, path)
    try:
        info = os.stat(host_path)
        if stat.S_ISDIR(info.st_mode):
            raise FileOpError(f"{path}: is a directory; read a file inside it", "CWSANDBOX_FILE_IS_DIRECTORY")
        size = info.st_size
        if size > max_bytes:
            raise FileOpError(f"{path}: {size} bytes exceeds the {max_bytes}-byte limit", "CWSANDBOX_FILE_TOO_LARGE")
        with open(host_path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _translate(exc, path) from None


def write_file(root: str, cwd: str, path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` atomically (temp file and rename), creating parent directories."""
    host_path = confine(root, cwd, path)
    tmp = f"{host_path}.sandpool-{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(host_path), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, host_path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _translate(exc, path) from None
