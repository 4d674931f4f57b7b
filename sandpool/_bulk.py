"""Bulk transfer for local sandboxes: large arguments and results travel as files in the sandbox's /tmp.

Frames through the agent cost four socket hops and several copies per megabyte. When the caller
can reach the sandbox's ``/tmp`` (its tmpfs, through ``/proc/<agent pid>/root/tmp`` for namespaced
sandboxes, or the sandbox's root directory for ``process`` ones), an argument pickle of
``BULK_BYTES`` or more is written there and the call frame names it (``args_path``); the frame
also offers the directory for the result (``bulk``), which the worker uses for a large result and
names in its answer (``path``). The reader of a file unlinks it. Anything that fails falls back to
frames, so remote runtimes (which expose no such directory) simply never use it.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any

from . import _serialize
from ._errors import SerializationError

if TYPE_CHECKING:
    from ._sandbox import Sandbox

#: Pickles at least this large go through a file instead of the frame.
BULK_BYTES = 512 * 1024
#: The directory inside the sandbox (a tmpfs when the sandbox is namespaced).
SANDBOX_DIR = "/tmp"


def host_dir(sandbox: Sandbox) -> str | None:
    """Where this process sees the sandbox's ``/tmp``, or None (remote, or not reachable)."""
    record = sandbox._record
    if record is None or not record.agent_pid:
        return None
    if record.isolation == "namespaces":
        path = f"/proc/{record.agent_pid}/root{SANDBOX_DIR}"
    elif record.isolation == "process" and record.extra.get("root"):
        path = os.path.join(record.extra["root"], SANDBOX_DIR.lstrip("/"))
    else:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


def put_args(directory: str, name: str, data: bytes | list[bytes]) -> str | None:
    """Write an argument pickle (bytes, or its parts) as ``name`` in the sandbox's /tmp; its
    sandbox path, or None if it could not be written."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for part in [data] if isinstance(data, bytes) else data:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError:  # full, or gone: the frame carries it instead
        _unlink(path)
        return None
    return f"{SANDBOX_DIR}/{name}"


def take_result(directory: str, sandbox_path: str, name: str) -> Any:
    """Unpickle (and remove) a result file the worker named; SerializationError if it will not load."""
    path = os.path.join(directory, os.path.basename(sandbox_path))
    try:
        return load_file(path, _serialize.loads)
    except OSError as exc:
        raise SerializationError(f"the result of {name!r} could not be read from {sandbox_path}: "
                                            f"{exc}") from exc
    except Exception as exc:
        raise SerializationError(f"the result of {name!r} could not be unpickled here "
                                            f"({type(exc).__name__}: {exc})") from exc


def load_file(path: str, loads: Any) -> Any:
    """``loads`` the file's contents through a read-only mapping (no extra copy), then unlink it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
            return loads(mapped)
    finally:
        os.close(fd)


def discard(directory: str | None, sandbox_path: str) -> None:
    """Remove a bulk file nobody will read (its call was cancelled or failed)."""
    if directory:
        _unlink(os.path.join(directory, os.path.basename(sandbox_path)))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
