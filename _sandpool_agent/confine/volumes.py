"""A sandbox's volumes, sandbox side: mounted into its root before the pivot_root (``namespaces``).

Each entry of ``plan["volumes"]`` is a dict: ``target`` (an absolute path inside the sandbox),
``read_only``, and either ``size`` (a scratch volume: a tmpfs of that many bytes, in the sandbox's
own mount namespace, gone with it) or ``source`` (a host directory the runtime checked: a named
volume's data directory or a bind the user named) with ``sub`` (a relative path below it, or "").

Paths are walked one component at a time with ``O_NOFOLLOW`` (``_walk``): a symlink on the way, in
the image, a snapshot or a volume another sandbox writes to, refuses the mount instead of leading
it somewhere else; the mount then goes through the descriptors (``/proc/self/fd/N``), so nothing
can swap a component between the check and the mount. Stdlib only.
"""

from __future__ import annotations

import errno
import os

from . import _sys

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags a remount must repeat, or it would clear them (statvfs's ST_* bits have the MS_* values).
_KEPT = _sys.MS_NOEXEC | 0x400 | 0x800 | 0x1000  # noexec, noatime, nodiratime, relatime


def mount(entries: list | tuple, merged: str) -> None:
    """Mount each volume of ``entries`` into the root being built at ``merged``. OSError naming the
    volume and the step that failed (the sandbox then fails to start)."""
    for entry in entries:
        target = entry["target"]
        try:
            _mount_one(entry, merged)
        except OSError as exc:
            raise OSError(exc.errno, f"volume at {target}: {exc.strerror or exc}") from exc


def _mount_one(entry: dict, merged: str) -> None:
    target = entry["target"]
    flags = _sys.MS_NOSUID | _sys.MS_NODEV
    dst = _walk(merged, target, create=True)
    try:
        if "size" in entry:
            _sys.mount("tmpfs", _fd_path(dst), "tmpfs", flags | (_sys.MS_RDONLY if entry["read_only"] else 0),
                       f"mode=1777,size={int(entry['size'])}")
            return
        src = _walk(entry["source"], entry.get("sub") or "", create=False)
        try:
            _sys.mount(_fd_path(src), _fd_path(dst), None, _sys.MS_BIND)
        finally:
            os.close(src)
    finally:
        os.close(dst)
    # the remount names the new mount by its path: checked free of symlinks above, and nothing of the
    # sandbox runs yet to change it (volume targets are never nested in one another)
    path = os.path.join(merged, target.lstrip("/"))
    kept = os.statvfs(path).f_flag & _KEPT
    _sys.mount(None, path, None, _sys.MS_REMOUNT | _sys.MS_BIND | flags | kept
               | (_sys.MS_RDONLY if entry["read_only"] else 0))


def _walk(base: str, rel: str, create: bool) -> int:
    """An O_PATH descriptor of directory ``base``/``rel``, reached without following a symlink in
    ``rel`` (``base`` itself is trusted); missing directories are made when ``create``."""
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in (part for part in rel.split("/") if part):
            if name in (".", ".."):
                raise OSError(errno.EINVAL, f"{rel!r} has a {name!r} component")
            try:
                nxt = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)  # (an O_PATH descriptor serves as dir_fd)
                nxt = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(exc.errno, f"{name!r} in {rel!r} is a symlink or not a directory") from exc
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"
