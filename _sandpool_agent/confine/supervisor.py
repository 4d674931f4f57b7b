"""The template's side of isolation: fork each agent into its level, watch for OOM, clean up after it.

``Supervisor.fork_all(requests)`` replaces ``os.fork()`` in the template. For the ``namespaces``
level each child is PID 1 of a new pid namespace (the template still reaps it directly, by its host
pid), and the child's ``enter(config)`` joins the sandbox's cgroups, enters its namespaces and root,
and loads the syscall filter the template compiled once (``seccomp``), which everything the agent
starts inherits.

Bursts: every page of its memory the template writes after a fork is copied, and the child is left
with the old copy, which is private to it (its own) unless a child forked next shares it: a child
keeps a copy of each page the template writes both before and after its fork, until the forks on
either side. So the children of a round of the loop are forked back to back, with no Python work
between the forks (``_burst``), and never one alone (``spares``; a lone spawn also waits a little
for another, see ``Template._read_control``); and a child writes none of the template's objects
(see ``_close_inherited``).

Spares: creating the pid and network namespaces and bringing ``lo`` up is a third of a namespaces
sandbox's start. So once a network mode has been used, the template keeps spare children of that
mode that have done exactly that (which ones: ``spares``), made between requests (``refill``) or
beside a lone agent; the next sandbox of that mode is handed to one (its config pickled,
its agent socket passed along) instead of forking. A spare waits in a cgroup of its own
(``<owner>/spare-<n>``), which becomes the sandbox's at handoff (``cgroups.adopt``): moving a
process between cgroups costs an RCU grace period (~8 ms here) whenever none happened for a while,
and a spare pays it ahead of time. Most spares also build the root of a plan asked for lately
(``spares.build_root``) and pivot into it, so a handoff leaves only ``namespaces.finish`` and the
filter; such a spare is handed only sandboxes whose plan has that ``namespaces.root_key``. A spare
is named ``sandpool-spare`` while it waits and dies with the template.

Out of memory: on cgroup v2 ``memory.oom.group`` makes the kernel kill the whole sandbox at once; on
v1 the sandbox's OOM killer is disabled and the template, woken by the cgroup's OOM eventfd, kills
the whole sandbox itself. Either way no process of the sandbox (the agent included) lives on to
report half a story, and the ``reaped`` frame says ``oom_killed``. ``finish(pid)`` runs after an
agent is reaped: it kills what is left of the cgroup (the last step of teardown) and removes it.

Rootless (the template in a user namespace, ``outside`` its user's ids; see ``userns``): there are
no cgroups, so spares make the cgroup namespace early and may build roots without one, and an agent
of the ``process`` level leaves the template's user namespace for a nested one before it serves.

Stdlib only: this runs in the template (``python -I -S``).
"""

from __future__ import annotations

import os
import pickle
import select
import selectors
import signal
import _signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from .. import linux as _linux
from . import _sys, cgroups, namespaces, netsetup, oci, seccomp, spares, userns
from .held import Held

_PID_NS = "/proc/self/ns/pid"
SPARE_NAME = "sandpool-spare"
#: Above a socket's send buffer (~200 KiB) a handoff fails anyway, and the sandbox is forked instead.
_MAX_CONFIG_BYTES = 1 << 20
#: Rootless: how long a new child waits to be re-parented to the template (it takes microseconds).
_REPARENT_SECONDS = 2.0


class _Spare(NamedTuple):
    mode: str  # its network mode
    sock: socket.socket  # our end of the socket it waits on
    group: dict | None  # the cgroup it waits in
    root: str | None  # the root_key of the root it builds, or None
    stamps: tuple = ()  # (inode, mtime) of the files that root binds, when it was asked for


class _Made(NamedTuple):
    """A spare about to be forked: what it is for, and what it needs from the template."""
    mode: str
    key: str | None
    plan: dict | None
    group: dict | None  # its cgroup
    pair: tuple  # (ours, theirs): the socket it waits on
    holder: tuple | None  # the socket pair over which it hands its storage over


class _Burst(NamedTuple):
    index: int | None  # in a child: which of the burst's forks it is; None in the template
    pids: list[int]  # in the template: the children's pids, in order


class Supervisor:
    """Per-template isolation state: each agent's cgroup and OOM watch, and the spare children."""

    def __init__(self, become_agent: Callable[[dict, int], None] | None = None,
                 sel: selectors.BaseSelector | None = None, spare_dir: str | None = None,
                 outside: tuple[int, int] | None = None, niceness: int | None = None) -> None:
        self.become_agent = become_agent  # the template's child path, for spares: (config, sock_fd)
        self.spare_dir = spare_dir  # a host directory that lives as long as the template (its owner dir)
        self.outside = outside  # rootless: the user's (uid, gid) outside the template's user namespace
        self.niceness = niceness  # the owner's: what every child of the (boosted) template runs at
        self.groups: dict[int, dict] = {}  # agent pid -> its cgroup
        self.watches: dict[int, tuple[int, int]] = {}  # agent pid -> (eventfd, oom_control fd)
        self.oom_killed: set[int] = set()
        self.net_teardowns: dict[int, str] = {}  # agent pid -> nft script removing its bridge chains
        self.spares: dict[int, _Spare] = {}  # pid -> the spare
        self.ready: set[int] = set()  # spares that said they are ready (joined, namespaces made)
        self.wanted: dict[str, dict[str, dict]] = {}  # network mode -> {root_key: plan}, the last
        #                                                  ROOTS_PER_MODE roots asked for, oldest first
        self.unbuildable: set[str] = set()  # root keys a spare failed to build a root for
        self.spare_parents: list[str] = []  # where spare cgroups go: the owner's dir in each hierarchy
        self.adopted: dict[int, dict] = {}  # agent pid -> the spare cgroup it took over (for "spawned")
        self.early = False  # in a spare: its namespaces exist already
        self.early_cgroupns = False  # ... and its cgroup namespace, rooted at the cgroup it keeps
        self.built: str | None = None  # ... and its root, for plans of this root_key
        self._spares_made = 0
        self._pid_ns_fd: int | None = None
        self._layout: cgroups.Layout | None = None  # the host's cgroup mounts, read once
        self.held = Held(rootless=outside is not None)  # each sandbox's writable storage, for snapshots
        self.sel = sel  # the template's selector, where OOM eventfds (and the held storage's sockets) wait

    @property
    def sel(self) -> selectors.BaseSelector | None:
        return self.held.sel

    @sel.setter
    def sel(self, sel: selectors.BaseSelector | None) -> None:
        self.held.sel = sel

    def layout(self) -> cgroups.Layout:
        if self._layout is None:
            self._layout = cgroups.detect()
        return self._layout

    def fork_all(self, requests: list[tuple[dict, int]], waited: bool = False) -> list[int]:
        """Start the agent of each ``(config, sock_fd)`` in ``requests`` (``sock_fd``: its socket) at
        its isolation level: hand it to a spare or fork it. The forks come back to back (``_burst``),
        everything else before or after them. ``waited``: a lone request waited for company in vain
        (see ``alone``). Returns their pids, in order; in a forked child it does not return: the
        child becomes the agent (``become_agent``)."""
        pids: list[int] = []
        forks: list[tuple[int, dict | None, tuple | None]] = []  # (index, plan, holder pair)
        for config, sock_fd in requests:
            plan = config.get("namespaces")
            if config.get("cgroups"):
                self.spare_parents = [os.path.dirname(d) for d in config["cgroups"]["dirs"]]
            if plan:
                _compile_filter()  # here, once: each agent only loads it
            # (a bridge sandbox joins the namespace its client made before its root: no spare fits it)
            pid = self._hand_to_spare(plan, config, sock_fd) if plan and not plan.get("netns") else None
            if pid is None:
                forks.append((len(pids), plan, self.held.pair() if plan else None))
            pids.append(pid or 0)
        # a lone agent gets a spare beside it (one more, or two of those missing, so that one is
        # left when the agent ends: spares.missing); the rest come after the replies (refill)
        beside = self._made(self._missing(1, None if waited else spares.EXTRA)[:2]) if len(forks) == 1 else []
        template = os.getpid()
        forked = self._burst([bool(plan) for _index, plan, _pair in forks] + [True] * len(beside))
        if forked.index is not None and forked.index >= len(forks):
            self._be_made_spare(beside[forked.index - len(forks)], template)
        if forked.index is not None:  # the child of forks[index]
            index, _plan, pair = forks[forked.index]
            self.held.keep(0, pair)
            assert self.become_agent is not None
            self.become_agent(*requests[index])
            os._exit(1)
        for (index, _plan, pair), pid in zip(forks, forked.pids):
            self.held.keep(pid, pair)
            pids[index] = pid
        self._spawn_spares(beside, forked.pids[len(forks):])
        for (config, _sock_fd), pid in zip(requests, pids):
            self._track(pid, config)
        return pids

    def alone(self, config: dict) -> bool:
        """Would the agent of ``config``, started by itself now, be forked alone although a spare
        could take it (one of its level and network), as none is ready and none can be forked
        beside it (``spares.missing``)? Under load, while spares are slow to get ready."""
        plan = config.get("namespaces")
        if not plan or plan.get("netns"):
            return False  # (no spare ever takes it: it is forked at once, alone or not)
        mode, root = plan["network"], namespaces.root_key(plan)
        spares.ask(self.wanted, mode, root, plan)
        self._poll_spares()
        if any(spare.mode == mode and pid in self.ready and spare.root in (root, None) for pid, spare in self.spares.items()):
            return False
        return not self._missing(1)

    def _burst(self, pid_ns: list[bool]) -> _Burst:
        """Fork one child per item of ``pid_ns`` (True: PID 1 of a new pid namespace), back to back,
        with nothing else between the forks (see Bursts, above)."""
        pids: list[int] = []
        for with_pid_ns in pid_ns:
            pid = self._fork_pid_ns() if with_pid_ns else _sys.fork()
            if pid == 0:
                return _Burst(len(pids), [])
            pids.append(pid)
        return _Burst(None, pids)

    def _track(self, pid: int, config: dict) -> None:
        """After agent ``pid`` started: its cgroup (a spare's, if it adopted one), OOM watch and
        network teardown."""
        group = config.get("cgroups")
        watch = cgroups.watch_oom(group) if group else None
        if group:
            self.groups[pid] = group
        if config.get("net_teardown"):
            self.net_teardowns[pid] = config["net_teardown"]
        if watch:
            self.watches[pid] = watch
            if self.sel is not None:
                self.sel.register(watch[0], selectors.EVENT_READ, ("oom", pid))

    def unboost(self) -> None:
        """In a child of the template: back to the owner's niceness (the template may run above it)."""
        if self.niceness is not None and os.getpriority(os.PRIO_PROCESS, 0) != self.niceness:
            os.setpriority(os.PRIO_PROCESS, 0, self.niceness)

    def enter(self, config: dict, sock_fd: int) -> None:
        """In the agent (whose socket is ``sock_fd``): keep nothing of the template's, join cgroups,
        enter the namespaces."""
        self._close_inherited(sock_fd)
        if config.get("cgroups") and not config.get("cgroups_joined"):
            cgroups.join(config["cgroups"])
        plan = config.get("namespaces")
        if plan:
            if self.built is not None:
                namespaces.finish(plan)  # the rest was done ahead of time (_be_spare)
            else:
                namespaces.enter(plan, early=self.early, cgroupns=self.early_cgroupns, holder=self.held.take_holder())
            _sys.seccomp_filter(seccomp.program())  # last: the agent needs no denied call from here on
            config["dir"] = namespaces.AGENT_DIR
        elif self.outside is not None and not config.get("oci"):
            userns.leave(self.outside)  # the process level: no capability over the template's namespaces
        self.held.drop_holder()  # (not handed over: nothing of it stays with the agent)
        if config.get("oci"):
            oci.run(config, sock_fd)  # execs crun: the agent starts inside the container

    def _close_inherited(self, keep: int) -> None:
        """In a child of the template: close every descriptor it inherited but stdio, ``keep`` and
        its own holder socket. That is every handle the template holds on other sandboxes (their
        agents' pidfds, OOM watches, storage, spares' and holders' sockets) and on itself (its
        selector, its SIGCHLD wake-up pipe, its control socket): one ``close_range`` call each side
        of each fd kept. None of the template's objects is touched (closed as objects, the holder
        sockets of a burst of 64 cost its agents ~70 copied pages each): the socket objects keep
        their closed numbers, and none can close a reused one later, as the template's state that
        holds them is never released in a child (which ends with ``os._exit``)."""
        holder = self.held.holder
        _linux.close_all_but(keep, *(() if holder is None else (holder.fileno(),)))

    # -- spares ----------------------------------------------------------------------------

    def refill(self) -> None:
        """Template side, between requests: the spares missing (``spares``), forked in one
        burst; spares built for roots no longer wanted are dropped."""
        self._poll_spares()
        for pid, spare in list(self.spares.items()):
            if spare.root is not None and spare.root not in self.wanted.get(spare.mode, {}):
                self._drop_spare(pid)
        self._spawn_spares(self._made(self._missing(0)), None)

    def _missing(self, forking: int, extra: int | None = spares.EXTRA) -> list[spares.Kind]:
        """The spares to fork in a burst with ``forking`` other children (``spares.missing``)."""
        have = Counter((spare.mode, spare.root) for spare in self.spares.values())
        # (a built root needs its cgroup namespace made early: in the cgroup it keeps, or with none at all)
        buildable = bool(self.spare_dir and (self.spare_parents or self.outside is not None))
        return spares.missing(self.wanted, have, buildable, self.unbuildable, forking, extra)

    def _fork_pid_ns(self) -> int:
        if self.outside is None:
            return namespaces.fork_into_pid_namespace(self._pid_ns())
        template = os.getpid()
        pid = namespaces.fork_into_pid_namespace_rootless()
        if pid == 0:  # the middle child is gone; wait (briefly) until its exit made us the template's child
            deadline = time.monotonic() + _REPARENT_SECONDS
            while parent_pid() != template and time.monotonic() < deadline:
                time.sleep(0.0001)  # (past the deadline the template is gone: the parent check exits)
        return pid

    def _pid_ns(self) -> int:
        if self._pid_ns_fd is None:
            self._pid_ns_fd = os.open(_PID_NS, os.O_RDONLY | os.O_CLOEXEC)
        return self._pid_ns_fd

    def _poll_spares(self) -> None:
        """Notice each spare's "ready" byte, or its death (EOF), without blocking: one poll over
        them all (it runs after every round of the template's loop)."""
        if not self.spares:
            return
        poller = select.poll()  # (select() fails on fds >= 1024: a template with ~1,000 sandboxes has them)
        by_fd = {spare.sock.fileno(): pid for pid, spare in self.spares.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, _events in poller.poll(0):
            self._read_spare(by_fd[fd])

    def _read_spare(self, pid: int) -> None:
        """Take what spare ``pid`` sent: its "ready" byte, or EOF (it died: dropped)."""
        sock = self.spares[pid].sock
        while True:
            try:
                data = sock.recv(1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                root = self.spares[pid].root
                if pid not in self.ready and root is not None:
                    self.unbuildable.add(root)  # it failed to build that root: the next spare will not try
                self._drop_spare(pid)
                return
            self.ready.add(pid)

    def _hand_to_spare(self, plan: dict, config: dict, sock_fd: int) -> int | None:
        """The pid of the ready spare that took the sandbox (one whose root was built for this plan's
        ``root_key`` if there is one, else one without a root), or None (fork instead)."""
        mode, root = plan["network"], namespaces.root_key(plan)
        spares.ask(self.wanted, mode, root, plan)
        self._poll_spares()
        fits = [pid for pid, spare in self.spares.items()
                if spare.mode == mode and pid in self.ready and spare.root in (root, None)]
        fits.sort(key=lambda pid: self.spares[pid].root is None)  # a built root first
        for pid in fits:
            sock, group = self.spares[pid].sock, self.spares[pid].group
            if group is not None and config.get("cgroups") and len(group["dirs"]) != len(config["cgroups"]["dirs"]):
                continue  # a memory limit: its group has a v1 memory cgroup, which no spare waits in
            if self.spares[pid].root is not None and self.spares[pid].stamps != spares.file_stamps(plan):
                self._drop_spare(pid)  # a file it binds was replaced since: the next spare binds the new one
                continue
            try:
                if group is not None:  # the spare is in a cgroup of its own: make it the sandbox's
                    config["cgroups"] = cgroups.adopt(group["dirs"], config["cgroups"]) \
                        if config.get("cgroups") else group
                    config["cgroups_joined"] = True
                    self.adopted[pid] = config["cgroups"]
                socket.send_fds(sock, [pickle.dumps(config)], [sock_fd])
            except OSError:  # it died, or its cgroup could not be taken over: fork instead
                self.adopted.pop(pid, None)
                self._drop_spare(pid)
                if config.pop("cgroups_joined", False) and config.get("cgroups"):
                    group = config["cgroups"]
                    cgroups.remove(group)
                    cgroups.create(self.layout(), group, group.get("limits") or {})
                continue
            del self.spares[pid]
            self.ready.discard(pid)
            sock.close()
            return pid
        return None

    def spawned(self, pid: int) -> dict:
        """Extra fields of the ``spawned`` report: the cgroup the sandbox got, if it took a spare's."""
        group = self.adopted.pop(pid, None)
        return {"cgroups": group} if group else {}

    def _made(self, needed: list[spares.Kind]) -> list[_Made]:
        """What each spare in ``needed`` needs before its fork: its cgroup and sockets."""
        made = []
        for mode, key, plan in needed:
            group = self._spare_group()
            if plan is not None and group is None and self.outside is None:  # a built root needs the cgroup namespace made early
                self.unbuildable.add(key)
                continue
            made.append(_Made(mode, key, plan, group, socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET),
                              self.held.pair()))
        return made

    def _spawn_spares(self, made: list[_Made], pids: list[int] | None) -> None:
        """Fork the spares ``made`` in one burst, unless they were forked already (``pids``)."""
        if pids is None:
            template = os.getpid()
            forked = self._burst([True] * len(made))
            if forked.index is not None:
                self._be_made_spare(made[forked.index], template)
            pids = forked.pids
        for spare, pid in zip(made, pids):
            self.held.keep(pid, spare.holder)
            spare.pair[1].close()
            self.spares[pid] = _Spare(spare.mode, spare.pair[0], spare.group, spare.key,
                                      spares.file_stamps(spare.plan) if spare.plan else ())

    def _be_made_spare(self, spare: _Made, template: int) -> None:
        """In the child forked for ``spare`` by ``template`` (its pid): be it. Never returns."""
        self.held.keep(0, spare.holder)
        self._be_spare(spare.mode, spare.pair[1], template, spare.group, spare.plan)

    def _spare_group(self) -> dict | None:
        """A fresh cgroup for a spare, beside the sandboxes' (None before any sandbox had one)."""
        if not self.spare_parents:
            return None
        self._spares_made += 1
        parent = self.spare_parents[0]
        key, owner = os.path.basename(os.path.dirname(parent)), os.path.basename(parent)
        group = cgroups.plan(self.layout(), key, owner, f"spare-{os.getpid()}-{self._spares_made}", with_memory=False)
        try:
            for d in group["dirs"]:
                os.mkdir(d)
        except OSError:
            cgroups.remove(group)
            return None
        return group

    def _drop_spare(self, pid: int) -> None:
        self.ready.discard(pid)
        spare = self.spares.pop(pid)
        spare.sock.close()  # EOF: the spare exits
        self.held.release(pid)
        if spare.group is not None:
            cgroups.remove(spare.group)

    def _be_spare(self, mode: str, sock: socket.socket, template: int, group: dict | None,
                  plan: dict | None) -> None:
        """In a spare: make the namespaces (and, given a ``plan``, the root for plans of its
        ``root_key``), wait for a sandbox, become its agent. Never returns."""
        try:
            self.unboost()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM):  # not the template's handlers (_signal: see agent.run)
                _signal.signal(sig, _signal.SIG_DFL)
            _linux.set_parent_death_signal(signal.SIGKILL)
            if parent_pid() != template:
                os._exit(0)
            self._close_inherited(sock.fileno())
            name = _linux.read_small("/proc/self/comm").decode().strip()  # (open(): ~0.1 MiB of private pages)
            _sys.set_name(SPARE_NAME)
            if group is not None:
                cgroups.join(group)  # the slow part of a cgroup move, paid here, ahead of time
            early_cgroupns = group is not None or self.outside is not None  # (rootless: no cgroup to join)
            namespaces.unshare_early(mode, cgroup=early_cgroupns)
            self.early, self.early_cgroupns = True, early_cgroupns
            if plan is not None:
                spares.build_root(plan, self.spare_dir, self.held.take_holder())  # (which storage.hold closes)
                self.built = namespaces.root_key(plan)
            sock.send(b"r")  # ready: the template may now hand over a sandbox (and rename our cgroup)
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_CONFIG_BYTES, 1)
            if not data or not fds:
                os._exit(0)  # the template is gone
            sock.close()
            _sys.set_name(name)
            config = pickle.loads(data)
            if group is not None and not config.get("cgroups_joined"):
                raise RuntimeError("a spare with a cgroup was handed a sandbox that did not adopt it")
            if self.built is not None and namespaces.root_key(config["namespaces"]) != self.built:
                raise RuntimeError("a spare was handed a sandbox whose root is not the one it built")
        except BaseException:
            import traceback

            traceback.print_exc()  # the owner's stderr, as for agents: a spare that fails is a sandpool bug
            os._exit(1)
        assert self.become_agent is not None
        self.become_agent(config, fds[0])
        os._exit(1)

    def fired(self, data: object) -> bool:
        """Handle a selector event registered by ``fork``; False if it is not ours."""
        if isinstance(data, tuple) and data[0] == "hold":
            self.held.take(data[1])
            return True
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
        self.held.release(pid)
        group = self.groups.pop(pid, None)
        oom = pid in self.oom_killed or (group is not None and cgroups.oom_kills(group) > 0)
        self.oom_killed.discard(pid)
        if group is not None:
            cgroups.remove(group)
        netsetup.teardown(self.net_teardowns.pop(pid, None))
        return {"oom_killed": True} if oom else {}

    def finish_all(self) -> None:
        for pid in set(self.groups) | set(self.net_teardowns):
            self.finish(pid)
        for pid in list(self.spares):
            self._drop_spare(pid)
        self.held.release_all()
        for owner in self.spare_parents:  # the owner's own directories, and its key's once empty
            for path in (owner, os.path.dirname(owner)):
                try:
                    os.rmdir(path)
                except OSError:
                    pass

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


def _compile_filter() -> None:
    """Compile the syscall filter in the template, before any fork; a failure is left to the agent,
    which raises it when it loads the filter (the sandbox fails to start, the template lives on)."""
    try:
        _sys.prepare_filter(seccomp.program())
    except OSError:
        pass


def parent_pid() -> int:
    """The parent's pid as the host sees it (``getppid()`` is 0 for PID 1 of a new pid namespace)."""
    ppid = os.getppid()
    if ppid:
        return ppid
    return int(_linux.own_stat()[1])  # still the host's /proc: the agent has not entered its root yet
