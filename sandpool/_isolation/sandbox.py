"""The template's side of isolation: fork each agent into its level, watch for OOM, clean up after it.

``Supervisor.fork(config, sock_fd)`` replaces ``os.fork()`` in the template. For the ``namespaces``
level the child is PID 1 of a new pid namespace (the template still reaps it directly, by its host
pid), and the child's ``enter(config)`` joins the sandbox's cgroups and enters its namespaces and root.

Spares: creating the pid and network namespaces and bringing ``lo`` up is a third of a namespaces
sandbox's start. So once a network mode has been used, the template keeps one spare child per mode
that has done exactly that, made while the template is idle (``refill``); the next sandbox of that
mode is handed to it (its config pickled, its agent socket passed along) instead of forking. A spare
is renamed ``sandpool-spare`` while it waits and dies with the template.

Out of memory: on cgroup v2 ``memory.oom.group`` makes the kernel kill the whole sandbox at once; on
v1 the sandbox's OOM killer is disabled and the template, woken by the cgroup's OOM eventfd, kills
the whole sandbox itself. Either way no process of the sandbox (the agent included) lives on to
report half a story, and the ``reaped`` frame says ``oom_killed``. ``finish(pid)`` runs after an
agent is reaped: it kills what is left of the cgroup (the last step of teardown) and removes it.

Stdlib only: this runs in the template (``python -I -S``).
"""

from __future__ import annotations

import os
import pickle
import select
import selectors
import signal
import socket
from collections.abc import Callable

from .._agent import _linux
from . import _sys, cgroups, namespaces, oci

_PID_NS = "/proc/self/ns/pid"
SPARE_NAME = "sandpool-spare"
#: Above a socket's send buffer (~200 KiB) a handoff fails anyway, and the sandbox is forked instead.
_MAX_CONFIG_BYTES = 1 << 20


class Supervisor:
    """Per-template isolation state: each agent's cgroup and OOM watch, and the spare children."""

    def __init__(self, become_agent: Callable[[dict, int], None] | None = None,
                 sel: selectors.BaseSelector | None = None) -> None:
        self.become_agent = become_agent  # the template's child path, for spares: (config, sock_fd)
        self.sel = sel  # the template's selector, where OOM eventfds are registered
        self.groups: dict[int, dict] = {}  # agent pid -> its cgroup
        self.watches: dict[int, tuple[int, int]] = {}  # agent pid -> (eventfd, oom_control fd)
        self.oom_killed: set[int] = set()
        self.spares: dict[int, tuple[str, socket.socket]] = {}  # pid -> (network mode, our socket end)
        self.wanted: set[str] = set()  # network modes of namespaces sandboxes asked for so far
        self.early = False  # in a spare: its namespaces exist already
        self.sock_fd = -1  # the agent socket of the last fork
        self._pid_ns_fd: int | None = None

    def fork(self, config: dict, sock_fd: int) -> int:
        """Start the agent for ``config`` (its socket is ``sock_fd``) at its isolation level: hand it
        to a spare or fork. Returns the agent's pid, or 0 in a forked child."""
        group = config.get("cgroups")
        watch = _watch_oom(group) if group else None
        plan = config.get("namespaces")
        pid = self._hand_to_spare(plan["network"], config, sock_fd) if plan else None
        self.sock_fd = sock_fd  # the oci level's child passes it on to crun
        if pid is None:
            pid = namespaces.fork_into_pid_namespace(self._pid_ns()) if plan else os.fork()
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
        """In the agent: close the template's watches and spares, join cgroups, enter the namespaces."""
        for efd, ofd in self.watches.values():
            os.close(efd)
            os.close(ofd)
        for _mode, sock in self.spares.values():
            sock.close()
        if self._pid_ns_fd is not None:
            os.close(self._pid_ns_fd)
        if config.get("cgroups"):
            cgroups.join(config["cgroups"])
        plan = config.get("namespaces")
        if plan:
            namespaces.enter(plan, early=self.early)
            config["dir"] = namespaces.AGENT_DIR
        if config.get("oci"):
            oci.run(config, self.sock_fd)  # execs crun: the agent starts inside the container

    # -- spares ----------------------------------------------------------------------------

    def refill(self) -> None:
        """Template side, between requests: one live spare per network mode in use."""
        for pid, (mode, sock) in list(self.spares.items()):
            if select.select([sock], [], [], 0)[0]:  # EOF: the spare died
                sock.close()
                del self.spares[pid]
        have = {mode for mode, _ in self.spares.values()}
        for mode in sorted(self.wanted - have):
            self._spawn_spare(mode)

    def _pid_ns(self) -> int:
        if self._pid_ns_fd is None:
            self._pid_ns_fd = os.open(_PID_NS, os.O_RDONLY | os.O_CLOEXEC)
        return self._pid_ns_fd

    def _hand_to_spare(self, mode: str, config: dict, sock_fd: int) -> int | None:
        self.wanted.add(mode)
        for pid, (spare_mode, sock) in list(self.spares.items()):
            if spare_mode != mode:
                continue
            del self.spares[pid]
            try:
                socket.send_fds(sock, [pickle.dumps(config)], [sock_fd])
                return pid
            except OSError:
                continue  # it died; the template reaps it like any orphan
            finally:
                sock.close()
        return None

    def _spawn_spare(self, mode: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        template = os.getpid()
        pid = namespaces.fork_into_pid_namespace(self._pid_ns())
        if pid == 0:
            ours.close()
            self._be_spare(mode, theirs, template)
        theirs.close()
        self.spares[pid] = (mode, ours)

    def _be_spare(self, mode: str, sock: socket.socket, template: int) -> None:
        """In a spare: make the namespaces, wait for a sandbox, become its agent. Never returns."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # not the template's handlers
            _linux.set_parent_death_signal(signal.SIGKILL)
            if parent_pid() != template:
                os._exit(0)
            for _mode, other in self.spares.values():
                other.close()
            self.spares = {}
            with open("/proc/self/comm") as f:
                name = f.read().strip()
            _sys.set_name(SPARE_NAME)
            namespaces.unshare_early(mode)
            self.early = True
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_CONFIG_BYTES, 1)
            if not data or not fds:
                os._exit(0)  # the template is gone
            sock.close()
            _sys.set_name(name)
            config = pickle.loads(data)
        except BaseException:
            os._exit(1)
        assert self.become_agent is not None
        self.become_agent(config, fds[0])
        os._exit(1)

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
        for _mode, sock in self.spares.values():
            sock.close()  # EOF: each spare exits
        self.spares.clear()

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
