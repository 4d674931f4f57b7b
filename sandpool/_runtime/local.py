"""LocalRuntime: sandboxes on this machine, forked by a pre-imported template process.

Isolation level ``process``: each sandbox is an agent in its own session with a private root
directory (its filesystem for file operations and its default working directory), a clean
environment plus the spec's variables, and rlimits where ``resources.limits`` map onto them.
The ``namespaces`` and ``oci`` levels (and admission, network, images, cgroups) add their part to
the spawn config through ``sandpool._isolation.host``; see docs/isolation.md.
"""

from __future__ import annotations

import array
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

import trio

from _sandpool_agent import wire as _wire
from _sandpool_agent import linux as _linux
from .._core.channel import FrameChannel
from .._grpc.rawsocket import RawSocketStream
from .._config import SandboxSpec
from .._errors import SandboxFailedError, SandboxUnavailableError
from .._isolation import probe
import _sandpool_agent
from _sandpool_agent.confine import userns
from .._isolation.host import BASE_PATH, Isolation
from .._isolation import pods as _pods
from .._isolation import snapshots as _snapshots
from .._isolation.runners import check_pinning
from .._cwextra import LOCAL_RUNNER_ID
from . import statedir as _statedir
from .contract import Runtime, SandboxRecord

if TYPE_CHECKING:
    from .._images.snapshots import SnapshotRecord

#: What the template reports of a spawned agent: its pid and the cgroup of a spare it took over (or None).
_Spawned = tuple[int, dict[str, Any] | None]

_BOOT = (
    "import sys;"
    "sys.path[:0]=[sys.argv[3]]+sys.argv[4].split(chr(10));"
    "from _sandpool_agent.template import main;main(int(sys.argv[1]),sys.argv[2])"
)
_log = logging.getLogger("sandpool")
_KILL_WAIT_SECONDS = 3.0
_SANDBOX_NOFILE = "SANDPOOL_SANDBOX_NOFILE"  # the soft fd limit sandboxes get (the client's, before raising)


def sandbox_environment(spec: SandboxSpec, sandbox_id: str, root: str) -> dict[str, str]:
    """The clean environment of a sandbox: a few basics, then the spec's variables."""
    python_bin = os.path.dirname(sys.executable)
    return {
        "PATH": f"{python_bin}:{BASE_PATH}",
        "HOME": root,
        "TMPDIR": os.path.join(root, "tmp"),
        "LANG": "C.UTF-8",
        "HOSTNAME": sandbox_id,
        "SANDPOOL_SANDBOX_ID": sandbox_id,
        "SANDPOOL_ROOT": root,
        **dict(spec.environment_variables),
    }


def rlimits(spec: SandboxSpec) -> dict[str, int]:
    """rlimits for the ``process`` level: memory limit -> RLIMIT_DATA, pids limit -> RLIMIT_NPROC."""
    limits: dict[str, int] = {}
    res = spec.resources
    if res is not None:
        if res.memory_limit:
            limits["data"] = int(res.memory_limit)
        if res.pids_limit:
            limits["nproc"] = int(res.pids_limit)
    return limits


class LocalRuntime(Runtime):
    """Sandboxes as local process trees. ``state_dir`` defaults to ``$SANDPOOL_STATE_DIR``."""

    name = "local"

    def __init__(self, state_dir: str | None = None) -> None:
        self.state_dir = state_dir or _statedir.default_state_dir()
        self.owner_dir: str | None = None
        self._records: dict[str, SandboxRecord] = {}
        self._by_pid: dict[int, SandboxRecord] = {}
        self._spawns: dict[int, tuple[trio.Event, list[_Spawned]]] = {}
        self._next_spawn = 0
        self._control: trio.socket.SocketType | None = None
        self._template: subprocess.Popen[bytes] | None = None
        self._send_lock = trio.Lock()
        self._template_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._isolation = Isolation(self.state_dir)  # levels, admission, cgroups

    @property
    def _tasks(self) -> trio.Nursery:
        """The nursery ``open`` gave: the runtime's own tasks run there."""
        if self._nursery is None:
            raise SandboxUnavailableError("the local runtime is not open")
        return self._nursery

    def __repr__(self) -> str:
        live = sum(1 for r in self._records.values() if not r.exited.is_set())
        return f"<LocalRuntime {self.state_dir} live={live}>"

    async def open(self, nursery: trio.Nursery) -> None:
        # one socket per sandbox here: 1,000 sandboxes need more than the usual soft limit of 1,024
        self._sandbox_nofile = _linux.raise_fd_limit()
        _statedir.sweep(self.state_dir)
        _snapshots.store().sweep()  # copies of snapshots a killed client left
        self._nursery = nursery
        await self._start_template()

    async def _start_template(self) -> None:
        """Start the template (again, if an earlier one died) and its control reader."""
        self.owner_dir = _statedir.new_owner_dir(self.state_dir)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_dir = os.path.dirname(os.path.dirname(os.path.abspath(_sandpool_agent.__file__)))  # sys.path's entry for it
        paths = "\n".join(p for p in sys.path if p)
        try:
            self._template = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(child.fileno()), self.owner_dir, package_dir, paths],
                pass_fds=[child.fileno()],
                # Never the client's own stdout/stderr: code in a sandbox can open its agent's
                # descriptors (/proc/1/fd/1) and would write into (or truncate) the client's files.
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={"PATH": BASE_PATH, "LANG": "C.UTF-8", _SANDBOX_NOFILE: str(self._sandbox_nofile),
                     **_rootless_env()},
                close_fds=True,
                start_new_session=True,  # a terminal's Ctrl-C is for the client, which then stops sandboxes
            )
        finally:
            child.close()
        _statedir.record_template(self.owner_dir, self._template.pid)
        self._control = control = trio.socket.from_stdlib_socket(parent)
        hello = await control.recv(65536)
        if not hello:
            raise SandboxUnavailableError("the sandbox template process exited during start-up")
        _wire.check_hello(_wire.decode_body(hello[_wire.HEADER_SIZE:]))
        self._tasks.start_soon(self._read_control, control, self._template, self.owner_dir)
        self._tasks.start_soon(_forward_stderr, self._template)

    async def _ensure_template(self) -> None:
        async with self._template_lock:
            if self._template is not None and self._template.poll() is not None:
                await self._start_template()

    async def _read_control(self, control: trio.socket.SocketType, template: subprocess.Popen[bytes],
                            owner_dir: str) -> None:
        """Route the template's reports. Shielded: it must see every agent reaped while the runtime
        closes; it ends when the template exits or ``aclose`` closes the socket. A template that
        died without cleaning up (SIGKILL) leaves its owner directory: it is removed here."""
        with trio.CancelScope(shield=True):
            await self._read_reports(control)
            with trio.move_on_after(_KILL_WAIT_SECONDS):
                while template.poll() is None:
                    await trio.sleep(0.01)
            if template.poll() is not None and os.path.isdir(owner_dir):
                _statedir.remove_owner_dir(owner_dir)

    async def _read_reports(self, control: trio.socket.SocketType) -> None:
        while True:
            try:
                data = await control.recv(65536)
            except (OSError, trio.ClosedResourceError):
                data = b""
            if not data:
                break
            frame = _wire.decode_body(data[_wire.HEADER_SIZE:])
            if frame["t"] == "spawned":
                event, box = self._spawns.pop(frame["id"])
                box.append((frame["pid"], frame.get("cgroups")))  # and a spare's cgroup, if the sandbox took one over
                event.set()
            elif frame["t"] == "reaped":
                record = self._by_pid.pop(frame["pid"], None)
                if record is not None:
                    record.exit_code, record.exit_signal = frame["code"], frame.get("signal")
                    self._isolation.release(record, frame)
                    record.exited.set()
        # the template is gone: every sandbox it forked is gone with it
        for record in list(self._by_pid.values()):
            self._isolation.release(record)
            record.exited.set()
        self._by_pid.clear()
        for event, _ in self._spawns.values():
            event.set()

    def create(self, spec: SandboxSpec) -> SandboxRecord:
        check_pinning(spec.runner_ids, (LOCAL_RUNNER_ID,), "on this machine")  # its one runner
        sandbox_id = f"sb-{secrets.token_hex(4)}"
        record = SandboxRecord(sandbox_id=sandbox_id, spec=spec, isolation=self._isolation.level(spec))
        self._records[sandbox_id] = record
        return record

    def join_pod(self, record: SandboxRecord, primary: SandboxRecord) -> None:
        _pods.join(record, primary)  # its isolation reads it in prepare

    def _layout(self, record: SandboxRecord) -> dict[str, Any]:
        assert self.owner_dir is not None
        sandbox_dir = os.path.join(self.owner_dir, record.sandbox_id)
        root = os.path.join(sandbox_dir, "root")
        # On the host: the process level's root, the oci level's stage (see namespaces.mount_root);
        # none at the namespaces level, whose tmpfs is mounted over the owner's directory in its own
        # mount namespace (as a spare's is), with its /tmp and working directory made on that tmpfs.
        made = {"process": os.path.join(root, "tmp"), "oci": root}.get(record.isolation)
        if made is not None:
            os.makedirs(made, exist_ok=True)
        cwd = root
        if record.spec.working_dir and record.isolation == "process":
            cwd = os.path.join(root, record.spec.working_dir.lstrip("/"))
            os.makedirs(cwd, exist_ok=True)
        record.extra["dir"], record.root = sandbox_dir, root
        return {
            "sandbox_id": record.sandbox_id,
            "dir": sandbox_dir,
            "root": root,
            "cwd": cwd,
            "env": sandbox_environment(record.spec, record.sandbox_id, root),
            "argv": record.spec.argv(),
            "rlimits": rlimits(record.spec),
            "lifetime": record.spec.max_lifetime_seconds,
            "idle_timeout": record.spec.idle_timeout_seconds,
        }

    async def start(self, record: SandboxRecord) -> FrameChannel:
        if self._control is None or self._closed:
            raise SandboxUnavailableError("the local runtime is closed")
        await self._ensure_template()
        config = self._layout(record)
        assert self.owner_dir is not None  # (``_layout`` checked it: a template runs)
        await self._isolation.prepare(record, config, self.owner_dir)
        try:
            _snapshots.apply(record, config, self.state_dir)  # volumes, and the layers of a snapshot to start from
        except BaseException:
            self._isolation.release(record)
            shutil.rmtree(config["dir"], ignore_errors=True)
            raise
        if record.extra.get("snapshot_locks"):
            self._tasks.start_soon(_snapshots.hold_until_exit, record)  # its layers stay while it runs
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._next_spawn += 1
        spawn_id = self._next_spawn
        try:
            event, box = trio.Event(), list[_Spawned]()  # (the reader fills ``box``, then sets ``event``)
            self._spawns[spawn_id] = (event, box)
            frame = _wire.encode({"t": "spawn", "id": spawn_id, "config": config})
            async with self._send_lock:
                await self._control.sendmsg(
                    [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))]
                )
        except OSError as exc:
            self._spawns.pop(spawn_id, None)
            ours.close()
            self._isolation.release(record)
            shutil.rmtree(config["dir"], ignore_errors=True)
            raise SandboxUnavailableError(f"the sandbox template is unreachable ({exc}); try again") from exc
        finally:
            theirs.close()
        await event.wait()
        if not box:
            ours.close()
            self._isolation.release(record)
            raise SandboxUnavailableError("the sandbox template exited; the runtime cannot start sandboxes")
        record.agent_pid, cgroups = box[0]
        if cgroups is not None:
            record.extra["cgroups"] = cgroups
        self._by_pid[record.agent_pid] = record
        channel = FrameChannel(RawSocketStream(ours))  # no pass through the loop when the bytes are there
        try:
            await channel.handshake()
        except SandboxUnavailableError as exc:
            await channel.aclose()
            raise SandboxFailedError(f"sandbox {record.sandbox_id} failed to start: {exc}",
                                     sandbox_id=record.sandbox_id) from exc
        record.channel = channel
        await self._isolation.started(record, self._tasks)
        return channel

    async def stop(self, record: SandboxRecord, grace_seconds: float) -> None:
        with trio.CancelScope(shield=True):
            if record.agent_pid is None:
                record.exited.set()
                return
            if record.channel is not None and not record.channel.closed:
                with trio.move_on_after(_KILL_WAIT_SECONDS):  # an agent that does not read is killed below
                    try:
                        await record.channel.send({"t": "stop", "grace": float(grace_seconds)})
                    except SandboxUnavailableError:
                        pass
            with trio.move_on_after(grace_seconds + _KILL_WAIT_SECONDS):
                await record.exited.wait()
            if not record.exited.is_set():  # escalate: the agent did not leave in time
                _linux.kill_quietly(record.agent_pid, signal.SIGKILL)
                with trio.move_on_after(_KILL_WAIT_SECONDS):
                    await record.exited.wait()
            if record.channel is not None:
                await record.channel.aclose()

    def list(self) -> list[SandboxRecord]:
        return list(self._records.values())

    async def snapshot(self, record: SandboxRecord, trigger: str = "manual") -> SnapshotRecord:
        return await trio.to_thread.run_sync(_snapshots.capture, record, trigger)

    def open_main_log(self, record: SandboxRecord) -> BinaryIO | None:
        # The agent appends to main.log in its own directory and removes that directory when it ends; an
        # open file keeps the contents readable. Created here if the agent has not opened it yet.
        if record.isolation == "namespaces":  # its directory is /run/sandpool in the sandbox's own root
            directory = f"/proc/{record.agent_pid}/root/run/sandpool" if record.agent_pid else None
        else:
            directory = record.extra.get("dir")
        try:
            fd = os.open(os.path.join(directory, "main.log"), os.O_RDONLY | os.O_CREAT, 0o600) if directory else -1
        except OSError:  # the sandbox is gone already, and its log with it
            return None
        return os.fdopen(fd, "rb", buffering=0) if fd >= 0 else None

    def forget(self, sandbox_id: str) -> None:
        self._records.pop(sandbox_id, None)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            live = [r for r in self._records.values() if r.agent_pid is not None and not r.exited.is_set()]
            async with trio.open_nursery() as nursery:
                for record in live:
                    nursery.start_soon(self.stop, record, 0.0)
            if self._control is not None:
                self._control.close()  # EOF: the template stops anything left and removes the owner dir
            if self._template is not None:
                with trio.move_on_after(_KILL_WAIT_SECONDS):
                    while self._template.poll() is None:
                        await trio.sleep(0.005)
                if self._template.poll() is None:
                    self._template.kill()
                    self._template.wait()
            self._isolation.close(self.owner_dir)


#: What one template (its agents and workers included) may write to the client's log, in all.
STDERR_FORWARD_BYTES = 1 << 20


def _rootless_env() -> dict[str, str]:
    """An ordinary user's template enters a user namespace when the namespaces level works for it."""
    if probe.rootless() and probe.unavailable("namespaces") is None:
        return {userns.ENV: "1", **{k: os.environ[k] for k in (userns.ENV_SUBIDS,) if k in os.environ}}
    return {}


async def _forward_stderr(template: subprocess.Popen[bytes]) -> None:
    """Copy what the template, its agents and their call workers write to stderr (tracebacks of
    crashes) into the ``sandpool`` logger, line by line, at most ``STDERR_FORWARD_BYTES``: a sandbox
    that reaches its agent's stderr can add lines to the client's log, nothing more."""
    stderr = template.stderr
    assert stderr is not None  # (started with stderr=PIPE)
    stream = trio.lowlevel.FdStream(os.dup(stderr.fileno()))
    stderr.close()
    budget, pending = STDERR_FORWARD_BYTES, b""
    async with stream:
        while chunk := await stream.receive_some(65536):
            if budget <= 0:
                continue  # keep draining, so a writer never blocks on a full pipe
            chunk = chunk[:budget]
            budget -= len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                _log.warning("sandbox template %d: %s", template.pid, line[:2000].decode(errors="replace"))
            if budget <= 0:
                _log.warning("sandbox template %d: more output on stderr, not shown", template.pid)

