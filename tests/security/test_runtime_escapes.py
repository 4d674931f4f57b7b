"""The escape classes of runc's CVEs, tried from inside a sandbox: overwriting the host binary that
runs the agent through ``/proc/<pid>/exe`` (CVE-2019-5736), and descriptors or working directories
that lead outside the sandbox's root (CVE-2024-21626). Each test also checks that the sandbox and a
fresh one keep working."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

#: Run inside the sandbox: every descriptor and working directory of every process it can see,
#: with what it points at, and whether that is the same file as the path it names inside the root.
SURVEY = r"""
import json, os, stat
out = []
for pid in (p for p in os.listdir("/proc") if p.isdigit()):
    links = [("cwd", f"/proc/{pid}/cwd"), ("root", f"/proc/{pid}/root")]
    try:
        links += [(f"fd{n}", f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        continue
    for name, link in links:
        try:
            target, real = os.readlink(link), os.stat(link)
        except OSError:
            continue
        if not target.startswith("/") or not stat.S_ISDIR(real.st_mode) and not stat.S_ISREG(real.st_mode):
            continue  # pipes, sockets, anon inodes, devices: nothing to walk out through
        try:
            here = os.stat(target)
            same = (here.st_dev, here.st_ino) == (real.st_dev, real.st_ino)
        except OSError:
            same = False
        out.append([pid, name, target, same])
print(json.dumps(out))
"""


def _sh(sb, script: str):
    return sb.exec(["sh", "-c", script]).result()


def _still_works(session, sb) -> None:
    assert _sh(sb, "echo alive").stdout == "alive\n"
    assert _sh(session.sandbox(), "echo alive").stdout == "alive\n"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_host_binary_behind_proc_exe_cannot_be_overwritten(contained):
    """The agent and every process run the host's interpreter (bound read-only): opening it for
    writing through /proc/1/exe or /proc/self/exe fails, and the host's file is unchanged."""
    real = os.path.realpath(sys.executable)
    before = _digest(real)
    sb = contained.sandbox()
    attack = ("import os, sys\n"
              "for path in ('/proc/1/exe', '/proc/self/exe'):\n"
              "    try:\n"
              "        fd = os.open(path, os.O_WRONLY)\n"
              "    except OSError as exc:\n"
              "        print(path, 'refused', exc.errno)\n"
              "    else:\n"
              "        os.write(fd, b'#!/bin/sh\\necho pwned\\n'); print(path, 'WRITTEN')\n")
    result = sb.exec([sys.executable, "-c", attack]).result()
    assert result.returncode == 0, result.stderr
    assert "WRITTEN" not in result.stdout and result.stdout.count("refused") == 2, result.stdout
    assert _digest(real) == before
    _still_works(contained, sb)


def test_no_descriptor_or_working_directory_leads_outside_the_root(contained):
    """Every file and directory that any process of the sandbox (the agent, a command, a remote
    function's worker) holds open or works in is the file of that name inside the sandbox: none is
    a host directory the process could climb out through."""
    sb = contained.sandbox()

    @contained.function()
    def worker_holds_nothing():
        return sorted(os.listdir("/proc/self/fd"))

    worker_holds_nothing.remote().result()  # a call worker is running while the survey looks
    result = sb.exec([sys.executable, "-c", SURVEY]).result()
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert any(name == "cwd" and pid == "1" for pid, name, _, _ in entries)  # the agent was surveyed
    outside = [entry for entry in entries if not entry[3]]
    assert outside == []
    climbed = _sh(sb, "for p in /proc/[0-9]*; do for fd in $p/fd/* $p/cwd; do "
                      "[ -d \"$fd\" ] && (cd \"$fd/../../../..\" && ls -a); done; done | sort -u")
    assert climbed.stdout == _sh(sb, "ls -a / | sort -u").stdout  # every climb ends at the sandbox's own root
    _still_works(contained, sb)


#: Run inside the sandbox: for every process handle (pidfd) any process it can see holds, the pid
#: it names as seen from here (0: a process outside this sandbox's pid namespace).
#: The start of a script run inside the sandbox: for each descriptor ``n`` of each process ``pid``
#: it can see (but ``skip``, a pid) what follows, with ``out`` a list printed as JSON at the end.
EVERY_DESCRIPTOR = r"""
import json, os
out = []
for pid in (p for p in os.listdir("/proc") if p.isdigit() and p != skip):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for n in fds:
"""
PIDFD_SURVEY = "skip = None" + EVERY_DESCRIPTOR + r"""
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}") != "anon_inode:[pidfd]":
                continue
            with open(f"/proc/{pid}/fdinfo/{n}") as f:
                named = [int(line.split()[1]) for line in f if line.startswith("Pid:")]
        except OSError:
            continue
        out.append([pid, n, named[0] if named else None])
print(json.dumps(out))
"""


def test_no_process_holds_a_handle_on_a_process_outside_the_sandbox(contained):
    """The template watches every agent's exit through a pidfd; none of those reaches the agents
    forked after it (a handle on another sandbox's agent could signal it): every pidfd any process
    of a sandbox holds, started while others run, names one of its own processes."""
    others = [contained.sandbox() for _ in range(2)]
    for other in others:
        assert _sh(other, "echo up").stdout == "up\n"
    sb = contained.sandbox()
    running = sb.exec(["sleep", "30"])  # the agent holds a pidfd of its own on this one
    result = sb.exec([sys.executable, "-c", PIDFD_SURVEY]).result()
    assert result.returncode == 0, result.stderr
    handles = json.loads(result.stdout)
    assert any(pid == "1" for pid, _, _ in handles)  # the agent was surveyed, and holds its own
    assert [h for h in handles if not h[2] or h[2] < 0] == []  # none names a process outside
    running.kill()
    for other in others:
        _still_works(contained, other)


#: Run inside the sandbox: open every descriptor of every other process it can see for writing, and
#: write a byte to it (into a template's wake-up pipe, that would wake the template's loop for
#: nothing, as often as the sandbox likes). What was reached, as [pid, fd, target, written].
REOPEN_ATTACK = "import os\nskip = str(os.getpid())" + EVERY_DESCRIPTOR + r"""
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
            fd = os.open(f"/proc/{pid}/fd/{n}", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            written = os.write(fd, b"\n") == 1
        except OSError:
            written = False
        os.close(fd)
        out.append([pid, n, target, written])
print(json.dumps(out))
"""


def _kcmp_same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Whether descriptor ``fd1`` of ``pid1`` and ``fd2`` of ``pid2`` are one open file (kcmp(2))."""
    import ctypes

    number = {"x86_64": 312, "aarch64": 272}[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    found = libc.syscall(number, pid1, pid2, 0, fd1, fd2)  # KCMP_FILE
    assert found >= 0, os.strerror(ctypes.get_errno())
    return found == 0


def _fds(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]


def test_no_process_of_the_sandbox_holds_a_descriptor_of_the_template(contained):
    """The agent is a child of the template (forked, never exec'd), and the template holds a handle
    on every sandbox (agents' pidfds, OOM watches, storage) and its own selector and SIGCHLD wake-up
    pipe. None of that may stay with a sandbox: a command re-opening the agent's descriptors through
    /proc and writing into each reaches only the sandbox's own files; afterwards no process of the
    sandbox holds one open file with the template but its stderr (which the client reads, bounded)."""
    import psutil

    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("kcmp's syscall number is known here for x86_64 and aarch64 only")
    others = [contained.sandbox() for _ in range(2)]
    for other in others:
        assert _sh(other, "echo up").stdout == "up\n"
    sb = contained.sandbox()
    result = sb.exec([sys.executable, "-c", REOPEN_ATTACK]).result()
    assert result.returncode == 0, result.stderr
    reached = json.loads(result.stdout)
    assert any(pid == "1" and written for pid, _, _, written in reached)  # the agent's own were reached
    agent = psutil.Process(sb._record.agent_pid)
    templates = [p for p in psutil.Process().children() if "_sandpool_agent.template" in " ".join(p.cmdline())]
    template = next(p for p in templates if p.pid in {a.pid for a in agent.parents()})
    sandbox = [agent, *agent.children(recursive=True)]
    shared = [(p.pid, fd, os.readlink(f"/proc/{template.pid}/fd/{t}")) for p in sandbox for fd in _fds(p.pid)
              for t in _fds(template.pid) if _kcmp_same_file(p.pid, fd, template.pid, t)]
    stderr = os.readlink(f"/proc/{template.pid}/fd/2")
    assert [(pid, fd, target) for pid, fd, target in shared if target not in (stderr, os.devnull)] == []
    _still_works(contained, sb)
    for other in others:
        _still_works(contained, other)
