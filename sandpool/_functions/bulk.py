"""Bulk transfer for local sandboxes: large arguments and results travel as files in the sandbox's /tmp.

Frames through the agent cost four socket hops and several copies per megabyte. When the caller
can reach the sandbox's ``/tmp`` (its tmpfs, through ``/proc/<agent pid>/root/tmp`` for namespaced
sandboxes, or the sandbox's root directory for ``process`` ones), an argument pickle of
``BULK_BYTES`` or more is written there and the call frame names it (``args_path``); the frame
also offers the directory for the result (``bulk``), which the worker uses for a large result and
names in its answer (``path``). The reader of a file unlinks it. The client trusts nothing in that
directory: it writes only new files there and reads result files as plain bytes (see ``take_result``). Anything that fails falls back to
frames, so remote runtimes (which expose no such directory) simply never use it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import SerializationError

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord

#: Pickles at least this large go through a file instead of the frame.
BULK_BYTES = 512 * 1024
#: The directory inside the sandbox (a tmpfs when the sandbox is namespaced).
SANDBOX_DIR = "/tmp"


def host_dir(record: SandboxRecord | None) -> str | None:
    """Where this process sees the ``/tmp`` of the sandbox a runtime's record describes, or None
    (no record, a remote sandbox, or not reachable)."""
    if record is None or not record.agent_pid:
        return None
    if record.isolation == "namespaces":
        path = f"/proc/{record.agent_pid}/root{SANDBOX_DIR}"
    elif record.isolation == "process" and record.root:
        path = os.path.join(record.root, SANDBOX_DIR.lstrip("/"))
    else:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


record_dir = host_dir  # the service's name for it


def open_dir(directory: str) -> int:
    """An O_PATH descriptor of the sandbox's /tmp: its last component is the sandbox's to change,
    so it must not be a link (one to an absolute path would lead to this host's own directories)."""
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def put_args(directory: str, name: str, data: bytes | list[bytes]) -> str | None:
    """Write an argument pickle (bytes, or its parts) as a new file ``name`` in the sandbox's /tmp;
    its sandbox path, or None if it could not be written."""
    try:
        dir_fd = open_dir(directory)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            for part in [data] if isinstance(data, bytes) else data:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError:  # full, gone, or the name taken: the frame carries it instead
        _unlink(dir_fd, name)
        return None
    finally:
        os.close(dir_fd)
    return f"{SANDBOX_DIR}/{name}"


#: Largest result file read back (a bigger one fails its call with SerializationError).
MAX_RESULT_BYTES = 4 * 1024 * 1024 * 1024
_RESULT_PREFIX = ".sandpool-r-"


def take_result(directory: str, sandbox_path: str, name: str, decode: Callable[[int, int], Any]) -> Any:
    """Open (and remove) a result file the worker named, and ``decode(fd, size)`` it.

    The sandbox controls that directory, so neither it nor the file may be a link, the file must
    be a regular one no larger than ``MAX_RESULT_BYTES``, and ``decode`` reads it rather than
    mapping it (a mapping of a file the sandbox can truncate would fault here).
    SerializationError for any of that.
    """
    base = os.path.basename(sandbox_path)
    if not base.startswith(_RESULT_PREFIX):
        raise SerializationError(f"the result of {name!r} names {sandbox_path!r}, not a result file")
    try:
        dir_fd = open_dir(directory)
        try:
            fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        finally:
            _unlink(dir_fd, base)
            os.close(dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            if info.st_size > MAX_RESULT_BYTES:
                raise ValueError(f"{info.st_size} bytes, above the limit of {MAX_RESULT_BYTES}")
            return decode(fd, info.st_size)
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        raise SerializationError(f"the result of {name!r} could not be read from {sandbox_path}: {exc}") from exc


def discard(directory: str | None, sandbox_path: str) -> None:
    """Remove a bulk file nobody will read (its call was cancelled or failed)."""
    if directory:
        try:
            dir_fd = open_dir(directory)
        except OSError:
            return
        try:
            _unlink(dir_fd, os.path.basename(sandbox_path))
        finally:
            os.close(dir_fd)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass
