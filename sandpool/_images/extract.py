"""Unpack one image layer (a tar, plain, gzip or zstd) into an empty directory, safely.

Every entry is placed by walking its parent directories one component at a time with
``O_NOFOLLOW | O_DIRECTORY`` directory descriptors: a symlink met on the way (whatever it points at)
refuses the layer, and ``..`` components refuse it too, so nothing lands outside the layer.
Whiteouts become overlayfs whiteouts (``.wh.NAME``: a 0/0 character device, which the kernel lets
anyone make; ``.wh..wh..opq``: the ``trusted.overlay.opaque`` xattr as root, ``user.overlay.opaque``
for a rootless store, whose overlay is mounted with ``userxattr``). Hard links may only point at a
regular file this same layer wrote before. Device nodes are skipped. Setuid and setgid bits are
dropped: inside a sandbox ``no_new_privileges`` and the ``nosuid`` overlay make them inert, and
outside the layer store they would be a setuid file of an untrusted image on the host. Owners are
kept when the unpacker is root (of the host, or of a user namespace: ``rootless``); an owner the
namespace does not map stays the unpacker's (0 inside).

The uncompressed stream is hashed as it is read: ``extract`` returns its digest, the layer's
``diff_id``, which the caller checks against the image config's ``rootfs.diff_ids``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from typing import BinaryIO
from collections.abc import Callable

from .errors import ImageError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Where overlayfs mounted with ``userxattr`` (in a user namespace) looks for it.
USER_OPAQUE_XATTR = "user.overlay.opaque"
MAX_ENTRIES = 2_000_000
#: Bytes one layer may unpack to (a bound on a decompression bomb), overridable for huge images.
MAX_LAYER_BYTES = int(os.environ.get("SANDPOOL_IMAGE_MAX_LAYER_BYTES", str(64 * 2**30)))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(ImageError):
    """A layer entry that would escape the layer (or is otherwise unsafe); the whole layer is refused."""


def open_stream(path: str, compression: str) -> tuple[BinaryIO, subprocess.Popen[bytes] | None]:
    """The uncompressed tar stream of a downloaded layer (and the decoder process for zstd, if any)."""
    if compression == "none":
        return open(path, "rb"), None
    if compression == "gzip":
        return gzip.open(path, "rb"), None  # type: ignore[return-value]  # a GzipFile reads bytes like a BinaryIO
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

            return zstd.open(path, "rb"), None
        except ImportError:
            pass
        decoder = shutil.which("zstd")
        if decoder is None:
            raise ImageError("this image has zstd-compressed layers (application/vnd.oci.image.layer.v1.tar+zstd), "
                             "and no zstd decoder is available; install zstd (apt-get install zstd) or use "
                             "Python 3.14+")
        proc = subprocess.Popen([decoder, "-dcq", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return proc.stdout, proc  # type: ignore[return-value]  # stdout=PIPE: a binary pipe, never None
    raise ImageError(f"unknown layer compression {compression!r}")


class _Hashing:
    """A read-only stream that hashes what is read through it (the layer's diff_id)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        """Read to the end (the tar's trailing blocks count too); the digest of all of it."""
        while self.read(1 << 20):
            pass
        return "sha256:" + self.hash.hexdigest()


def extract(path: str, compression: str, dest: str, rootless: bool = False) -> tuple[int, str]:
    """Unpack the layer at ``path`` into the empty directory ``dest``; (bytes written, the digest of
    the uncompressed tar: its diff_id). ``rootless``: for an overlay mounted with ``userxattr``.

    Raises Refused for an unsafe entry and ImageError for a broken archive; ``dest`` is then partly
    filled, and the caller removes it.
    """
    stream, decoder = open_stream(path, compression)
    hashing = _Hashing(stream)
    root = os.open(dest, _DIR_FLAGS)
    try:
        # (call-overload: _Hashing has the read() a stream needs, not all of a file object)
        with tarfile.open(fileobj=hashing, mode="r|") as archive:  # type: ignore[call-overload]
            written = _Unpacker(root, archive, rootless).run()
        return written, hashing.drain()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"the layer is not a valid tar archive ({exc})") from None
    finally:
        os.close(root)
        stream.close()
        if decoder is not None:
            decoder.kill()
            decoder.wait()


def split(name: str) -> list[str]:
    """The path components of a tar entry name, inside the layer; Refused for '..'."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refused(f"layer entry {name!r} has a '..' component; refusing the layer")
    if any("\0" in p for p in parts):
        raise Refused(f"layer entry {name!r} has a NUL byte; refusing the layer")
    return parts


class _Unpacker:
    def __init__(self, root: int, archive: tarfile.TarFile, rootless: bool = False) -> None:
        self.root = root
        self.opaque_xattr = USER_OPAQUE_XATTR if rootless else OPAQUE_XATTR
        self.archive = archive
        self.files: set[tuple[str, ...]] = set()  # regular files this layer wrote (hard link targets)
        self.written = 0
        self.as_root = os.geteuid() == 0
        self.skipped_devices = 0

    def run(self) -> int:
        for count, member in enumerate(self.archive, 1):
            if count > MAX_ENTRIES:
                raise Refused(f"the layer has more than {MAX_ENTRIES} entries; refusing it")
            self.entry(member)
        return self.written

    def parent(self, parts: list[str], name: str) -> int:
        """A descriptor of the directory holding ``parts[-1]``, creating missing directories (0755)."""
        fd = os.dup(self.root)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise Refused(f"layer entry {name!r} goes through {part!r}, which is a symlink or not a "
                                      f"directory; refusing the layer") from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def entry(self, member: tarfile.TarInfo) -> None:
        parts = split(member.name)
        if not parts:
            return  # the layer's root itself
        leaf = parts[-1]
        if member.ischr() or member.isblk():
            self.skipped_devices += 1
            return
        fd = self.parent(parts, member.name)
        try:
            if leaf == OPAQUE:
                self.opaque(fd, member.name)
            elif leaf.startswith(WHITEOUT):
                self.whiteout(fd, leaf[len(WHITEOUT):], parts, member.name)
            else:
                self.place(fd, leaf, parts, member)
        finally:
            os.close(fd)

    def clear(self, fd: int, leaf: str, parts: list[str], keep_dir: bool) -> bool:
        """Remove what ``leaf`` names (unless it is a directory and ``keep_dir``); True if a dir is kept."""
        try:
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(leaf, dir_fd=fd)
            prefix = tuple(parts)
            self.files = {f for f in self.files if f[:len(prefix)] != prefix}
        else:
            os.unlink(leaf, dir_fd=fd)
            self.files.discard(tuple(parts))
        return False

    def opaque(self, fd: int, name: str) -> None:
        try:
            os.setxattr(fd, self.opaque_xattr, b"y")
        except OSError as exc:
            raise ImageError(f"cannot mark {name!r} opaque ({exc}): the layer store's file system must keep "
                             f"{self.opaque_xattr} xattrs; put the store (SANDPOOL_IMAGE_DIR) on ext4, xfs or "
                             f"btrfs") from None

    def whiteout(self, fd: int, target: str, parts: list[str], name: str) -> None:
        if not target or target in (".", ".."):
            raise Refused(f"layer entry {name!r} is a whiteout of nothing; refusing the layer")
        self.clear(fd, target, [*parts[:-1], target], keep_dir=False)
        try:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
        except OSError as exc:
            raise ImageError(f"cannot write the whiteout {name!r} ({exc}); overlayfs whiteouts (0/0 character "
                             f"devices) need Linux 5.8 or later without root, and a store not mounted nodev") from None

    def place(self, fd: int, leaf: str, parts: list[str], member: tarfile.TarInfo) -> None:
        mode = member.mode & 0o1777  # setuid and setgid dropped (see the module doc)
        kept_dir = self.clear(fd, leaf, parts, keep_dir=member.isdir())
        if member.isdir():
            if not kept_dir:
                os.mkdir(leaf, 0o700, dir_fd=fd)
            node = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
            try:
                self.own(node, member, mode)
            finally:
                os.close(node)
        elif member.isreg():
            self.regular(fd, leaf, parts, member, mode)
        elif member.issym():
            os.symlink(member.linkname, leaf, dir_fd=fd)
            if self.as_root:
                _chown(lambda uid, gid: os.chown(leaf, uid, gid, dir_fd=fd, follow_symlinks=False), member)
        elif member.islnk():
            self.hardlink(fd, leaf, parts, member)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=fd)
            node = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                self.own(node, member, mode)
            finally:
                os.close(node)
        # anything else (GNU sparse/volume headers tarfile did not fold in) carries no file

    def regular(self, fd: int, leaf: str, parts: list[str], member: tarfile.TarInfo, mode: int) -> None:
        self.written += member.size
        if self.written > MAX_LAYER_BYTES:
            raise Refused(f"the layer unpacks to more than {MAX_LAYER_BYTES} bytes; refusing it "
                          f"(SANDPOOL_IMAGE_MAX_LAYER_BYTES raises the bound)")
        node = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            source = self.archive.extractfile(member)
            if source is not None:
                with os.fdopen(os.dup(node), "wb", buffering=0) as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            self.own(node, member, mode)
            os.utime(node, (member.mtime, member.mtime))
        finally:
            os.close(node)
        self.files.add(tuple(parts))

    def hardlink(self, fd: int, leaf: str, parts: list[str], member: tarfile.TarInfo) -> None:
        target = split(member.linkname)
        if tuple(target) not in self.files:
            raise Refused(f"layer entry {member.name!r} is a hard link to {member.linkname!r}, which is not a file "
                          f"of this layer; refusing the layer")
        source = self.parent(target, member.linkname)
        try:
            os.link(target[-1], leaf, src_dir_fd=source, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(source)
        self.files.add(tuple(parts))

    def own(self, node: int, member: tarfile.TarInfo, mode: int) -> None:
        if self.as_root:
            _chown(lambda uid, gid: os.fchown(node, uid, gid), member)
        os.fchmod(node, mode)


def _chown(change: Callable[[int, int], None], member: tarfile.TarInfo) -> None:
    """Give the entry its owner; in a user namespace that does not map it (EINVAL), keep ours."""
    try:
        change(member.uid, member.gid)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
