"""Raw Linux calls through ctypes: namespaces, mounts, pivot_root, capabilities, loopback.

Python 3.11 has no ``os.unshare``/``os.setns``; ctypes reaches glibc directly. Every call raises
OSError (with the call and its argument in the message) when the kernel refuses.
Stdlib only: the template imports this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import platform
import socket
import struct

from .. import linux as _linux

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}.get(platform.machine())
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    _libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    _libc.unshare.argtypes = [ctypes.c_int]
    _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    # Looked up here, in the template, once: a CDLL makes a function object on first lookup and
    # caches it in its __dict__, which would be one more object and a dict insert in every sandbox.
    _libc.prctl, _libc.capset, _libc.syscall  # noqa: B018
    AVAILABLE = True
except (OSError, AttributeError):  # not Linux/glibc: only the process level exists
    _libc = None
    AVAILABLE = False

try:  # (PyDLL: the call holds the GIL, as os.fork() does; CDLL would drop it around the fork)
    _fork = ctypes.PyDLL(None, use_errno=True).fork
    _fork.restype, _fork.argtypes = ctypes.c_int, []
except (OSError, AttributeError):
    _fork = None


def _check(result: int, what: str) -> None:
    if result != 0:
        _fail(what)


def _fail(what: str) -> None:
    """Raise OSError for the call ``what`` that just failed (its errno). Callers on the start path
    build ``what`` only after a failure: a sandbox makes ~40 such calls on every start."""
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def fork() -> int:
    """``os.fork()`` for the template, which runs one thread: the C library's fork, without
    CPython's work after it in the child. That work is for a process that had other threads
    (their locks, thread states, the GIL: none here), and it runs the hooks that ``threading``,
    ``random`` and ``logging`` register, which cost each child ~220 copied pages of the template's
    memory (~0.9 MiB of its private memory) and ~0.6 ms of CPU. Nothing of theirs matters in an
    agent: it has no other thread to forget, does not use ``random`` (the call worker it forks with
    ``os.fork()`` gets all three hooks) and does not log. The other step skipped, dropping signals
    the template caught but had not handled yet, is the template's to guard against (see
    ``Template._shutdown_and_exit``). Where this process has another thread, plain ``os.fork()``."""
    if _fork is None or _threads() != 1:
        return os.fork()
    pid = _fork()
    if pid < 0:
        _fail("fork")
    return pid


def _threads() -> int:
    """How many threads this process has (field 20 of /proc/self/stat)."""
    return int(_linux.own_stat()[17])


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``CLONE_NEW*`` flags)."""
    if _libc.unshare(flags):
        _fail(f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace open at ``fd`` (for pid: the namespace of children forked later)."""
    if _libc.setns(fd, nstype):
        _fail(f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)):
        _fail(f"mount {fstype or source} on {target}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    if _libc.umount2(_b(target), flags):
        _fail(f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(38, f"pivot_root: unsupported machine {platform.machine()}")
    if _libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)):
        _fail(f"pivot_root({new_root})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def set_name(name: str) -> None:
    """The process's name (``comm``, 15 bytes), as ps shows it."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def no_new_privs() -> None:
    """execve never grants privileges again (setuid bits and file capabilities are ignored)."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


#: The kernel's highest capability number, read once where this module is imported (the template),
#: not in every sandbox it forks.
LAST_CAPABILITY = last_capability()


def limit_capabilities(keep: set[int]) -> None:
    """Drop every capability not in ``keep``: from the bounding set (so exec'd programs, even as
    root, cannot regain them) and from this process's effective, permitted and inheritable sets."""
    for cap in range(LAST_CAPABILITY + 1):
        if cap not in keep and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            _fail(f"prctl(CAPBSET_DROP, {cap})")
    mask = sum(1 << cap for cap in keep)
    header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    low, high = mask & 0xFFFFFFFF, mask >> 32
    data = struct.pack("=6I", low, low, 0, high, high, 0)  # effective, permitted, inheritable x 2
    _check(_libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)), "capset")


#: ``struct ifreq`` with a name and flags (compiled here, in the template, not in each sandbox).
_IFREQ_FLAGS = struct.Struct("16sH22x")


def loopback_up() -> None:
    """Bring ``lo`` up in this network namespace (a fresh one starts with it down)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(b"lo", 0)))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


#: Compiled filters as the kernel takes them: program -> (its buffer, the sock_fprog naming it).
_PREPARED: dict[bytes, tuple[ctypes.Array[ctypes.c_char], _SockFprog]] = {}


def prepare_filter(program: bytes) -> None:
    """Build the buffer and ``sock_fprog`` of ``program`` once, in the template: made in each agent,
    they were a new ctypes array type and its objects, ~20 pages of the template's memory copied."""
    if program not in _PREPARED:
        buf = ctypes.create_string_buffer(program, len(program))
        _PREPARED[program] = (buf, _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p)))


def seccomp_filter(program: bytes) -> None:
    """Load a compiled seccomp filter (classic BPF, 8 bytes per instruction) on this thread; every
    process it forks or execs afterwards inherits it. Needs no_new_privs (or CAP_SYS_ADMIN)."""
    prepare_filter(program)
    prog = _PREPARED[program][1]
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(SET_SECCOMP)")
