"""The template's side of isolation: fork each agent into its level, watch for OOM, clean up after it.

``Supervisor.fork(config)`` replaces ``os.fork()`` in the template. For the ``namespaces`` level the
child is PID 1 of a new pid namespace (the template still reaps it directly, by its host pid), and
the child's ``enter(config)`` joins the sandbox's cgroups and enters its namespaces and root.

Out of memory: on cgroup v2 ``memory.oom.group`` makes the kernel kill the whole sandbox at once; on
v1 the sandbox's OOM killer is disabled and the template, woken by the cgroup's OOM eventfd, kills
the whole sandbox itself. Either way no process of the sandbox (the agent included) lives on to
report half a story, and the ``reaped`` frame says ``oom_killed``. ``finish(pid)`` runs after an
agent is reaped: it kills what is left of the cgroup (the last step of teardown) and removes it.

Stdlib only: this runs in the template (``python -I -S``).
"""

from __future__ import annotations

import os
import selectors

from . import cgroups, namespaces

_PID_NS = "/proc/self/ns/pid"


class Supervisor:
    """Per-template isolation state: which agent has which cgroup and OOM watch."""

    def __init__(self, sel: selectors.BaseSelector | None = None) -> None:
        self.sel = sel  # the template's selector, where OOM eventfds are registered
        self.groups: dict[int, dict] = {}  # agent pid -> its cgroup
        self.watches: dict[int, tuple[int, int]] = {}  # agent pid -> (eventfd, oom_control fd)
        self.oom_killed: set[int] = set()
        self._pid_ns_fd: int | None = None

    def fork(self, config: dict) -> int:
        """Fork the agent for ``config`` at its isolation level; returns 0 in the child."""
        group = config.get("cgroups")
        watch = _watch_oom(group) if group else None
        if config.get("namespaces"):
            if self._pid_ns_fd is None:
                self._pid_ns_fd = os.open(_PID_NS, os.O_RDONLY | os.O_CLOEXEC)
            pid = namespaces.fork_into_pid_namespace(self._pid_ns_fd)
        else:
            pid = os.fork()
        if pid == 0:
            if watch:
                os.close(watch[0])
                os.close(watch[1])
            return 0
        if group:
            self.groups[pid] = group
        if watch:
            self.watches[pid] = watch
            if self.sel is not None:
                self.sel.register(watch[0], selectors.EVENT_READ, ("oom", pid))
        return pid

    def enter(self, config: dict) -> None:
        """In the forked agent: close the template's watches, join cgroups, enter the namespaces."""
        for efd, ofd in self.watches.values():
            os.close(efd)
            os.close(ofd)
        if self._pid_ns_fd is not None:
            os.close(self._pid_ns_fd)
        if config.get("cgroups"):
            cgroups.join(config["cgroups"])
        plan = config.get("namespaces")
        if plan:
            namespaces.enter(plan)
            config["dir"] = namespaces.AGENT_DIR

    def fired(self, data: object) -> bool:
        """Handle a selector event registered by ``fork``; False if it is not ours."""
        if not (isinstance(data, tuple) and data[0] == "oom"):
            return False
        pid = data[1]
        self._unwatch(pid)
        self.oom_killed.add(pid)
        cgroups.kill(self.groups.get(pid) or {"dirs": []})
        return True

    def finish(self, pid: int) -> dict:
        """After agent ``pid`` is reaped: kill and remove its cgroup; extra fields for ``reaped``."""
        self._unwatch(pid)
        group = self.groups.pop(pid, None)
        oom = pid in self.oom_killed or (group is not None and cgroups.oom_kills(group) > 0)
        self.oom_killed.discard(pid)
        if group is not None:
            cgroups.remove(group)
        return {"oom_killed": True} if oom else {}

    def finish_all(self) -> None:
        for pid in list(self.groups):
            self.finish(pid)

    def _unwatch(self, pid: int) -> None:
        watch = self.watches.pop(pid, None)
        if watch:
            try:
                if self.sel is not None:
                    self.sel.unregister(watch[0])
            except (KeyError, ValueError):
                pass
            os.close(watch[0])
            os.close(watch[1])


def _watch_oom(group: dict) -> tuple[int, int] | None:
    """v1 only: an eventfd the kernel signals when the group hits its memory limit."""
    control = group.get("oom_event")
    if not control:
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


def parent_pid() -> int:
    """The parent's pid as the host sees it (``getppid()`` is 0 for PID 1 of a new pid namespace)."""
    ppid = os.getppid()
    if ppid:
        return ppid
    with open("/proc/self/stat") as f:  # still the host's /proc: the agent has not entered its root yet
        return int(f.read().rsplit(")", 1)[1].split()[1])
