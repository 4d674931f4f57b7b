"""Per-sandbox cgroups on v1, v2 and hybrid hosts: create with limits, join, count OOM kills, kill, remove.

Layout, in every hierarchy used: ``<mount>/sandpool/<state key>/<owner>/<sandbox id>``. The state key
names the state directory (so a test run finds its own cgroups), the owner is the runtime's owner
directory (so the sweep knows whose cgroups are stale). Limits go wherever the controller lives: the
v2 tree when it has the controller, else the v1 hierarchy. The v2 tree, when mounted, also holds
every sandbox for ``cgroup.kill``; without it, killing walks ``cgroup.procs``.

A group travels in the spawn config as a dict: ``dirs`` (one per hierarchy), ``kill`` (its v2
``cgroup.kill``), ``oom`` (the file counting OOM kills) and ``oom_event`` (v1: where to register an
OOM eventfd).
Stdlib only: the template joins, inspects and removes groups.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections.abc import Callable

from .. import linux as _linux

ROOT_NAME = "sandpool"
_V1_CONTROLLERS = ("memory", "cpu", "pids")
_CPU_PERIOD_US = 100_000


class Layout:
    """Where each controller lives on this host: ``mode`` is "v1", "v2", "hybrid" or "none"."""

    def __init__(self, v1: dict[str, str], v2: str | None, v2_controllers: set[str]) -> None:
        self.v1 = v1  # controller -> mount point
        self.v2 = v2
        self.v2_controllers = v2_controllers
        if v2 and v1:
            self.mode = "hybrid"
        else:
            self.mode = "v2" if v2 else "v1" if v1 else "none"

    def __repr__(self) -> str:
        return f"<cgroups {self.mode} v1={sorted(self.v1)} v2={self.v2} v2_controllers={sorted(self.v2_controllers)}>"

    def home(self, controller: str) -> str | None:
        """The mount point that enforces ``controller`` (v2 first), or None."""
        if self.v2 and controller in self.v2_controllers:
            return self.v2
        return self.v1.get(controller)

    def mounts(self) -> list[str]:
        """Every mount point a sandbox joins: the v2 tree and the v1 hierarchies of our controllers."""
        found = [self.v2] if self.v2 else []
        found += sorted({self.v1[c] for c in _V1_CONTROLLERS if c in self.v1 and self.home(c) == self.v1[c]})
        return found


def detect(mountinfo: str = "/proc/self/mountinfo") -> Layout:
    """Read the cgroup mounts of this process's mount namespace."""
    v1: dict[str, str] = {}
    v2 = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3:
            continue
        point = fields[4]
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = point
        elif rfields[0] == "cgroup":
            for option in rfields[2].split(","):
                if option in _V1_CONTROLLERS:
                    v1.setdefault(option, point)
    controllers: set[str] = set()
    if v2:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                controllers = set(f.read().split())
        except OSError:
            pass
    return Layout(v1, v2, controllers)


def state_key(state_dir: str) -> str:
    """A short stable name for a state directory (cgroup names must not contain '/')."""
    return "s" + hashlib.sha1(os.path.realpath(state_dir).encode()).hexdigest()[:12]


def owner_dirs(layout: Layout, key: str, owner: str) -> list[str]:
    return [os.path.join(mount, ROOT_NAME, key, owner) for mount in layout.mounts()]


def plan(layout: Layout, key: str, owner: str, sandbox_id: str, with_memory: bool = True) -> dict:
    """The group of one sandbox (nothing is created yet). ``with_memory=False`` (a sandbox without a
    memory limit) leaves out a v1 memory hierarchy of its own (``skips_memory``)."""
    skipped = skips_memory(layout) if not with_memory else None
    dirs = [os.path.join(d, sandbox_id) for d in owner_dirs(layout, key, owner)
            if skipped is None or not d.startswith(skipped + "/")]
    kill = os.path.join(layout.v2, ROOT_NAME, key, owner, sandbox_id, "cgroup.kill") if layout.v2 else None
    memory = layout.home("memory") if skipped is None else None
    oom = oom_event = None
    if memory:
        base = os.path.join(memory, ROOT_NAME, key, owner, sandbox_id)
        oom = os.path.join(base, "memory.events" if memory == layout.v2 else "memory.oom_control")
        if memory != layout.v2:
            oom_event = os.path.join(base, "cgroup.event_control")
    return {"dirs": dirs, "kill": kill, "oom": oom, "oom_event": oom_event, "layout": layout.mode}


def skips_memory(layout: Layout) -> str | None:
    """The v1 memory hierarchy's mount, which a sandbox without a memory limit does not join (None
    where memory lives in the v2 tree, or shares its v1 mount with a controller we use). Removing a
    v1 memory cgroup costs ~2 ms of kernel work (kworkers freeing its per-cpu state) and making one
    ~0.3 ms: at 1,000 sandboxes, seconds, for what only a limit needs. Such a sandbox's memory is
    then counted in its owner's memory cgroup, and a kill by the host's OOM killer is not told apart
    from another SIGKILL (``oom_kills`` has no group to count in)."""
    mount = layout.v1.get("memory")
    if mount is None or layout.home("memory") != mount:
        return None
    if any(layout.home(c) == mount for c in _V1_CONTROLLERS if c != "memory"):
        return None
    return mount


def limit_files(layout: Layout, group: dict, memory: int | None, cpu: float | None, pids: int | None) -> dict[str, str]:
    """File -> value for the limits (memory bytes, cpu cores, process count); None means unlimited."""

    def directory(controller: str) -> tuple[str | None, bool]:
        """The group's directory in the hierarchy enforcing ``controller``, and whether that is v2."""
        home = layout.home(controller)
        found = next((d for d in group["dirs"] if home and d.startswith(home + "/")), None)
        return found, home == layout.v2

    values: list[tuple[str | None, str, str]] = []  # (directory, file, value)
    if memory:
        # On OOM the whole sandbox dies, as Kubernetes does on v2: v2 kills the group itself; on v1
        # the kernel's killer is off and the template kills the group when the OOM eventfd fires.
        d, v2 = directory("memory")
        names = (("memory.max", "memory.swap.max", "memory.oom.group") if v2 else
                 ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.oom_control"))
        values += zip([d] * 3, names, (str(memory), "0" if v2 else str(memory), "1"))
    if cpu:
        d, v2 = directory("cpu")
        quota = max(1000, int(cpu * _CPU_PERIOD_US))
        values += [(d, "cpu.max", f"{quota} {_CPU_PERIOD_US}")] if v2 else [
            (d, "cpu.cfs_period_us", str(_CPU_PERIOD_US)), (d, "cpu.cfs_quota_us", str(quota))]
    if pids:
        values.append((directory("pids")[0], "pids.max", str(pids)))
    return {os.path.join(d, name): value for d, name, value in values if d}


#: v2 parent directories this process has delegated its controllers down to: each is walked and
#: written once, not at every start of a sandbox under it (~0.3 ms a start, in the client, when
#: the walk rewrote every level's cgroup.subtree_control).
_delegated: set[str] = set()


def create(layout: Layout, group: dict, limits: dict[str, str]) -> None:
    """Make the group's directories (parents too) and write its limits. OSError if refused."""
    v2 = [d for d in group["dirs"] if layout.v2 and d.startswith(layout.v2 + "/")]
    for d in group["dirs"]:
        if d in v2:
            _make_v2(layout, d)
        else:
            os.makedirs(d, exist_ok=True)
    try:
        write_limits(limits)
    except OSError:
        if not v2:
            raise
        for d in v2:  # (a parent made again by someone else since, without our controllers)
            _delegated.discard(os.path.dirname(d))
            _enable_v2_controllers(layout, os.path.dirname(d))
        write_limits(limits)


def _make_v2(layout: Layout, d: str) -> None:
    """Make the v2 group ``d``, its controllers delegated down to its parent: one mkdir when that
    was done before and the parent is still there (it may have been pruned since: then again)."""
    parent = os.path.dirname(d)
    if parent in _delegated:
        try:
            os.mkdir(d)
            return
        except FileExistsError:
            return
        except FileNotFoundError:
            _delegated.discard(parent)
    _enable_v2_controllers(layout, parent)
    os.makedirs(d, exist_ok=True)
    _delegated.add(parent)


def write_limits(limits: dict[str, str]) -> None:
    for path, value in limits.items():
        try:
            _write(path, value)
        except FileNotFoundError:
            if not path.endswith(("memsw.limit_in_bytes", "swap.max")):  # absent without swap accounting
                raise


def _enable_v2_controllers(layout: Layout, parent: str) -> None:
    """Delegate our controllers down to ``parent`` (v2: a child only gets what its parent enables)."""
    wanted = [c for c in _V1_CONTROLLERS if c in layout.v2_controllers]
    path = layout.v2
    for part in [""] + os.path.relpath(parent, layout.v2).split("/"):
        path = os.path.join(path, part) if part else path
        os.makedirs(path, exist_ok=True)
        if wanted:
            try:
                _write(os.path.join(path, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
            except OSError:
                pass  # already enabled, or not ours to change: limits then fail loudly in create()


def adopt(spare: list[str], group: dict) -> dict:
    """Make the spare's cgroup (``spare``: one dir per hierarchy, the process already in it) the
    sandbox's: each of ``group``'s (empty) dirs is removed and the spare's takes its name where the
    hierarchy allows renames (v1); a v2 dir cannot be renamed, so the spare's dir is used as it is.
    Then ``group["limits"]`` are written. Returns the group as it now is. No process migrates, so no
    RCU grace period (~8 ms here for the first migration after a pause) is spent on the way.
    """
    moved: dict[str, str] = {}
    for old, new in zip(group["dirs"], spare):
        os.rmdir(old)
        try:
            os.rename(new, old)
            moved[old] = old
        except OSError:  # cgroup v2
            moved[old] = new

    def where(path: str | None) -> str | None:
        if path is None:
            return None
        directory, name = os.path.split(path)
        return os.path.join(moved.get(directory, directory), name)

    adopted = {**group, "dirs": [moved[d] for d in group["dirs"]], "kill": where(group.get("kill")),
               "oom": where(group.get("oom")), "oom_event": where(group.get("oom_event"))}
    adopted["limits"] = {where(path): value for path, value in (group.get("limits") or {}).items()}
    write_limits(adopted["limits"])
    return adopted


def join(group: dict) -> None:
    """Move the calling process into every hierarchy of the group (before unshare(CLONE_NEWCGROUP))."""
    for d in group["dirs"]:
        _write(os.path.join(d, "cgroup.procs"), "0")


def oom_kills(group: dict) -> int:
    """How many processes the kernel's OOM killer has killed in this group so far."""
    if not group.get("oom"):
        return 0
    try:
        text = _linux.read_small(group["oom"])  # (the template does this for each agent it reaps)
    except OSError:
        return 0
    return count_from(text.decode(errors="replace"))


def count_from(text: str) -> int:
    """The ``oom_kill N`` counter of a memory.oom_control (v1) or memory.events (v2) text."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


def members(group: dict) -> list[int]:
    pids: set[int] = set()
    for d in group["dirs"]:
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return sorted(pids)


def kill(group: dict) -> None:
    """SIGKILL every process of the group: ``cgroup.kill`` where it exists, else each member."""
    if group.get("kill"):
        try:
            _write(group["kill"], "1")
            return
        except OSError:
            pass
    for _ in range(5):
        pids = members(group)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)


def remove(group: dict, timeout: float = 1.0) -> list[str]:
    """Kill what is left, then remove the group's directories (retrying while the kernel still
    tears down exiting tasks, which returns EBUSY). Returns the directories that remain."""
    left = _rmdir_empty(group["dirs"])  # the usual case, after the agent was reaped: all empty
    if left:
        kill(group)
    deadline = time.monotonic() + timeout
    while left:
        left = _rmdir_empty(left)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.002)
    return left


def _rmdir_empty(dirs: list[str]) -> list[str]:
    """rmdir each of ``dirs`` once; return those that are still there (busy: processes left)."""
    left = []
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                left.append(d)
    return left


def remove_tree(top: str, timeout: float = 1.0) -> list[str]:
    """Remove ``top`` and every cgroup below it, deepest first, killing their processes first."""
    if not os.path.isdir(top):
        return []
    left = []
    for path, subdirs, _files in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        group = {"dirs": [path], "kill": os.path.join(path, "cgroup.kill") if _is_v2(path) else None}
        left += remove(group, timeout)
    return left


def sweep(state_dir: str, owner_alive: Callable[[str], bool]) -> list[str]:
    """Kill and remove the cgroups of ``state_dir``'s dead owners; return the owner groups removed.

    ``owner_alive(owner_dir)`` is the state dir's own liveness rule.
    """
    if os.geteuid() != 0:
        return []
    removed = []
    key = state_key(state_dir)
    for mount in detect().mounts():
        top = os.path.join(mount, ROOT_NAME, key)
        for owner in _subgroups(top):
            if not owner_alive(os.path.join(state_dir, owner)):
                remove_tree(os.path.join(top, owner))
                removed.append(os.path.join(top, owner))
        try:
            os.rmdir(top)  # only when empty: other owners of this state dir may live
        except OSError:
            pass
    prune()
    return removed


def prune() -> None:
    """Remove the *empty* cgroups of owners whose process is gone, under every state dir's key.

    Another state dir's owners are not ours to kill (its own sweep does that), but a dead owner's
    empty directories are garbage wherever they are: SIGKILLed runtimes and removed temporary state
    dirs leave them. rmdir refuses a cgroup with processes, so nothing running is touched.
    """
    for mount in detect().mounts():
        root = os.path.join(mount, ROOT_NAME)
        for key in _subgroups(root):
            for owner in _subgroups(os.path.join(root, key)):
                pid = owner.split("-")[1] if owner.count("-") >= 2 else ""
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    _rmdir_tree(os.path.join(root, key, owner))
            _rmdir_tree(os.path.join(root, key), below=False)


def _rmdir_tree(top: str, below: bool = True) -> None:
    """rmdir ``top`` (and, with ``below``, its subgroups first), leaving whatever is not empty."""
    for path, _subdirs, _files in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")) if below else [(top, 0, 0)]:
        try:
            os.rmdir(path)
        except OSError:
            pass


def remove_owner(owner_dir: str) -> None:
    """Kill and remove every cgroup of one owner (its sandboxes' and spares'), in every hierarchy."""
    if os.geteuid() != 0:
        return
    key, owner = state_key(os.path.dirname(owner_dir)), os.path.basename(owner_dir)
    for path in owner_dirs(detect(), key, owner):
        remove_tree(path)
        _rmdir_tree(os.path.dirname(path), below=False)  # the state dir's key, once no owner is left


def leftovers(state_dir: str) -> list[str]:
    """Sandbox cgroups of ``state_dir`` that still exist (any hierarchy)."""
    found = []
    key = state_key(state_dir)
    for mount in detect().mounts():
        top = os.path.join(mount, ROOT_NAME, key)
        for owner in _subgroups(top):
            found += [os.path.join(top, owner, sb) for sb in _subgroups(os.path.join(top, owner))]
    return found


def _subgroups(path: str) -> list[str]:
    """Names of the child cgroups of ``path`` (its subdirectories; the rest are control files)."""
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.kill"))


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def watch_oom(group: dict) -> tuple[int, int] | None:
    """v1 only: an eventfd the kernel signals when the group hits its memory limit. Only with a
    memory limit (which turns the group's own OOM killer off, see ``limit_files``):
    without one nothing happens to watch, and 1,000 sandboxes need no 2,000 descriptors here."""
    control = group.get("oom_event")
    if not control or not any(path.endswith("/memory.oom_control") for path in group.get("limits") or ()):
        return None
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ofd = os.open(group["oom"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(control, "w") as f:
            f.write(f"{efd} {ofd}")
    except OSError:
        os.close(efd)
        os.close(ofd)
        return None
    return efd, ofd
