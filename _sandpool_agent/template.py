"""The template: a pre-imported process that forks sandbox agents in well under a millisecond.

The runtime starts one template per owner and talks to it over a SOCK_SEQPACKET control socket:
``spawn`` frames (with the agent's socket attached as SCM_RIGHTS) are answered by ``spawned``,
and every agent that exits is reported as ``reaped``: the template watches each agent's pidfd and
reaps it by its pid alone (``waitpid(-1)`` walks the list of all ~N children each call). The
template is a child subreaper: when an agent without a pid namespace of its own is SIGKILLed, its
orphaned descendants come back here and are killed, and the agent's sandbox directory is removed.
When the control socket reaches EOF (the owner is gone, however it died) the template stops every
agent and removes the owner directory.

Rootless: the template of an ordinary user first enters a user namespace in which it is root
(``_isolation.userns``), when the runtime says so, and forks everything there.
"""

from __future__ import annotations

import gc
import importlib
import os
import resource
import select
import selectors
import shutil
import signal
import _signal
import socket
import time

from . import wire as _wire
from .confine import userns
from .confine.supervisor import Supervisor, parent_pid
from . import linux as _linux, agent

_RLIMITS = {"as": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA, "nofile": resource.RLIMIT_NOFILE,
            "nproc": resource.RLIMIT_NPROC, "fsize": resource.RLIMIT_FSIZE, "cpu": resource.RLIMIT_CPU}
_SHUTDOWN_WAIT_SECONDS = 3.0
#: Shortest time between two sweeps of every child for exits (``waitpid(-1)``, which walks the list
#: of all ~N children each time): agents are reaped one by one through their pidfds, and the sweep
#: only collects the rest (spares that died, orphans, middle children), a little later in a burst.
SWEEP_SECONDS = 0.02
#: How far the template's niceness is below its owner's, where that is allowed (root). Every start
#: and every exit passes through this one process; with hundreds of sandboxes setting up at once it
#: would get one share of the CPU among them all. Its children go back to the owner's at once.
PRIORITY_BOOST = 10
#: At most this many spawn requests are taken from the control socket at once, and their agents
#: forked back to back before any is answered (``Supervisor.fork_all``). Every page the template
#: writes after a fork is copied (a fault in the template), and the child is left alone with the old
#: copy, which counts as its private memory: ~370 pages per round of the loop. Forked together, a
#: burst of agents shares the one old copy of each, and the template copies it once per burst
#: rather than once per agent.
SPAWN_BATCH = 64
#: How long a lone spawn request waits for another when its agent would be forked alone (no spare
#: to take it, none to fork beside it: under load, when spares are slow to get ready). A child
#: forked alone keeps a copy of every page the template writes in each round (~110 pages, 0.4 MiB);
#: two forked together keep only what is written between them. Waited only with nothing else to do.
PAIR_WAIT_MS = 5


class Template:
    def __init__(self, control: socket.socket, owner_dir: str, sandbox_nofile: int,
                 outside: tuple[int, int] | None = None, niceness: int | None = None) -> None:
        self.control = control
        self.control_ready = select.poll()  # is another request waiting? (without blocking)
        self.control_ready.register(control, select.POLLIN)
        self.sandbox_nofile = sandbox_nofile  # the soft fd limit given back to each agent (and its user code)
        self.owner_dir = owner_dir
        self.agents: dict[int, str] = {}  # pid -> sandbox dir
        self.pid_ns_agents: set[int] = set()  # agents that are PID 1 of a pid namespace: no orphans here
        self.exit_fds: dict[int, int] = {}  # agent pid -> its pidfd, readable once it has exited
        self.sweep_due = False  # a SIGCHLD came: some child other than a watched agent may have exited
        self.swept_at = 0.0
        self.pid = os.getpid()
        # namespaces, cgroups, OOM watches, spare children (their roots' scratch over owner_dir)
        self.isolation = Supervisor(self._become_agent, spare_dir=owner_dir, outside=outside, niceness=niceness)

    def serve(self) -> None:
        _linux.become_subreaper()
        signal.signal(signal.SIGTERM, lambda *_: self._shutdown_and_exit())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, which stops its sandboxes
        rfd, wfd = os.pipe()  # SIGCHLD wakes the selector through this pipe
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        self.isolation.sel = sel
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(rfd, selectors.EVENT_READ, "chld")
        self.control.send(_wire.encode(_wire.hello(pid=os.getpid())))
        _preimport()  # after the hello: the owner goes on while this ~13 ms import runs
        # what the template holds from here on is shared by every child it forks: out of the
        # collector's reach, a collection in a child never writes to (and so copies) those pages
        gc.freeze()
        # Nor does the template collect while it forks: a collection writes the header of every
        # object it walks, and each page so written is copied, for good, into the agents forked
        # before it (+0.3 MiB in a run of a dozen agents). It collects when idle (agents: gc.enable).
        gc.disable()
        while True:
            exited = []
            events = sel.select(self._wait_seconds())
            if not events and not self.sweep_due and gc.get_count()[0]:
                gc.collect()  # (a second with nothing to do, and objects made since the last one)
            for key, _ in events:
                if key.data == "chld":
                    self.sweep_due = True
                    try:
                        os.read(rfd, 4096)
                    except BlockingIOError:
                        pass
                elif isinstance(key.data, tuple) and key.data[0] == "exit":
                    exited.append(key.data[1])
                elif key.data != "control":
                    self.isolation.fired(key.data)
                elif not self._read_control():
                    self._shutdown_and_exit()
            self._reap(exited)
            self.isolation.refill()  # after the spawned reply: a spare for the next sandbox

    def _read_control(self) -> bool:
        """Take every request waiting on the control socket (up to ``SPAWN_BATCH``), fork the agents
        of all the spawns among them back to back, then answer them: see ``SPAWN_BATCH``. A lone
        spawn whose agent would be forked alone waits up to ``PAIR_WAIT_MS`` for company (and in
        vain, a spare is forked beside it)."""
        spawns: list[tuple[dict, int]] = []
        alive, waited = self._take(spawns), False
        if alive and len(spawns) == 1 and self.isolation.alone(spawns[0][0]["config"]):
            if self.control_ready.poll(PAIR_WAIT_MS):
                alive = self._take(spawns)
            else:
                waited = True  # (then a spare is forked beside it however many there are)
        if spawns:  # (in each forked child, this becomes its agent and never returns)
            pids = self.isolation.fork_all([(frame["config"], sock_fd) for frame, sock_fd in spawns], waited)
            for (frame, sock_fd), pid in zip(spawns, pids):
                self._spawned(frame, sock_fd, pid)
        return alive

    def _take(self, spawns: list[tuple[dict, int]]) -> bool:
        """Read one request (one is waiting), then those waiting already, up to ``SPAWN_BATCH``
        spawns in all, into ``spawns``; False at EOF (the owner is gone)."""
        more = False
        while len(spawns) < SPAWN_BATCH and (not more or self.control_ready.poll(0)):
            more = True
            try:  # (recv_fds ignores its flags argument: no MSG_DONTWAIT, hence the poll)
                data, fds, _flags, _addr = socket.recv_fds(self.control, _wire.MAX_FRAME_BYTES, 4)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return False
            if not data:
                return False
            frame = _wire.decode_body(data[_wire.HEADER_SIZE:])
            if frame["t"] == "spawn" and fds:
                spawns.append((frame, fds.pop(0)))
            for fd in fds:
                os.close(fd)
        return True

    def _spawned(self, frame: dict, sock_fd: int, pid: int) -> None:
        config = frame["config"]
        os.close(sock_fd)
        self.agents[pid] = config["dir"]
        if config.get("namespaces"):
            self.pid_ns_agents.add(pid)
        self._watch_exit(pid)
        self.control.send(_wire.encode({"t": "spawned", "id": frame["id"], "pid": pid,
                                        **self.isolation.spawned(pid)}))

    def _become_agent(self, config: dict, sock_fd: int) -> None:
        """In a child of the template: become the sandbox's agent. Never returns."""
        code = 0
        try:
            # The template's collector is off (see serve): on again, but first everything tracked
            # now, the template's objects since its own freeze, goes where no collection here walks
            # (and so copies) it; a splice of lists, not a walk.
            gc.freeze()
            gc.enable()
            self.isolation.unboost()
            os.setsid()
            _linux.set_parent_death_signal(signal.SIGTERM)
            # (a spare checked before it left the host's /proc, its parent-death signal armed since)
            if self.isolation.built is None and parent_pid() != self.pid:
                os._exit(1)
            _linux.become_subreaper()
            signal.set_wakeup_fd(-1)  # (before enter() closes the template's wake-up pipe)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):  # (_signal: see agent.run)
                _signal.signal(sig, _signal.SIG_DFL)
            self.control.detach()  # (its number is closed by enter(), or was by the spare this was)
            self.isolation.enter(config, sock_fd)
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.sandbox_nofile, hard), hard))
            for name, value in (config.get("rlimits") or {}).items():
                resource.setrlimit(_RLIMITS[name], (value, value))
            # (not clear() and update(): a third more Python, and every page it touches is a private
            # copy in each sandbox: ~0.1 MiB)
            for name in list(os.environ):
                del os.environ[name]
            for name, value in config["env"].items():
                os.environ[name] = value
            os.chdir(config["cwd"])
            agent.serve(socket.socket(fileno=sock_fd), config)
        except BaseException:
            code = 1
            import traceback

            traceback.print_exc()  # the owner's stderr: an agent crash is a sandpool bug
        finally:
            os._exit(code)

    def _watch_exit(self, pid: int) -> None:
        """Hear of agent ``pid``'s exit through a pidfd of its own (where the kernel has them)."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):  # before Linux 5.3: the SIGCHLD sweep finds it
            return
        self.exit_fds[pid] = fd
        assert self.isolation.sel is not None
        self.isolation.sel.register(fd, selectors.EVENT_READ, ("exit", pid))

    def _unwatch_exit(self, pid: int) -> None:
        fd = self.exit_fds.pop(pid, None)
        if fd is not None:
            assert self.isolation.sel is not None
            self.isolation.sel.unregister(fd)
            os.close(fd)

    def _wait_seconds(self) -> float:
        """How long the loop may wait for events: until the next sweep is allowed, if one is due."""
        if not self.sweep_due:
            return 1.0
        return max(0.0, self.swept_at + SWEEP_SECONDS - time.monotonic())

    def _reap(self, exited: list[int]) -> None:
        """Reap the agents in ``exited`` (their pidfds said so: one ``waitpid`` each, which does not
        walk the list of every child) and, after a SIGCHLD, at most every ``SWEEP_SECONDS``, every
        other exited child; report each agent's end."""
        found = [(pid, status) for pid, status in ((pid, _linux.reap(pid)) for pid in exited) if status is not None]
        now = time.monotonic()
        if self.sweep_due and (now - self.swept_at >= SWEEP_SECONDS or not self.exit_fds):
            self.sweep_due, self.swept_at = False, now
            found += _linux.reap_all()  # (the rest: orphans re-parented here, spares, all already dead)
        reaped = [(pid, status, self.agents.pop(pid)) for pid, status in found if pid in self.agents]
        for pid, _status, _dir in reaped:
            self._unwatch_exit(pid)
        if any(pid not in self.pid_ns_agents for pid, _status, _dir in reaped):
            self._kill_orphans()  # once per batch, not per agent: it reads the list of every child
        for pid, status, sandbox_dir in reaped:
            self.pid_ns_agents.discard(pid)
            code, sig = _linux.exit_code(status)
            extra = self.isolation.finish(pid)  # kill and remove its cgroup; did it run out of memory?
            _remove_dir(sandbox_dir)
            try:
                self.control.send(_wire.encode({"t": "reaped", "pid": pid, "code": code, "signal": sig, **extra}))
            except OSError:
                pass

    def _kill_orphans(self) -> None:
        """Kill direct children that are not agents: descendants of a dead agent, re-parented here."""
        for child in _linux.children(os.getpid()):
            if child not in self.agents and child not in self.isolation.spares:
                _linux.kill_descendants(child, reap=False)
                _linux.kill_quietly(child)

    def _shutdown_and_exit(self) -> None:
        if os.getpid() != self.pid:
            # a child forked (confine._sys.fork) while the template's SIGTERM waited to be handled
            # runs the handler too, before it sets its own: that is the template's to do, not its
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in self.agents:
            _linux.kill_quietly(pid, signal.SIGTERM)
        deadline = time.monotonic() + _SHUTDOWN_WAIT_SECONDS
        while self.agents and time.monotonic() < deadline:
            for pid, _ in _linux.reap_all():
                self.agents.pop(pid, None)
            time.sleep(0.005)
        _linux.kill_descendants(os.getpid())
        self.isolation.finish_all()
        for sandbox_dir in self.agents.values():
            shutil.rmtree(sandbox_dir, ignore_errors=True)
        shutil.rmtree(self.owner_dir, ignore_errors=True)
        os._exit(0)


def _remove_dir(path: str) -> None:
    """Remove a sandbox's directory, if it has one on the host (the namespaces level's has none
    unless it uses a bridge network): no ext4 metadata work in this serial loop when not needed."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _preimport() -> None:
    """Import cloudpickle once here, so that every forked agent's call worker has it for free."""
    try:
        importlib.import_module("cloudpickle")
    except ImportError:  # the worker will report it when a call arrives
        pass


def main(control_fd: int, owner_dir: str) -> None:
    """Entry point, called by the bootstrap line the runtime passes to ``python -c``."""
    control = socket.socket(fileno=control_fd)
    # two fds per sandbox here (its socket, its cgroup's OOM watch) and more per spare: raise the soft
    # limit; sandboxes get back the one the client had before it raised its own (or ours, unset)
    inherited = _linux.raise_fd_limit()
    sandbox_nofile = int(os.environ.get("SANDPOOL_SANDBOX_NOFILE") or inherited)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(-20, niceness - PRIORITY_BOOST))
    except OSError:  # not root: the template runs at its owner's priority
        pass
    outside = userns.enter() if os.environ.get(userns.ENV) == "1" else None  # rootless: see userns
    Template(control, owner_dir, sandbox_nofile, outside, niceness).serve()
