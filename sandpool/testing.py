"""Testing aids: find what local sandboxes left behind (processes, templates, directories, mounts,
cgroups, network namespaces and links).

``leftovers(state_dir, *more)`` inspects the machine, not sandpool's bookkeeping. ``state_dir`` is a
state directory; each of ``more`` is a directory that may hold state directories up to two levels
down (a test's ``tmp_path``). What it reports:

- processes: every process in the tree below a template or an agent of those state directories
  (children, grandchildren, and descendants that daemonised: templates and agents are child
  subreapers, so those are re-parented to them, ``env -i setsid`` or not); every member of their
  cgroups (the namespaces level); every process whose command line names one of the directories
  (an agent whose template died) or whose environment's ``SANDPOOL_ROOT`` lies under one (an
  exec'd command whose agent died);
- templates: live templates nobody keeps, that is a runtime left open. A template is kept when its
  owner directory is in ``keep_owners`` (by default ``shared_owner_dirs()``: the runtime this
  process's sync sessions share until it exits) or its parent's pid is in ``keep_parents`` (a
  server that several tests share). A kept template's spare children and spare cgroups are part of
  it; its sandboxes are not;
- directories: sandbox directories, and owner directories without a live template;
- cgroups: under every hierarchy's ``sandpool/<state key>/``, each owner group whose template is not
  kept (live or not), the sandbox groups of kept ones, and a state key's group with no owner left;
- mounts: host mounts at or below one of the directories, or whose options name a path below one
  (an overlay's upper directory);
- netns and links: named network namespaces (``/run/netns``) and host network links whose alias
  starts with ``sandpool-<state key>`` (the naming ``_isolation.network`` reserves: a bridge
  sandbox's veth);
- nft: chains of sandpool's nftables table (``_isolation.nft``) whose tag starts with a state key,
  i.e. a bridge sandbox's rules.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from _sandpool_agent import linux as _linux
from _sandpool_agent.confine import cgroups as _cgroups
from ._isolation import network as _network
from ._isolation import nft as _nft
from _sandpool_agent.confine.supervisor import SPARE_NAME
from ._runtime import statedir as _statedir

_NET_DIR = "/sys/class/net"
_CHUNK = 1 << 16
from ._runtime.fake.runtime import FakeCall, FakeCommand, FakeExec, FakeRuntime, FakeSandbox

__all__ = ["FakeCall", "FakeCommand", "FakeExec", "FakeRuntime", "FakeSandbox", "Leftovers", "close_shared_runtime",
           "kill_leftovers", "leftovers", "shared_owner_dirs", "wait_for_no_leftovers"]


@dataclass
class Leftovers:
    processes: list[tuple[int, str]] = field(default_factory=list)  # (pid, command line)
    templates: list[tuple[int, str]] = field(default_factory=list)  # (pid, owner dir) of runtimes left open
    directories: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    nft: list[str] = field(default_factory=list)  # chains of sandpool's nft table

    def __bool__(self) -> bool:
        return any((self.processes, self.templates, self.directories, self.mounts, self.cgroups, self.netns,
                    self.links, self.nft))


def _read(path: str) -> bytes:
    """The whole file (b"" when it cannot be read), with os-level calls: on /proc, twice as fast as open()."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        data = chunk = os.read(fd, _CHUNK)
        while len(chunk) == _CHUNK:  # rare: a long command line or environment
            chunk = os.read(fd, _CHUNK)
            data += chunk
        return data
    except OSError:
        return b""
    finally:
        os.close(fd)


def _stat(pid: int) -> tuple[str, str, int, str] | None:
    """(comm, state, parent pid, start time) of a process, None when it is gone."""
    text = _read(f"/proc/{pid}/stat").decode(errors="replace")
    comm, _, rest = text.partition(" (")[2].rpartition(") ")
    fields = rest.split()
    return (comm, fields[0], int(fields[1]), fields[19]) if len(fields) > 19 else None


def _cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")[:200]


def _state_dirs(state_dir: str, more: Iterable[str]) -> list[str]:
    """``state_dir`` and every directory up to two levels below each of ``more``."""
    found = [state_dir]
    level = [d for d in more if os.path.isdir(d)]
    for _depth in range(3):
        found += level
        below = []
        for d in level:
            try:
                below += [e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        level = below
    return found


def _mentioning(dirs: list[str]) -> set[int]:
    """Pids whose command line names a path below one of ``dirs``, or whose ``SANDPOOL_ROOT`` does."""
    needles = [d.rstrip("/").encode() + b"/" for d in dirs]
    env_needles = [b"SANDPOOL_ROOT=" + n for n in needles]
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        cmdline = _read(f"/proc/{entry}/cmdline")
        if not cmdline:  # a kernel thread (or gone): no environment either
            continue
        if any(n in cmdline for n in needles):
            found.add(int(entry))
        else:
            environ = _read(f"/proc/{entry}/environ")
            if any(n in environ for n in env_needles):
                found.add(int(entry))
    return found


def _live_templates(state_dirs: list[str]) -> dict[int, str]:
    """pid -> owner dir of every template of ``state_dirs`` that still runs (a zombie does not)."""
    found = {}
    for state_dir in state_dirs:
        for owner in _owner_dirs(state_dir):
            text = _read(os.path.join(owner, "template")).split()
            if len(text) != 2 or not text[0].isdigit():
                continue
            stat = _stat(int(text[0]))
            if stat is not None and stat[3] == text[1].decode() and stat[1] != "Z":
                found[int(text[0])] = owner
    return found


def _owner_dirs(state_dir: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(state_dir) if e.name.startswith("o-") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _subdirs(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


@functools.cache
def _cgroup_mounts() -> tuple[str, ...]:
    return tuple(_cgroups.detect().mounts())  # cgroup mounts do not move while tests run


def _cgroup_leftovers(keys: set[str], kept_owners: set[str]) -> tuple[list[str], set[int]]:
    """(groups to report, pids of every member of any group of ``keys``) over every hierarchy."""
    report: list[str] = []
    members: set[int] = set()
    for mount in _cgroup_mounts():
        for key in keys:
            top = os.path.join(mount, _cgroups.ROOT_NAME, key)
            owners = _subdirs(top)
            if not owners and os.path.isdir(top):
                report.append(top)
            for owner in owners:
                if os.path.basename(owner) not in kept_owners:
                    report.append(owner)
                else:  # a v2 group keeps its spare's name when its sandbox adopts it: look inside
                    report += [g for g in _subdirs(owner) if not os.path.basename(g).startswith("spare-")
                               or any((_stat(int(p)) or (SPARE_NAME,))[0] != SPARE_NAME
                                      for p in _read(os.path.join(g, "cgroup.procs")).split())]
                for path, _subgroups, _files in os.walk(owner):
                    members.update(int(p) for p in _read(os.path.join(path, "cgroup.procs")).split())
    return report, members


def _mounts(dirs: list[str]) -> list[str]:
    """Mount points of the host's mount table that belong to ``dirs``: at or below one, bind mounts
    of a path below one (wherever they are mounted), or whose options name such a path (overlays)."""
    table = []  # (device, root inside its filesystem, mount point, the line)
    for line in _read("/proc/self/mountinfo").decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 5:
            table.append((fields[2], _unescape(fields[3]), _unescape(fields[4]), line))
    reals = [os.path.realpath(d) for d in dirs]
    inside = []  # (device, path inside its filesystem) of each directory
    for d in reals:
        holders = [(point, dev, root) for dev, root, point, _line in table
                   if point == "/" or d == point or d.startswith(point + "/")]
        if holders:
            point, dev, root = max(reversed(holders), key=lambda h: len(h[0]))  # the top mount there
            inside.append((dev, os.path.normpath(root + "/" + d[len(point):])))
    found = []
    for dev, root, point, line in table:
        if (any(point == d or point.startswith(d + "/") or (d + "/") in line for d in reals)
                or any(dev == idev and (root == ipath or root.startswith(ipath + "/")) for idev, ipath in inside)):
            found.append(point)
    return found


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are octal escapes there."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _links(keys: set[str]) -> list[str]:
    """Host network links whose alias names one of ``keys`` (a veth's host end)."""
    prefixes = tuple(_network.NETNS_PREFIX + key for key in keys)
    try:
        names = os.listdir(_NET_DIR)
    except OSError:
        return []
    return sorted(name for name in names
                  if _read(os.path.join(_NET_DIR, name, "ifalias")).decode(errors="replace").startswith(prefixes))


def leftovers(state_dir: str, *more: str, keep_owners: Collection[str] | None = None,
              keep_parents: Collection[int] = ()) -> Leftovers:
    """Everything of sandboxes under ``state_dir`` (and state dirs below ``more``) that still exists."""
    keep_owners = shared_owner_dirs() if keep_owners is None else keep_owners
    state_dirs = _state_dirs(state_dir, more)
    run_dirs = [state_dir, *more]
    report = Leftovers()
    templates = _live_templates(state_dirs)
    kept = {pid for pid, owner in templates.items()
            if owner in keep_owners or (_stat(pid) or ("", "", 0, ""))[2] in keep_parents}
    keys = {_cgroups.state_key(d) for d in state_dirs}
    report.cgroups, members = _cgroup_leftovers(keys, {os.path.basename(templates[pid]) for pid in kept})

    seen: set[int] = set()
    stack = [*templates, *_mentioning(run_dirs), *members]
    while stack:  # every descendant: agents, their commands, and what daemonised below a subreaper
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack += _linux.children(pid)
    for pid in sorted(seen - {os.getpid()}):
        stat = _stat(pid)
        if stat is None or stat[1] == "Z" or pid in kept:
            continue
        if pid in templates:
            report.templates.append((pid, templates[pid]))
        elif not (stat[0] == SPARE_NAME and stat[2] in templates):  # (a spare child is part of its template)
            report.processes.append((pid, _cmdline(pid)))

    for d in state_dirs:
        for owner in _owner_dirs(d):
            if owner not in templates.values():
                report.directories.append(owner)
            else:
                report.directories += [p for p in _subdirs(owner) if os.path.basename(p).startswith("sb-")]
    if os.path.isdir(state_dir):  # the state dir itself holds owner directories only
        report.directories += [e.path for e in os.scandir(state_dir) if not e.name.startswith("o-")]
    report.mounts = _mounts(run_dirs)
    report.netns = sorted({ns for d in state_dirs for ns in _network.named_namespaces(d)})
    report.links = _links(keys)
    chains = _nft.sandbox_chains()
    report.nft = [c for c in chains if any(c[2:].startswith(key + "-") for key in keys)]
    return report


def shared_owner_dirs() -> list[str]:
    """Owner directories of the runtimes open sync sessions share now (the last session to close
    closes them; the hidden session of ``Sandbox.run()`` holds one until exit). Checks keep them."""
    from ._session import background

    return background.owner_dirs()


def close_shared_runtime() -> None:
    """Close this process's hidden default sessions, as exit would; with the last open session, the
    shared runtime and background thread close too."""
    from ._session import default

    default.close_all()


def wait_for_no_leftovers(state_dir: str, *more: str, keep_owners: Collection[str] | None = None,
                          keep_parents: Collection[int] = (), timeout: float = 5.0) -> Leftovers:
    """Poll until nothing is left (returns an empty report) or ``timeout`` passes (returns what is)."""
    deadline = time.monotonic() + timeout
    while True:
        report = leftovers(state_dir, *more, keep_owners=keep_owners, keep_parents=keep_parents)
        if not report or time.monotonic() >= deadline:
            return report
        time.sleep(0.05)


def kill_leftovers(report: Leftovers) -> None:
    """SIGKILL the processes and templates of a report, remove its cgroups and its owner directories
    (never under a mount), so one leaking test does not break the next."""
    for pid, _ in report.templates + report.processes:
        _linux.kill_quietly(pid, signal.SIGKILL)
    for path in report.cgroups:
        _cgroups.remove_tree(path)
    for tag in sorted({chain[2:] for chain in report.nft}):
        _nft.remove_chains(tag)
    owners = [d for d in report.directories if os.path.basename(d).startswith("o-")]
    for owner in owners + [owner for _pid, owner in report.templates]:
        _statedir.remove_owner_dir(owner)
