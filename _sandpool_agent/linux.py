"""Small Linux process helpers for the template and the agent (stdlib only, imported before fork).

Everything degrades to a no-op where the kernel feature is missing, so the ``process`` level still
works on other Unixes; leak-proofing then rests on the owner socket's EOF alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import select
import signal
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: Above any descriptor a process can have (the kernel's hard ceiling on RLIMIT_NOFILE is 2**30).
MAX_FD = 1 << 30

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not glibc/Linux
    _prctl = None


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread dies."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process, so it can always find and kill them."""
    if _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def close_all_but(*keep: int) -> None:
    """Close every file descriptor above stderr except those in ``keep``, whatever this process
    inherited: one ``close_range`` call per gap between them."""
    low = 3
    for fd in sorted(fd for fd in set(keep) if fd >= low):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (needs /proc/PID/task/*/children; empty when unavailable)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            found.extend(int(c) for c in read_small(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:
            continue
    return found


def own_stat() -> list[bytes]:
    """The fields of /proc/self/stat from the third (state) on: field N is item N - 3."""
    data = read_small("/proc/self/stat")
    return data[data.rindex(b")") + 2:].split()


def read_small(path: str) -> bytes:
    """The whole of a small /proc or cgroup file: an os.open and reads (a few syscalls, where
    ``open()`` makes eight), for the paths the template and the agent take for every sandbox."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return out


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def killpg_quietly(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group ``pgid``, ignoring one that is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_descendants(pid: int, sig: int = signal.SIGKILL, rounds: int = 5, reap: bool = True) -> int:
    """Kill every descendant of ``pid`` (repeating, since a dying tree may still fork); return how many.

    ``reap`` also collects this process's own exited children; callers that must report each
    child's exit themselves pass False.
    """
    total = 0
    for _ in range(rounds):
        pids = descendants(pid)
        if not pids:
            break
        for child in pids:
            kill_quietly(child, sig)
        total += len(pids)
        if reap:
            reap_all()
        else:
            time.sleep(0.001)
    return total


def wait_for_exit(procs: list[tuple[int, int | None]], timeout: float) -> None:
    """Block until one of ``procs`` (pid, its pidfd or None) has exited (not reaped: its pidfd turns
    readable) or ``timeout`` seconds pass, whichever comes first. A pidfd given is used (and left
    open); one is opened (and closed) for each pid without; without pidfds at all (before Linux
    5.3), a short sleep instead."""
    fds: list[int] = []
    opened: list[int] = []
    try:
        for pid, pidfd in procs:
            if pidfd is not None:
                fds.append(pidfd)
                continue
            try:
                opened.append(os.pidfd_open(pid))
            except ProcessLookupError:  # reaped already (not by the caller): nothing to wait for
                pass
        fds += opened
        if not fds:
            raise OSError("no process left to wait for")
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll(max(0.0, timeout) * 1000)
    except (OSError, AttributeError):  # no pidfd_open here, or none of them to watch
        time.sleep(min(0.01, max(0.0, timeout)))
    finally:
        for fd in opened:
            os.close(fd)


def reap(pid: int) -> int | None:
    """The wait status of child ``pid`` if it has exited (0 if it was already reaped), else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    return None if done == 0 else status


def reap_all() -> list[tuple[int, int]]:
    """Reap every exited child without blocking; return (pid, wait status) pairs."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def exit_code(status: int) -> tuple[int, int | None]:
    """(exit code, signal) from a wait status; a signal death is reported as 128+N, as shells do."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.waitstatus_to_exitcode(status), None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


_first_soft_nofile: int | None = None


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (where allowed; else leave it) and
    return the soft limit it had before the first call, for children that should get it back."""
    global _first_soft_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _first_soft_nofile is None:
        _first_soft_nofile = soft
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return _first_soft_nofile
