"""The agent: the root of one sandbox's process tree. Small and dumb: it runs what it is told.

It owns one socket to its owner (the client). It spawns exec'd processes and streams their output,
feeds their stdin, delivers signals, reads and writes files, runs the main command, and enforces the
sandbox's lifetime. When the owner's socket reaches EOF (the owner exited or was SIGKILLed), when
its parent dies (parent-death signal, SIGTERM) or when told to stop, it kills its whole tree (it is
a child subreaper, so orphans come back to it), removes the sandbox directory and exits.

Nothing its owner sends ends it or holds it up: a frame that breaks the wire schema (``_wire.FRAMES``),
or a request that fails in an unforeseen way, is answered with a ``protocol`` error under its id
while the agent serves on; file operations run in threads (``_files.FileWork``); output and stdin
move in windows, so a process nobody reads, or one that never reads, holds a bounded amount.

It never imports trio or grpc. Remote-function calls run in a worker process it forks (``_calls``),
never in the agent itself; only that worker uses cloudpickle (pre-imported by the template).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import _signal
import socket
import time

from . import wire as _wire
from .errors import ProtocolError
from . import calls as _calls, files as _files, linux as _linux, procs as _procs
from .framesock import FrameSocket

MAX_FILE_BYTES = _wire.MAX_FILE_BYTES
EXIT_GRACE_KILL_SECONDS = 2.0
#: After SIGKILL, how long the agent waits to record its processes' exits (one stuck in the kernel
#: must not hold up the teardown).
#: how long the end waits for file operations under way to answer
_FILES_DRAIN_SECONDS = 0.5
_KILLED_REAP_SECONDS = 1.0
#: How long an exec's ``started`` frame may wait to leave with its first output, or to be replaced by
#: its exit: a short command's whole answer then takes one write and wakes the client once, also on
#: a loaded machine where ``true`` takes milliseconds (nothing waits for that frame: it only names the pid).
STARTED_DELAY_SECONDS = 0.05


class _Stop(Exception):
    """Raised inside the loop to leave it: ``reason`` goes into the farewell frame."""

    def __init__(self, reason: str, grace: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.grace = grace


class Agent:
    """One sandbox's agent. ``config`` comes from the runtime's spawn request."""

    def __init__(self, sock: socket.socket, config: dict) -> None:
        self.chan = FrameSocket(sock, lenient=True)  # a bad frame is answered, never the end of the agent
        self.config = config
        self.sandbox_dir: str = config["dir"]
        self.root: str = config["root"]
        self.cwd: str = config["cwd"]
        self.env: dict[str, str] = config["env"]
        self.procs: dict[int, _procs.ExecProcess] = {}
        self.by_fd: dict[int, tuple[str, _procs.ExecProcess]] = {}
        self.sel = selectors.DefaultSelector()
        lifetime = config.get("lifetime")
        self.deadline = time.monotonic() + lifetime if lifetime else None
        self.idle_timeout = config.get("idle_timeout")  # seconds with nothing running and no request
        self.last_active = time.monotonic()
        self.busy = False
        self.main: _procs.ExecProcess | None = None
        self.outbox: list[dict] = []  # frames for the owner, written once per round of the loop
        self.starting: dict[int, tuple[float, dict]] = {}  # exec id -> (send by, its "started" frame)
        self.calls = _calls.CallRelay(self._send, self.sel, config)
        self.files = _files.FileWork()

    # -- setup -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until stopped; always ends with the tree killed and the sandbox dir removed."""
        # (_signal, not signal: signal.signal wraps the old handler in an enum, and the enum machinery
        # it runs is ~20 pages of the template's memory that every agent would write, and so copy)
        _signal.signal(signal.SIGTERM, self._on_sigterm)
        reason, grace = "owner_gone", 0.0
        try:
            self.chan.send(_wire.hello(pid=os.getpid(), sandbox_id=self.config["sandbox_id"]))
            self.sel.register(self.chan.sock, selectors.EVENT_READ, ("owner", None))
            self.sel.register(self.files.fileno(), selectors.EVENT_READ, ("files", None))
            argv = self.config.get("argv")
            if argv:
                self._start_main(argv)
            self._loop()
        except _Stop as stop:
            reason, grace = stop.reason, stop.grace
        except OSError as exc:  # the owner's socket broke mid-send: same as EOF
            reason = "owner_gone"
            if os.environ.get("SANDPOOL_DEBUG"):
                import traceback

                traceback.print_exception(exc)
        finally:
            self._shutdown(reason, grace)

    def _on_sigterm(self, signum, frame) -> None:
        raise _Stop("parent_gone")

    def _start_main(self, argv: list[str]) -> None:
        log = os.open(os.path.join(self.sandbox_dir, "main.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.main = _procs.spawn(0, argv, self.cwd, self.env, stdin=False, output_fd=log)
        except OSError as exc:
            self._send({"t": "main_exit", "code": 127, "message": f"cannot start {argv[0]!r}: {exc.strerror}"})
            raise _Stop("main_exited") from None
        finally:
            os.close(log)
        self._watch(self.main)

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            timeout = self._next_timeout()
            for key, events in self.sel.select(timeout):
                role, proc = key.data
                if role == "owner":
                    self._read_owner()
                elif role == "out":
                    self._read_output(proc, key.fd)
                elif role == "in":
                    self._write_stdin(proc)
                elif role == "exit":
                    self._reap(proc)
                elif role == "call":
                    self.calls.on_event(proc)
                elif role == "files":
                    for answer in self.files.collect():
                        self._send(answer)
            self._flush()  # answers first: what housekeeping finds can wait for the next write
            self._housekeeping()
            self._flush()

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        waits = [p.exited_at + _procs.LINGER_SECONDS - now for p in self.procs.values() if p.exited_at and p.readers]
        if self.deadline is not None:
            waits.append(self.deadline - now)
        if self.idle_timeout:
            waits.append(self.last_active + self.idle_timeout - now)
        if self.main is None and any(p.pidfd is None for p in self.procs.values()):
            waits.append(0.05)  # no pidfd support: poll for exits
        if self.starting:
            waits.append(min(by for by, _ in self.starting.values()) - now)
        call_deadline = self.calls.next_deadline()
        if call_deadline is not None:
            waits.append(call_deadline - now)
        return max(0.0, min(waits)) if waits else None

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise _Stop("max_lifetime", grace=0.0)
        busy = bool(self.procs or self.calls.busy)
        if busy or self.busy:  # running, or just finished: idleness starts now
            self.last_active = now
        self.busy = busy
        if not busy and self.idle_timeout and now - self.last_active >= self.idle_timeout:
            raise _Stop("idle_timeout", grace=0.0)
        self.calls.tick(now)
        for req_id in [i for i, (by, _) in self.starting.items() if by <= now]:
            self.outbox.append(self.starting.pop(req_id)[1])
        for proc in list(self.procs.values()):
            if proc.status is None and proc.pidfd is None:
                self._reap(proc)
            if proc.exited_at and proc.readers and not proc.paused and now - proc.exited_at >= _procs.LINGER_SECONDS:
                for fd in list(proc.readers):  # background children still hold the pipes: stop waiting
                    self._unwatch(fd)
                    proc.close_reader(fd)
            self._maybe_finish(proc)

    def _read_owner(self) -> None:
        frames = self.chan.read_available()
        if frames is None:
            raise _Stop("owner_gone")
        self.last_active = time.monotonic()
        for frame in frames:
            if isinstance(frame, ProtocolError):  # framing is length-prefixed: the next frame is whole
                self._refuse(frame.frame, str(frame))
            else:
                self._dispatch(frame)

    def _dispatch(self, frame: dict) -> None:
        """Serve one valid frame. Whatever it asks, the agent answers and goes on: a request that
        fails in an unforeseen way gets an error answer (only a stop, or the owner gone, ends it)."""
        kind = frame["t"]
        if kind not in _wire.TO_AGENT:
            self._refuse(frame, f"the agent does not accept {kind!r} frames")
            return
        try:
            getattr(self, f"_on_{kind}")(frame)
        except _Stop:
            raise
        except Exception as exc:
            if self.chan.broken:
                raise
            self._refuse(frame, f"the agent could not serve this {kind!r} frame: {exc!r}"[:2000])

    def _refuse(self, frame: object, message: str) -> None:
        """Answer a bad request with a ``protocol`` error under its id (0 when it has none)."""
        req_id = frame.get("id") if isinstance(frame, dict) else None
        if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id < 2**63:
            req_id = 0
        self._send({"t": "error", "id": req_id, "kind": "protocol", "message": message})

    def _send(self, frame: dict) -> None:
        """Queue a frame for the owner (written at the end of this round); a process's first frame
        takes its pending ``started`` frame along, ahead of it, unless it is its exit, which says all
        that one would (a command that ends at once is answered with one frame)."""
        if self.starting:
            start = self.starting.pop(frame.get("id"), None)
            if start is not None and frame["t"] != "exit":
                self.outbox.append(start[1])
        self.outbox.append(frame)

    def _flush(self) -> None:
        """Write the queued frames in one go; OSError (the owner is gone) ends the loop."""
        if self.outbox:
            frames, self.outbox = self.outbox, []
            try:
                self.chan.sock.sendall(b"".join([_wire.encode(f) for f in frames]))
            except OSError:
                self.chan.broken = True
                raise

    # -- exec --------------------------------------------------------------------------------

    def _on_exec(self, frame: dict) -> None:
        req_id, argv = frame["id"], frame["argv"]
        env = {**self.env, **(frame.get("env") or {})}
        cwd = self.cwd
        try:
            if frame.get("cwd"):
                cwd = _files.confine(self.root, self.cwd, frame["cwd"])
            if frame.get("tty"):  # an interactive terminal (Sandbox.shell)
                proc = _procs.spawn_tty(req_id, [str(a) for a in argv], cwd, env, *frame["tty"])
            else:
                proc = _procs.spawn(req_id, [str(a) for a in argv], cwd, env, stdin=bool(frame.get("stdin")))
        except (OSError, _files.FileOpError) as exc:
            code = 126 if isinstance(exc, PermissionError) else 127
            message = getattr(exc, "strerror", None) or str(exc)
            self._send({"t": "output", "id": req_id, "fd": 2,
                        "data": f"sandpool: cannot run {argv[0] if argv else ''!r}: {message}\n".encode()})
            self._send({"t": "exit", "id": req_id, "code": code})
            return
        self.starting[req_id] = (time.monotonic() + STARTED_DELAY_SECONDS, {"t": "started", "id": req_id, "pid": proc.pid})
        self.procs[proc.id] = proc
        if not self._ended_at_once(proc):
            self._watch(proc)

    def _ended_at_once(self, proc: _procs.ExecProcess) -> bool:
        """True if ``proc`` has exited already and its pipes have closed, its answer queued. A short
        command often has by the time posix_spawn returns (the agent waits for its exec, and the child
        often runs to its end before the agent is scheduled again): it then costs no fd registered, no
        round of the loop and no wake-up. False leaves it to the loop as it is (reaped or not, some
        output sent or not: the loop goes on from there)."""
        status = _linux.reap(proc.pid)
        if status is None:
            return False
        self._exited(proc, status, watched=False)
        for stream, data in proc.read_ended():
            self._send_output(proc, stream, data)
        if proc.readers:  # a child of it still holds a pipe: the loop waits for its end
            return False
        self._maybe_finish(proc)
        return True

    def _watch(self, proc: _procs.ExecProcess) -> None:
        self.procs[proc.id] = proc
        for fd in proc.readers:
            self.sel.register(fd, selectors.EVENT_READ, ("out", proc))
        if proc.pidfd is not None and proc.status is None:  # a reaped process's pidfd stays readable
            self.sel.register(proc.pidfd, selectors.EVENT_READ, ("exit", proc))

    def _unwatch(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _read_output(self, proc: _procs.ExecProcess, fd: int) -> None:
        if proc.paused:  # its other pipe filled the window earlier in this round: the client allows no more
            return
        data = _procs.read_pipe(fd)
        if data is None:
            return
        if not data:
            self._unwatch(fd)
            proc.close_reader(fd)
            if not proc.readers and proc.status is None:
                self._reap(proc)  # its pipes closed as it exited: its exit is often in already (one round less)
            self._maybe_finish(proc)
            return
        self._send_output(proc, proc.readers[fd], data)
        if proc.unacked >= _procs.WINDOW_BYTES and not proc.paused:
            proc.paused = True
            for reader in proc.readers:
                self._unwatch(reader)

    def _send_output(self, proc: _procs.ExecProcess, stream: int, data: bytes) -> None:
        """An ``output`` frame of ``proc``'s ``stream`` (1 or 2), counted against its window."""
        self._send({"t": "output", "id": proc.id, "fd": stream, "data": data})
        proc.unacked += len(data)

    def _on_credit(self, frame: dict) -> None:
        proc = self.procs.get(frame["id"])
        if proc is None:
            return
        proc.unacked = max(0, proc.unacked - frame["n"])
        if proc.paused and proc.unacked < _procs.WINDOW_BYTES:
            proc.paused = False
            for fd in proc.readers:
                self.sel.register(fd, selectors.EVENT_READ, ("out", proc))

    def _on_resize(self, frame: dict) -> None:
        proc = self.procs.get(frame["id"])
        if proc is not None and proc.stdin_fd is not None and proc.status is None:
            try:
                _procs.set_window(proc.stdin_fd, frame["cols"], frame["rows"])
            except OSError:
                pass  # not a terminal (a plain exec), or it is closing: nothing to resize

    def _on_stdin(self, frame: dict) -> None:
        proc = self.procs.get(frame["id"])
        if proc is None:
            return
        data = frame["data"]
        if proc.stdin_fd is None:  # it closed its stdin: the bytes are dropped, and taken all the same
            if data:
                self._send({"t": "stdin_taken", "id": proc.id, "n": len(data)})
            return
        if len(proc.stdin_pending) + len(data) > _wire.STDIN_WINDOW_BYTES + _wire.STDIN_CHUNK_BYTES:
            self._refuse(frame, f"{len(data)} bytes of stdin for a process that has not taken the "
                                f"{len(proc.stdin_pending)} before them; wait for 'stdin_taken' (the window is "
                                f"{_wire.STDIN_WINDOW_BYTES} bytes)")
            return
        proc.stdin_pending += data
        proc.stdin_eof = proc.stdin_eof or bool(frame.get("eof"))
        self._write_stdin(proc)

    def _write_stdin(self, proc: _procs.ExecProcess) -> None:
        fd = proc.stdin_fd
        pending = proc.flush_stdin()
        if proc.stdin_taken:
            self._send({"t": "stdin_taken", "id": proc.id, "n": proc.stdin_taken})
            proc.stdin_taken = 0
        if fd is None:
            return
        if pending:
            if fd not in self.sel.get_map():
                self.sel.register(fd, selectors.EVENT_WRITE, ("in", proc))
        else:
            self._unwatch(fd)

    def _reap(self, proc: _procs.ExecProcess) -> None:
        if proc.status is not None:  # reaped earlier in this round (its pidfd's event was already out)
            return
        status = _linux.reap(proc.pid)
        if status is not None:
            self._exited(proc, status)
            self._maybe_finish(proc)

    def _exited(self, proc: _procs.ExecProcess, status: int, watched: bool = True) -> None:
        """Record that ``proc`` exited with wait ``status`` (reaped): stop watching its exit and its
        stdin (not ``watched``: nothing of it was registered yet)."""
        proc.status = status
        proc.exited_at = time.monotonic()
        if proc.popen is not None:
            proc.popen.returncode = 0  # reaped here; keep Popen from waiting on a recycled pid
        if proc.pidfd is not None and watched:
            self._unwatch(proc.pidfd)
        if proc.stdin_fd is not None:
            if watched:
                self._unwatch(proc.stdin_fd)
            proc.close_stdin()

    def _maybe_finish(self, proc: _procs.ExecProcess) -> None:
        if not proc.finished or self.procs.get(proc.id) is not proc:
            return
        del self.procs[proc.id]
        proc.close_all()
        code, sig = _linux.exit_code(proc.status)
        if proc is self.main:
            self._send({"t": "main_exit", "code": code, "signal": sig})
            raise _Stop("main_exited", grace=1.0)
        self._send({"t": "exit", "id": proc.id, "code": code, "signal": sig})

    def _on_signal(self, frame: dict) -> None:
        proc = self.procs.get(frame["id"])
        if proc is not None:
            proc.signal(frame["sig"])

    def _on_call(self, frame: dict) -> None:
        self.calls.submit(frame)

    def _on_told(self, frame: dict) -> None:
        self.calls.tell(frame)

    def _on_worker(self, frame: dict) -> None:
        self.calls.start_direct(frame)

    def _on_cancel(self, frame: dict) -> None:
        if self.calls.cancel(frame):
            return
        proc = self.procs.get(frame["id"])
        if proc is not None:
            proc.signal(signal.SIGKILL)

    # -- files, liveness, stop ---------------------------------------------------------------

    def _on_read_file(self, frame: dict) -> None:
        root, cwd, path, special = self.root, self.cwd, frame["path"], bool(frame.get("special"))
        if "offset" in frame:  # one chunk of a streamed read
            offset, length = frame["offset"], frame.get("length", MAX_FILE_BYTES)
            self.files.submit(frame["id"], path, lambda: _files.read_range(root, cwd, path, offset, length))
            return
        self.files.submit(frame["id"], path, lambda: _files.read_file(root, cwd, path, MAX_FILE_BYTES, special))

    def _on_write_file(self, frame: dict) -> None:
        root, cwd, path, data = self.root, self.cwd, frame["path"], frame["data"]
        mode, special = frame.get("mode", 0o644), bool(frame.get("special"))
        if "offset" in frame:  # one chunk of a streamed write
            offset = frame["offset"]
            self.files.submit(frame["id"], path, lambda: _files.write_at(root, cwd, path, data, offset, mode))
            return
        self.files.submit(frame["id"], path, lambda: _files.write_file(root, cwd, path, data, mode, MAX_FILE_BYTES,
                                                                        special))

    def _on_ping(self, frame: dict) -> None:
        self._send({"t": "pong", "id": frame["id"]})

    def _on_stop(self, frame: dict) -> None:
        raise _Stop("stopped", grace=float(frame["grace"]))

    def _on_hello(self, frame: dict) -> None:
        _wire.check_hello(frame)

    def _collect_exits(self, deadline: float) -> None:
        """Record the wait status of each exec'd process (and the main one) that ends before ``deadline``."""
        while True:
            for pid, status in _linux.reap_all():
                for proc in self.procs.values():
                    if proc.pid == pid:
                        proc.status = status
            running = [(p.pid, p.pidfd) for p in self.procs.values() if p.status is None]
            left = deadline - time.monotonic()
            if not running or left <= 0:
                return
            _linux.wait_for_exit(running, left)  # wakes as soon as one exits, not on a 10 ms tick

    def _shutdown(self, reason: str, grace: float) -> None:
        """Escalating teardown: SIGTERM every group, wait ``grace``, SIGKILL the whole tree."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # file operations that finished before the end (a write the main command was waiting for,
        # say) answer ahead of it: their effects happened first
        self.outbox[:0] = [start for _, start in self.starting.values()] + self.files.drain(_FILES_DRAIN_SECONDS)
        self.starting.clear()
        try:
            self._flush()  # what the loop had queued (a main_exit, say) goes out before anything else
        except OSError:
            self.outbox.clear()
        for proc in self.procs.values():
            proc.signal(signal.SIGTERM)
        self._collect_exits(time.monotonic() + grace)
        for proc in self.procs.values():
            proc.signal(signal.SIGKILL)
        self._collect_exits(time.monotonic() + _KILLED_REAP_SECONDS)  # else the sweep below reaps them unrecorded
        _linux.kill_descendants(os.getpid())
        main_status = self.main.status if self.main is not None else None
        for proc in self.procs.values():
            proc.close_all()
        if reason != "owner_gone":
            try:
                farewell = {"t": "bye", "reason": reason}
                if main_status is not None and reason != "main_exited":
                    farewell["code"] = _linux.exit_code(main_status)[0]
                self._send(farewell)
                self._flush()
            except OSError:
                pass
        if not self.config.get("namespaces"):  # (namespaced, it is on the sandbox's own tmpfs: gone with it)
            shutil.rmtree(self.sandbox_dir, ignore_errors=True)
        self.chan.close()


def serve(sock: socket.socket, config: dict) -> None:
    """Entry point in the freshly forked sandbox process."""
    Agent(sock, config).run()
