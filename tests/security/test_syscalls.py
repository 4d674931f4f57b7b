"""Attacks through system calls from inside a sandbox (as its root) at the namespaces and oci levels:
each is refused by the syscall filter with EPERM (clone3: ENOSYS), the agent lives on, the sandbox
runs the next command, and a sandbox beside it is undisturbed.

Most attacks pick arguments for which the kernel itself would answer something else (success, EBADF,
EFAULT), so a missing filter fails the test rather than passing it by accident.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform

import pytest

from sandpool import SandboxFailedError, Session
from sandpool._isolation import probe
from _sandpool_agent.confine import seccomp

PYTHON = "/usr/bin/python3"  # the host image's own interpreter (stdlib ctypes is all the scripts use)
#: Run first in every attack script: ``sc(name, *args)`` makes the raw syscall and answers "OK" or
#: the errno's name. Numbers come from the test process (libseccomp's table for this machine).
PRELUDE = """
import ctypes, errno, json, os, sys
NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if result == 0 and name == "clone":  # a clone that got through: the child leaves at once
        os._exit(0)
    return "OK" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
"""


def numbers(*names: str) -> dict[str, int]:
    """Syscall numbers of this machine's native ABI, from libseccomp (absent names left out)."""
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    found = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in names}
    return {name: nr for name, nr in found.items() if nr >= 0}


@pytest.fixture
def session(contained):
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} is missing from the host image")
    return contained


def attack(sandbox, script: str, *names: str) -> list[str]:
    """Run ``script`` (after PRELUDE) in ``sandbox``; its printed lines."""
    result = sandbox.exec([PYTHON, "-I", "-S", "-c", PRELUDE + script, json.dumps(numbers(*names))]).result()
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def still_works(sandbox, neighbour=None) -> None:
    """The agent answers and runs the next command; so does the neighbour's."""
    for sb in (sandbox, neighbour) if neighbour else (sandbox,):
        assert sb.exec(["sh", "-c", "echo alive; cat /proc/1/comm"]).result().stdout.split()[0] == "alive"


def test_filter_is_loaded_in_every_process(session):
    """Exec'd commands (and their children) run under one seccomp filter (Seccomp: 2)."""
    sb = session.sandbox()
    out = sb.exec(["sh", "-c", "grep Seccomp: /proc/self/status; sh -c 'grep Seccomp: /proc/$$/status'"]).result()
    assert out.stdout.split() == ["Seccomp:", "2", "Seccomp:", "2"]
    assert "Seccomp:\t2" in sb.read_file("/proc/1/status").result().decode()  # the agent too


def test_every_denied_syscall_fails_with_eperm(session):
    """Each syscall of the deny list, called with zero arguments, fails with EPERM."""
    sb = session.sandbox()
    names = [n for n in seccomp.DENIED if n in numbers(*seccomp.DENIED)]
    out = attack(sb, "for n in sorted(NR): print(n + '=' + sc(n, 0, 0, 0, 0, 0, 0))", *names)
    assert len(out) == len(names) > 60
    assert [line for line in out if not line.endswith("=EPERM")] == []
    still_works(sb)


def test_host_keyring_is_out_of_reach(session):
    """add_key/keyctl on the user keyring (shared with the host's root) fail; no key reaches the host."""
    sb, neighbour = session.sandbox(), session.sandbox()
    desc = f"sandpool-attack-{os.getpid()}"
    script = (f"print(sc('add_key', b'user', b'{desc}', b'secret', 6, -4));"  # KEY_SPEC_USER_KEYRING
              "print(sc('keyctl', 0, -4, 0));"  # KEYCTL_GET_KEYRING_ID: works for anyone unfiltered
              "buf = ctypes.create_string_buffer(256); print(sc('keyctl', 6, -4, buf, 256))")  # DESCRIBE
    out = attack(sb, script, "add_key", "keyctl")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    keyctl = ctypes.c_long(numbers("keyctl")["keyctl"])
    found = libc.syscall(keyctl, ctypes.c_long(10), ctypes.c_long(-4), b"user", desc.encode(),
                         ctypes.c_long(0))  # KEYCTL_SEARCH, on the host
    if found >= 0:
        libc.syscall(keyctl, ctypes.c_long(9), ctypes.c_long(found), ctypes.c_long(-4))  # KEYCTL_UNLINK
    assert found == -1 and ctypes.get_errno() == errno.ENOKEY
    assert out == ["EPERM"] * 3
    still_works(sb, neighbour)


def test_unshare_of_a_user_namespace_fails(session):
    """`unshare -Ur` (full capabilities in a new user namespace) and a raw unshare both fail."""
    sb = session.sandbox()
    result = sb.exec(["sh", "-c", "unshare -Ur id -u; echo rc=$?"]).result()
    assert "rc=0" not in result.stdout and "not permitted" in result.stderr.lower()
    assert attack(sb, "print(sc('unshare', 0x10000000)); print(sc('unshare', 0))", "unshare") == ["EPERM"] * 2
    still_works(sb)


def test_clone_into_new_namespaces_fails_and_clone3_is_enosys(session):
    """clone with any CLONE_NEW* flag fails; clone3 says ENOSYS (libc falls back to clone); a plain
    fork and a threaded, posix_spawn'ing program still work."""
    sb = session.sandbox()
    flags = [0x10000000, 0x20000000, 0x40000000, 0x00020000, 0x02000000, 0x04000000, 0x08000000]
    script = ("for f in %r: print(sc('clone', f | 17, 0, 0, 0, 0))\n"  # | SIGCHLD
              "print(sc('clone3', 0, 0))\n"
              "import subprocess, threading\n"
              "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
              "pid = os.fork()\n"
              "if pid == 0: os._exit(7)\n"
              "print(subprocess.run(['true']).returncode, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
              % flags)
    out = attack(sb, script, "clone", "clone3")
    assert out == ["EPERM"] * len(flags) + ["ENOSYS", "0", "7"]
    still_works(sb)


def test_mount_and_setns_fail(session):
    """mount (also the new mount API) and setns into the agent's namespaces fail with EPERM."""
    sb = session.sandbox()
    script = ("print(sc('mount', b'none', b'/tmp', b'tmpfs', 0, 0))\n"
              "print(sc('fsopen', b'tmpfs', 0))\n"
              "fd = os.open('/proc/1/ns/mnt', os.O_RDONLY); print(sc('setns', fd, 0))\n"
              "print(sc('setns', -1, 0))\n")  # EBADF without the filter
    assert attack(sb, script, "mount", "fsopen", "setns") == ["EPERM"] * 4
    still_works(sb)


def test_ptrace_and_memory_of_the_agent_fail(session):
    """ptrace of the agent (PID 1, same uid and capabilities) and process_vm_readv of it fail."""
    sb, neighbour = session.sandbox(), session.sandbox()
    script = ("print(sc('ptrace', 0x4206, 1, 0, 0))\n"  # PTRACE_SEIZE: would not even stop it
              "sc('ptrace', 17, 1, 0, 0)\n"  # PTRACE_DETACH, in case it got through
              "buf = ctypes.create_string_buffer(8)\n"
              "class IoVec(ctypes.Structure): _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n"
              "local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 8); remote = IoVec(0x400000, 8)\n"
              "print(sc('process_vm_readv', 1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))\n"
              "print(sc('process_vm_readv', 1, 0, 0, 0, 0, 0))\n")  # reads nothing: OK without the filter
    assert attack(sb, script, "ptrace", "process_vm_readv") == ["EPERM"] * 3
    still_works(sb, neighbour)


def test_bpf_perf_userfaultfd_io_uring_kexec_fail(session):
    """bpf, perf_event_open, userfaultfd (user-mode, allowed to anyone unfiltered), io_uring_setup,
    kexec_load: EPERM, and the sandbox lives on."""
    sb = session.sandbox()
    script = ("print(sc('bpf', 0, 0, 0))\n"
              "print(sc('perf_event_open', 0, 0, -1, -1, 0))\n"  # EFAULT without the filter
              "print(sc('userfaultfd', 1))\n"  # UFFD_USER_MODE_ONLY
              "print(sc('io_uring_setup', 1, 0))\n"  # EFAULT without the filter
              "print(sc('kexec_load', 0, 0, 0, 0))\n")
    names = ("bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "kexec_load")
    assert attack(sb, script, *names) == ["EPERM"] * 5
    still_works(sb)


def test_tiocsti_cannot_push_input_into_a_terminal(session):
    """TIOCSTI on the caller's own controlling terminal (allowed unfiltered) and TIOCLINUX fail."""
    sb = session.sandbox()
    script = ("import pty\n"
              "master, slave = pty.openpty(); name = os.ttyname(slave); os.close(slave)\n"
              "r, w = os.pipe(); pid = os.fork()\n"
              "if pid == 0:\n"
              "    os.setsid(); fd = os.open(name, os.O_RDWR)\n"  # becomes the controlling terminal
              "    char = ctypes.byref(ctypes.c_char(b'x'))\n"
              "    out = [sc('ioctl', fd, req, char) for req in (0x5412, 0x100005412, 0x541C)]\n"  # the kernel
              "    os.write(w, ' '.join(out).encode()); os._exit(0)\n"  # ignores the high bits
              "os.close(w); print(os.read(r, 100).decode()); os.waitpid(pid, 0)\n")
    assert attack(sb, script, "ioctl") == ["EPERM"] * 3
    still_works(sb)


def test_personality_is_restricted_as_docker_does(session):
    """Turning off address randomisation fails; PER_LINUX and the query still work."""
    sb = session.sandbox()
    script = ("print(sc('personality', 0x0040000)); print(sc('personality', 0x0400000))\n"
              "print(sc('personality', 0xFFFFFFFF)); print(sc('personality', 0))\n")
    assert attack(sb, script, "personality") == ["EPERM", "EPERM", "OK", "OK"]
    still_works(sb)


def test_oci_bundle_carries_the_same_rules():
    """The oci level's linux.seccomp section denies what the namespaces filter denies."""
    section = seccomp.oci_section()
    plain = {name for rule in section["syscalls"] if "args" not in rule for name in rule["names"]}
    assert set(seccomp.DENIED) | {"clone3"} == plain
    assert section["defaultAction"] == "SCMP_ACT_ALLOW"
    assert {rule["names"][0] for rule in section["syscalls"] if "args" in rule} == {"clone", "ioctl", "socket",
                                                                                    "personality"}


def test_without_libseccomp_the_levels_refuse_to_start(monkeypatch):
    """No libseccomp: namespaces and oci are unavailable, saying why (never run unfiltered), and
    'auto' picks the process level."""
    if probe.unavailable("namespaces"):
        pytest.skip(f"namespaces level unavailable anyway: {probe.unavailable('namespaces')}")
    monkeypatch.setattr(seccomp, "_library", lambda: None)
    probe.unavailable.cache_clear()
    try:
        assert probe.best() == "process"
        with Session() as session:
            sb = session.sandbox(isolation="namespaces")
            with pytest.raises(SandboxFailedError, match=r"libseccomp is not installed .*never run unfiltered"):
                sb.wait()
            with pytest.raises(OSError, match="libseccomp"):
                seccomp.program.__wrapped__()
    finally:
        probe.unavailable.cache_clear()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the 32-bit entry points of x86_64")
def test_32_bit_and_x32_entry_points_are_filtered_too(session):
    """unshare(CLONE_NEWUSER) through `int 0x80` (the i386 table, where it is number 310) and through
    the x32 table fails too: a filter that checked only the 64-bit numbers would let both through.
    (ENOSYS where the kernel lacks that ABI.)"""
    sb = session.sandbox()
    script = ("import mmap\n"
              "code = bytes.fromhex('b836010000' 'bb00000010' 'cd80' 'c3')\n"  # mov eax,310; mov ebx,flag; int 0x80
              "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
              "page.write(code)\n"
              "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
              "result = ctypes.CFUNCTYPE(ctypes.c_int)(address)()\n"
              "print('OK' if result >= 0 else errno.errorcode[-result])\n"
              "NR['x32'] = NR['unshare'] | 0x40000000\n"
              "print(sc('x32', 0x10000000))\n")
    out = attack(sb, script, "unshare")
    assert out[0] in ("EPERM", "ENOSYS") and out[1] in ("EPERM", "ENOSYS"), out
    still_works(sb)
