"""The syscall filter of the ``namespaces`` and ``oci`` levels: Docker's default denials, and more.

One table of rules (``RULES``) serves both levels. At the ``namespaces`` level the template compiles
it once with libseccomp (``program``, the classic BPF bytes) and every agent loads those bytes with
one ``prctl`` right after entering its namespaces and root (``_sys.seccomp_filter``), so the agent,
every command it execs and every call worker inherit it; nothing the agent does afterwards needs a
denied call. At the ``oci`` level the same rules become the bundle's ``linux.seccomp`` section
(``oci_section``), which crun compiles with the same library.

The filter allows by default and fails each denied call with EPERM (``clone3`` with ENOSYS, so libc
falls back to ``clone``, whose flags a classic BPF filter can read). It never kills: a sandbox whose
code tries a denied call sees an error, as it would under Docker. Denied, for a sandbox holding the
capabilities the levels keep (``namespaces.KEEP_CAPABILITIES``), is every call Docker's default
profile denies to such a container, and more (ptrace, ``process_vm_*``, io_uring, ``clock_adjtime``,
``name_to_handle_at``, TIOCSTI/TIOCLINUX). The rules also cover the 32-bit (x86) and x32 system call
tables, which a 64-bit process can still enter.

libseccomp (``libseccomp.so.2``) is loaded through ctypes only when a filter is compiled; without it
the levels refuse to start (``unavailable``) rather than run unfiltered.
Stdlib only: the template imports this module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform

#: Syscalls that always fail with EPERM. Grouped by what they would reach outside the sandbox.
DENIED = (
    # the kernel and the machine
    "acct", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module", "swapon", "swapoff", "syslog", "iopl", "ioperm",
    "vhangup", "nfsservctl", "_sysctl", "sysfs", "uselib", "ustat", "vm86", "vm86old", "lookup_dcookie",
    "quotactl", "quotactl_fd", "sethostname", "setdomainname",
    # clocks (one host clock for everyone)
    "settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
    # kernel keyrings are not namespaced: these read and write the host user's keys
    "add_key", "request_key", "keyctl",
    # new namespaces and mounts (a way around the mount plan and the dropped capabilities)
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes' memory and files (the agent shares the sandbox's pid namespace)
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "move_pages", "migrate_pages", "mbind", "set_mempolicy", "set_mempolicy_home_node", "get_mempolicy",
    # large kernel attack surfaces
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init", "open_by_handle_at", "name_to_handle_at",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # never implemented: ENOSYS anyway, but Docker's profile lists none of them either
    "afs_syscall", "getpmsg", "putpmsg", "security", "tuxcall", "vserver",
)
#: ``clone`` flags that make a namespace (Docker's mask 0x7E020000, bit by bit).
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
#: ioctl requests that push input into (or reconfigure) the terminal of someone outside the sandbox.
DENIED_IOCTLS = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX
#: ``personality`` values Docker allows: PER_LINUX, PER_LINUX32, UNAME26 (with either), and the query.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
AF_VSOCK = 40  # host/VM sockets: a way out of the network namespace

# libseccomp's comparison operator (the only one the rules use), actions and attributes
_MASKED_EQ = 7
_OPS = {_MASKED_EQ: "SCMP_CMP_MASKED_EQ"}
_ACT_ALLOW = 0x7FFF0000
_FLTATR_CTL_OPTIMIZE = 8
_LOW32 = 0xFFFFFFFF
#: Extra ABIs of the native architecture, which the filter must cover too (libseccomp arch names).
_SUB_ARCHES = {"x86_64": ("x86", "x32"), "aarch64": ("arm",)}.get(platform.machine(), ())
_OCI_ARCHES = {"x86_64": "SCMP_ARCH_X86_64", "x86": "SCMP_ARCH_X86", "x32": "SCMP_ARCH_X32",
               "aarch64": "SCMP_ARCH_AARCH64", "arm": "SCMP_ARCH_ARM"}


def _rules() -> list[tuple[str, int, tuple[int, int, int, int] | None]]:
    """(syscall name, errno, condition or None); a condition is (arg index, op, datum_a, datum_b),
    for MASKED_EQ (mask, value)."""
    rules: list[tuple[str, int, tuple[int, int, int, int] | None]] = [
        (name, errno.EPERM, None) for name in DENIED]
    rules.append(("clone3", errno.ENOSYS, None))
    # libseccomp takes one comparison per argument and rule, so "any of these bits" is one rule per bit
    rules += [("clone", errno.EPERM, (0, _MASKED_EQ, flag, flag)) for flag in CLONE_NAMESPACE_FLAGS]
    # the kernel reads only the low 32 bits of an ioctl request: compare those alone
    rules += [("ioctl", errno.EPERM, (1, _MASKED_EQ, _LOW32, request)) for request in DENIED_IOCTLS]
    rules.append(("socket", errno.EPERM, (0, _MASKED_EQ, _LOW32, AF_VSOCK)))
    rules += _personality_rules()
    return rules


def _personality_rules() -> list[tuple[str, int, tuple[int, int, int, int]]]:
    """Deny every ``personality`` value outside ``PERSONALITY_ALLOWED`` (low 32 bits, as the kernel
    reads it). Bit 31 is in no flag, so it tells the query (all ones) apart: a value with bit 31
    clear is denied when it has a bit other than PER_LINUX32 and UNAME26 set; a value with bit 31
    set is denied when any bit is clear."""
    top = 1 << 31
    allowed_bits = functools.reduce(int.__or__, (v for v in PERSONALITY_ALLOWED if not v & top))
    rules = [("personality", errno.EPERM, (0, _MASKED_EQ, (1 << b) | top, 1 << b))
             for b in range(31) if not (1 << b) & allowed_bits]
    rules += [("personality", errno.EPERM, (0, _MASKED_EQ, (1 << b) | top, top)) for b in range(31)]
    return rules


RULES = tuple(_rules())


# -- libseccomp ---------------------------------------------------------------------------------


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _load() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        pass
    name = ctypes.util.find_library("seccomp")  # a search (it runs ldconfig): only if the usual name fails
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = _load()
    if lib is None:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def unavailable() -> str | None:
    """Why no filter can be built here, or None when it can."""
    if _library() is None:
        return "libseccomp is not installed (apt-get install libseccomp2), and these levels never run unfiltered"
    return None


@functools.cache
def program() -> bytes:
    """The filter as classic BPF (``struct sock_filter`` array), compiled once per process.

    Raises OSError naming the step when libseccomp is missing or refuses a rule.
    """
    lib = _library()
    if lib is None:
        raise OSError(errno.ENOSYS, unavailable())
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        # a binary tree of syscall numbers, not a list: the kernel replays the filter for every
        # syscall number when it loads it (to cache the always-allowed ones), and calls that stay
        # uncached (clone, ioctl) walk fewer instructions
        lib.seccomp_attr_set(ctx, _FLTATR_CTL_OPTIMIZE, 2)  # libseccomp >= 2.5; a list before that
        for arch in _SUB_ARCHES:
            _check(lib.seccomp_arch_add(ctx, lib.seccomp_arch_resolve_name(arch.encode())), f"seccomp_arch_add({arch})")
        for name, err, cond in RULES:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number == -1:  # not a syscall of this libseccomp's tables (e.g. newer than it)
                continue
            args = (_ArgCmp * 1)(_ArgCmp(*cond)) if cond else None
            _check(lib.seccomp_rule_add_array(ctx, 0x00050000 | err, number, 1 if cond else 0, args),
                   f"seccomp rule for {name}")
        read, write = os.pipe()
        try:
            _check(lib.seccomp_export_bpf(ctx, write), "seccomp_export_bpf")
            os.close(write)
            write = -1
            chunks = []
            while chunk := os.read(read, 65536):
                chunks.append(chunk)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
    finally:
        lib.seccomp_release(ctx)
    return b"".join(chunks)


def _check(result: int, what: str) -> None:
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")


def oci_section() -> dict:
    """The rules as an OCI runtime spec ``linux.seccomp`` object (crun compiles it with libseccomp)."""
    grouped: dict[int, list[str]] = {}
    syscalls = []
    for name, err, cond in RULES:
        if cond is None:
            grouped.setdefault(err, []).append(name)
        else:
            index, op, datum_a, datum_b = cond
            arg = {"index": index, "value": datum_a, "valueTwo": datum_b, "op": _OPS[op]}
            syscalls.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": err, "args": [arg]})
    plain = [{"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": err} for err, names in grouped.items()]
    native = platform.machine()
    arches = [_OCI_ARCHES[a] for a in (native, *_SUB_ARCHES) if a in _OCI_ARCHES]
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": plain + syscalls}
