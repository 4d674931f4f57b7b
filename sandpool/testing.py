"""Testing aids: find what local sandboxes left behind (processes, directories, mounts, cgroups).

``leftovers(state_dir)`` inspects the machine, not sandpool's bookkeeping: a process counts as a
sandbox process when its command line names the state directory (agents inherit their template's
command line) or its environment carries ``SANDPOOL_ROOT`` under it (exec'd commands and their
children), or it is a member of one of the state directory's sandbox cgroups (the namespaces level,
whose processes see only their own root). Live templates (and their spare children) are not
leftovers; their owner directories hold no sandbox directory. Sandbox cgroups and network namespaces of the state directory are
leftovers too.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from ._agent import _linux
from ._isolation import cgroups as _cgroups
from ._isolation import network as _network
from ._isolation.sandbox import SPARE_NAME
from ._runtime._statedir import mounts_under, processes_mentioning
from ._runtime._fake import FakeCall, FakeCommand, FakeExec, FakeRuntime, FakeSandbox  # noqa: F401  (public)


@dataclass
class Leftovers:
    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, command line)
    directories: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.directories or self.mounts or self.cgroups or self.netns)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _live_templates(state_dir: str) -> dict[int, str]:
    """pid -> owner dir of every template that still runs."""
    found = {}
    for name in os.listdir(state_dir) if os.path.isdir(state_dir) else ():
        owner = os.path.join(state_dir, name)
        text = _read(os.path.join(owner, "template")).split()
        if len(text) == 2 and _linux.process_start_time(int(text[0])) == text[1].decode():
            found[int(text[0])] = owner
    return found


def _is_spare_of(pid: int, templates: dict[int, str]) -> bool:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    comm, _, rest = stat.partition(" (")[2].rpartition(") ")
    fields = rest.split()
    return comm == SPARE_NAME and bool(fields) and int(fields[1]) in templates


def leftovers(state_dir: str) -> Leftovers:
    """Everything of sandboxes under ``state_dir`` that still exists (templates excepted)."""
    report = Leftovers()
    templates = _live_templates(state_dir)
    for pid in processes_mentioning(state_dir):
        if pid in templates or b") Z " in _read(f"/proc/{pid}/stat"):  # a template, or a zombie
            continue
        if _is_spare_of(pid, templates):  # a live template's spare child: part of the template
            continue
        cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        report.processes.append((pid, cmdline[:200]))
    if os.path.isdir(state_dir):
        for name in os.listdir(state_dir):
            owner = os.path.join(state_dir, name)
            if owner not in templates.values():
                report.directories.append(owner)
                continue
            report.directories.extend(os.path.join(owner, d) for d in os.listdir(owner) if d.startswith("sb-"))
        report.mounts = mounts_under(state_dir)
    live_owners = {os.path.basename(owner) for owner in templates.values()}
    report.cgroups = [path for path in _cgroups.leftovers(state_dir)  # a live template's spares' are not
                      if not (os.path.basename(path).startswith("spare-")
                              and os.path.basename(os.path.dirname(path)) in live_owners)]
    known = {pid for pid, _ in report.processes}
    for pid in _cgroups.members({"dirs": report.cgroups}):
        if pid not in known and b") Z " not in _read(f"/proc/{pid}/stat"):
            cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
            report.processes.append((pid, cmdline[:200]))
    report.netns = _network.named_namespaces(state_dir)
    return report


def wait_for_no_leftovers(state_dir: str, timeout: float = 5.0) -> Leftovers:
    """Poll until nothing is left (returns an empty report) or ``timeout`` passes (returns what is)."""
    deadline = time.monotonic() + timeout
    while True:
        report = leftovers(state_dir)
        if not report or time.monotonic() >= deadline:
            return report
        time.sleep(0.05)


def kill_leftovers(report: Leftovers) -> None:
    """SIGKILL the processes of a report and remove its cgroups, so one leaking test does not break the next."""
    for pid, _ in report.processes:
        _linux.kill_quietly(pid, signal.SIGKILL)
    for path in report.cgroups:
        _cgroups.remove_tree(path)
