"""Copy a sandbox's writable tree into the snapshot store, hashing what it copies.

``copy_tree(src, dst)`` reads ``src`` (a directory the sandbox wrote: its overlay upper layer) one
component at a time through directory descriptors opened with ``O_NOFOLLOW``: a symlink the sandbox
made is copied as a symlink and never followed, so the copy (done as the client's user, root) reads
nothing outside ``src`` and writes nothing outside ``dst``. What it keeps: directories, regular
files, symlinks, fifos, owners, modes (without setuid and setgid: the store is on the host's disk),
modification times, and overlayfs's own marks (whiteouts: 0/0 character devices; the
``trusted.overlay.opaque`` xattr), so a restore hides what the sandbox deleted. Other device nodes
and sockets are skipped. Hard links become separate copies.

The returned digest is a sha256 over every entry's path, type, owner, mode, link target and
content, in name order: two identical trees get the same digest (the store keeps one copy).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from typing import Protocol

#: Bytes read and written at a time.
CHUNK = 1 << 20
_OPAQUE = "trusted.overlay.opaque"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Copied:
    """What ``copy_tree`` did: the tree's digest, and the bytes and entries it copied."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.entries = 0

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def copy_tree(src: str, dst: str, skip_top: frozenset[str] = frozenset(), copied: Copied | None = None) -> Copied:
    """Copy directory ``src`` to ``dst`` (made here, must not exist). ``skip_top``: names at the top
    of ``src`` left out. OSError if ``src`` is not a directory or a write fails."""
    copied = copied or Copied()
    sfd = os.open(src, _DIR_FLAGS)
    try:
        info = os.fstat(sfd)
        os.mkdir(dst, 0o700)
        dfd = os.open(dst, _DIR_FLAGS)
        try:
            _copy_opaque(sfd, dfd, "", copied)
            _copy_dir(sfd, dfd, "", copied, skip_top)
            _finish(dfd, None, info)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return copied


def _copy_dir(sfd: int, dfd: int, rel: str, copied: Copied, skip: frozenset[str]) -> None:
    for name in sorted(os.listdir(sfd)):
        if name in skip:
            continue
        path = f"{rel}/{name}"
        info = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        mode = info.st_mode
        copied.entries += 1
        if stat.S_ISDIR(mode):
            _record(copied, path, "d", info)
            os.mkdir(name, 0o700, dir_fd=dfd)
            child_s = os.open(name, _DIR_FLAGS, dir_fd=sfd)
            child_d = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                _copy_opaque(child_s, child_d, path, copied)
                _copy_dir(child_s, child_d, path, copied, frozenset())
                _finish(child_d, None, info)
            finally:
                os.close(child_s)
                os.close(child_d)
            continue
        if stat.S_ISREG(mode):
            _record(copied, path, "f", info)
            _copy_file(sfd, dfd, name, copied)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=sfd)
            _record(copied, path, "l:" + target, info)
            os.symlink(target, name, dir_fd=dfd)
        elif stat.S_ISCHR(mode) and info.st_rdev == 0:  # an overlay whiteout
            _record(copied, path, "w", info)
            os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dfd)
        elif stat.S_ISFIFO(mode):
            _record(copied, path, "p", info)
            os.mkfifo(name, 0o600, dir_fd=dfd)
        else:
            continue  # device nodes and sockets: not kept
        _finish(dfd, name, info)


def _record(copied: Copied, path: str, kind: str, info: os.stat_result) -> None:
    copied.hash.update(f"{path}\0{kind}\0{info.st_uid}:{info.st_gid}:{_mode(info.st_mode):o}\n".encode())


def _copy_file(sfd: int, dfd: int, name: str, copied: Copied) -> None:
    """Copy the data of ``name``, holes kept as holes: a sparse file the sandbox made (``truncate -s
    1T``) takes only its written blocks on the host's disk, as it did in the sandbox's tmpfs."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        dst = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            size = os.fstat(src).st_size
            content = hashlib.sha256(str(size).encode())
            for start, end in _data_segments(src, size):
                content.update(start.to_bytes(8, "little"))
                _send_range(src, dst, start, end)
                copied.bytes += _hash_range(dst, start, end, content)  # the copy: what is stored is what is named
            os.ftruncate(dst, size)
            copied.hash.update(content.digest())
        finally:
            os.close(dst)
    finally:
        os.close(src)


class _Digest(Protocol):
    """What ``_hash_range`` feeds: a hashlib object."""

    def update(self, data: memoryview, /) -> None: ...


def _hash_range(fd: int, start: int, end: int, content: _Digest) -> int:
    """Feed bytes ``start``..``end`` of ``fd`` to ``content``; how many there were."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    offset = start
    while offset < end:
        got = os.preadv(fd, [view[:min(CHUNK, end - offset)]], offset)
        if not got:
            break  # (truncated meanwhile: an unfrozen sandbox)
        content.update(view[:got])
        offset += got
    return offset - start


def _send_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes ``start``..``end`` of ``src`` to the same place in ``dst``, in the kernel."""
    os.lseek(dst, start, os.SEEK_SET)
    offset = start
    while offset < end:
        sent = os.sendfile(dst, src, offset, end - offset)
        if not sent:
            break
        offset += sent


def _data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data region of ``fd`` (SEEK_DATA/SEEK_HOLE; the whole file if unsupported)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset: the rest is a hole
                return
            yield offset, size
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        offset = end


def _finish(dfd: int, name: str | None, info: os.stat_result) -> None:
    """Owner, mode and times of the copy of ``name`` in ``dfd`` (of ``dfd`` itself if None)."""
    times = (info.st_atime_ns, info.st_mtime_ns)
    if name is None:
        os.chown(dfd, info.st_uid, info.st_gid)
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(dfd, _mode(info.st_mode))
        os.utime(dfd, ns=times)
        return
    os.chown(name, info.st_uid, info.st_gid, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        os.chmod(name, _mode(info.st_mode), dir_fd=dfd)
    os.utime(name, ns=times, dir_fd=dfd, follow_symlinks=False)


def _copy_opaque(sfd: int, dfd: int, path: str, copied: Copied) -> None:
    """overlayfs's opaque mark of a directory (its lower layers' entries are hidden), if it has one."""
    try:
        value = os.getxattr(sfd, _OPAQUE)
    except OSError:
        return
    copied.hash.update(f"{path}\0opaque\n".encode())
    os.setxattr(dfd, _OPAQUE, value)


def _mode(mode: int) -> int:
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)
