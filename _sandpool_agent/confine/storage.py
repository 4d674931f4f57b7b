"""A sandbox's writable storage: one size-limited tmpfs under the overlay's upper layer and /tmp,
/run and /dev/shm, so ``ephemeral-storage`` bounds everything a sandbox can write, together.

The tmpfs is mounted on the sandbox's ``fs`` directory inside the sandbox's own mount namespace
(``mount``), before the overlay: its upper and work dirs live there, and /tmp, /run and /dev/shm
are bind mounts of directories beside them (``bind``). Writing past the size fails with ENOSPC
inside the sandbox (the file API reports ``CWSANDBOX_FILE_NO_SPACE``); deleting files frees the
space again. Nothing lands on the host's disk, and the kernel frees it all when the sandbox's last
process exits. Its pages are memory charged to the sandbox's memory cgroup (as a memory-backed
``emptyDir`` in Kubernetes, or gVisor's memory-backed root overlay), so a memory limit caps the
size too (``size_bytes``). Stdlib only: the template's children import this module.

``copy_layers`` is the rootless root of an image where the kernel refuses overlayfs in a user
namespace (before Linux 5.11): the image's layers merged by copying into the ``root`` tree.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat

from . import _sys

#: The default size when a sandbox names no ``ephemeral-storage`` limit: 1 GiB, or a tenth of the
#: machine's memory if that is less, so a few sandboxes writing all they may cannot exhaust the host.
DEFAULT_MAX_BYTES = 2**30
DEFAULT_MEMORY_SHARE = 10
#: The smallest size: a tmpfs of size 0 would have no limit at all.
MIN_BYTES = 2**20
#: The trees beside the upper layer, bound onto their mount points; name -> mode. ``root`` is the
#: host image's root (``namespaces.mount_root``).
TREES = {"tmp": 0o1777, "run": 0o755, "shm": 0o1777, "root": 0o755}


def default_bytes() -> int:
    """The ``ephemeral-storage`` of a sandbox that sets none (see ``DEFAULT_MAX_BYTES``)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_MAX_BYTES
    return min(DEFAULT_MAX_BYTES, memory // DEFAULT_MEMORY_SHARE)


def size_bytes(ephemeral_limit: int | None, memory_limit: int | None) -> int:
    """The tmpfs size: the ``ephemeral-storage`` limit (or the default), at most the memory limit,
    which the pages count against anyway, and at least ``MIN_BYTES``."""
    size = ephemeral_limit if ephemeral_limit is not None else default_bytes()
    return max(MIN_BYTES, min(size, memory_limit) if memory_limit else size)


def mount(plan: dict) -> None:
    """In the sandbox's mount namespace: the tmpfs on ``plan["scratch"]`` (size ``plan["tmp_bytes"]``)
    and, on it, the overlay's ``upper``, ``work`` and ``merged`` dirs and the ``TREES``."""
    scratch = plan["scratch"]
    _sys.mount("tmpfs", scratch, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV, f"mode=755,size={plan['tmp_bytes']}")
    for key in ("upper", "work", "merged"):
        os.mkdir(plan[key], 0o755)
    for name, mode in TREES.items():
        path = os.path.join(scratch, name)
        os.mkdir(path)
        os.chmod(path, mode)  # mkdir obeys the umask


def hold(plan: dict, holder: socket.socket | None) -> None:
    """Before the pivot_root (after which no path leads to it): hand the template, over ``holder``
    (a socket of the template's, see ``Supervisor``), a descriptor (O_PATH) of the tmpfs on
    ``plan["scratch"]``, then close both. The template, outside the sandbox, keeps it while the
    sandbox runs; the client, root, reads the upper layer through ``/proc/<template>/fd/<n>`` for a
    snapshot. Nothing of the sandbox can reach it: the template is in no namespace of the sandbox's,
    and the agent keeps no copy (its own descriptors are open to the sandbox's root). A process of
    the sandbox would cost a fork and ~2 MiB of private memory per sandbox. Without a ``holder``
    (rootless: there the detached mounts stay locked to their parents, so the old root could be
    climbed back to through the descriptor) nothing is held."""
    if holder is None:
        return
    try:
        if not plan.get("rootless"):
            fd = os.open(plan["scratch"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                socket.send_fds(holder, [b"h"], [fd])
            finally:
                os.close(fd)
    finally:
        holder.close()


def tree(plan: dict, name: str) -> str:
    """The host path (in the sandbox's mount namespace) of the tree ``name`` of ``TREES``."""
    return os.path.join(plan["scratch"], name)


def bind(plan: dict, name: str, target: str) -> None:
    """Bind the tree ``name`` onto ``target`` (the mount keeps the tmpfs's nosuid and nodev)."""
    _sys.mount(tree(plan, name), target, None, _sys.MS_BIND)


#: The xattrs that mark an overlayfs directory opaque (a rootless store's, root's).
OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")


def copy_layers(lowerdir: str, dest: str) -> None:
    """Merge overlayfs lower layers (``lowerdir``: ``top:...:bottom``) into the directory ``dest``
    by copying them, bottom first, so it shows what the overlay would: a 0/0 character device (a
    whiteout) removes what lower layers put at its name, an opaque directory hides their entries.
    Owners, modes and times are copied; hard links become separate files. Nothing is followed:
    symlinks are copied as symlinks."""
    for layer in reversed(lowerdir.split(":")):
        _merge(layer, dest)


def _merge(source: str, dest: str) -> None:
    with os.scandir(source) as entries:
        for entry in entries:
            target = os.path.join(dest, entry.name)
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                _remove(target)
                continue
            if stat.S_ISDIR(info.st_mode):
                if _opaque(entry.path) or not (os.path.isdir(target) and not os.path.islink(target)):
                    _remove(target)
                    os.mkdir(target, 0o700)
                _merge(entry.path, target)
            elif stat.S_ISLNK(info.st_mode):
                _remove(target)
                os.symlink(os.readlink(entry.path), target)
            elif stat.S_ISREG(info.st_mode):
                _remove(target)
                shutil.copyfile(entry.path, target, follow_symlinks=False)
            elif stat.S_ISFIFO(info.st_mode):
                _remove(target)
                os.mkfifo(target)
            else:
                continue  # (layers hold no other devices: extraction skips them)
            _copy_owner(target, info)


def _opaque(path: str) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_owner(path: str, info: os.stat_result) -> None:
    try:
        os.chown(path, info.st_uid, info.st_gid, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # (an id the namespace does not map: ours stays)
            raise
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(path, stat.S_IMODE(info.st_mode))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
