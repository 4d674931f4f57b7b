"""Remote function calls inside a sandbox: the agent's relay and the worker process it forks.

The agent stays responsive (exec, files, cancel) because calls never run in it: on the first
``call`` it forks one worker process and relays frames both ways. It hands the worker everything
queued whenever the worker is idle (so calls that arrive together run as one batch), and keeps the
rest queued, where a cancel simply drops them. The worker runs its calls in order and answers each
one with ``result`` or ``error``.

Cancelling a call the worker holds: the agent sends ``cancel`` on the worker's socket, then SIGINT.
The worker reads the cancel in its signal handler: a call not started yet is answered "cancelled"
at once, the running one gets KeyboardInterrupt. If the cancelled call is not answered within
``CANCEL_GRACE_SECONDS`` (user code that swallows KeyboardInterrupt, or blocks in C), the worker is
SIGKILLed: the cancelled calls are answered "cancelled", any other call it held "lost" (never
started or cut short through no fault of its own: the client resubmits it without counting a retry).
A respawned worker gets each function's bytes again from the relay's cache.

Direct mode (local sandboxes): a ``worker`` frame asks for a worker listening at a path in the
sandbox (answered ``started``); the client connects there and sends calls straight to it. The agent
then only forwards cancels (frames with ``call: True``) on the worker's socket, with SIGINT, and
waits for the worker's ``ack`` of each; when the worker exits it answers the ``worker`` request
with ``exit`` (``killed: True`` when it was killed for ignoring a cancel).

Results are plain data (``_plain``), or a cloudpickle when the call frame says ``pickle`` (the
caller opted in). Error kinds sent to the owner: ``user`` (the function raised; ``exc`` is its
plain description, ``type_name`` and ``traceback`` always, ``data`` its pickle only with
``pickle``), ``serialization`` (arguments would not unpickle, or the result is not plain data or
would not pickle), ``timeout``, ``cancelled``, ``lost``, ``worker_died`` (``code``/``signal``: the
worker died under the call, an infrastructure failure), ``protocol``.

Never imports trio; cloudpickle is imported in the worker only (the template pre-imports it).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from . import wire as _wire
from . import files as _files, linux as _linux, worker as _worker
from .framesock import FrameSocket

#: How long a cancelled call may take to stop after SIGINT before its worker is SIGKILLed.
CANCEL_GRACE_SECONDS = 1.0
#: Past a call's own timeout (enforced in the worker), how long until the relay kills the worker.
TIMEOUT_GRACE_SECONDS = 1.0


class _WorkerProc:
    """The relay's view of one forked worker."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.chan = FrameSocket(sock)
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.keys: set[bytes] = set()  # function keys whose bytes this worker has received
        self.status: int | None = None


class CallRelay:
    """The agent's side of calls: a queue, one lazily forked worker, cancellation and timeouts.

    ``send`` forwards a frame to the owner; ``sel`` is the agent's selector, where the worker's
    socket and pidfd are registered with data ``("call", "sock")`` / ``("call", "exit")``.
    """

    def __init__(self, send: Callable[[dict], None], sel: selectors.BaseSelector, config: dict) -> None:
        self._send = send
        self._sel = sel
        self._config = config
        self.queue: dict[int, dict] = {}  # id -> call frame waiting for the worker (FIFO)
        self.handed: dict[int, dict] = {}  # id -> call frame the worker holds, in run order
        self.fns: dict[bytes, bytes] = {}  # fn_key -> cloudpickled function
        self.worker: _WorkerProc | None = None
        self.kill_at: dict[int, float] = {}  # cancelled call held by the worker -> kill deadline
        self.timed_out: set[int] = set()
        self.head_since = 0.0  # when the oldest handed call became the one running
        self.direct_id: int | None = None  # the ``worker`` request of a direct-mode worker

    @property
    def busy(self) -> bool:
        """Calls queued or running, as far as the agent can tell: a direct-mode worker counts as
        busy while it lives (its calls do not pass here)."""
        return bool(self.queue or self.handed or self.direct_id is not None)

    # -- from the owner ----------------------------------------------------------------------

    def submit(self, frame: dict) -> None:
        if self.direct_id is not None:
            self._answer(frame["id"], "protocol", "this sandbox's worker takes calls directly, not through the agent")
            return
        key = frame.get("fn_key") or b""
        if frame["fn"]:
            self.fns[key] = frame["fn"]
        elif key not in self.fns:
            self._answer(frame["id"], "protocol", "the agent has no function for this fn_key; send its bytes")
            return
        self.queue[frame["id"]] = frame
        self.pump()

    def start_direct(self, frame: dict) -> None:
        """Fork a worker that listens at ``frame["listen"]`` (a sandbox path) for the client."""
        if self.worker is not None and (self.handed or self.direct_id is not None):
            self._answer(frame["id"], "protocol", "the sandbox's call worker is busy or taken")
            return
        if self.worker is not None:
            self.kill()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dirfd = -1
        try:
            path = _files.confine(self._config["root"], self._config["cwd"], frame["listen"])
            dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
            # through /proc/self/fd: a socket address has 108 bytes, a sandbox's path may have more
            listener.bind(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
            os.chmod(path, 0o600)
            listener.listen(1)
        except (OSError, _files.FileOpError) as exc:
            listener.close()
            self._answer(frame["id"], "protocol", f"cannot listen at {frame['listen']!r}: {exc}")
            return
        finally:
            if dirfd >= 0:
                os.close(dirfd)
        self._spawn((listener, path))
        listener.close()
        self.direct_id = frame["id"]
        self._send({"t": "started", "id": frame["id"], "pid": self.worker.pid})  # type: ignore[union-attr]

    def cancel(self, frame: dict) -> bool:
        """Cancel a call; False if the frame is no call's (it may be an exec's). With ``steal``,
        only a call that has not started is concerned: it is given back (answered "lost")."""
        call_id, steal = frame["id"], bool(frame.get("steal"))
        if frame.get("call") and self.direct_id is not None:
            self._interrupt(call_id, steal)
            return True
        if call_id == self.direct_id:  # the client gives up on its direct worker
            self.kill()
            return True
        frame = self.queue.pop(call_id, None)
        if frame is not None:
            self._discard_args(frame)
            if steal:
                self._answer(call_id, "lost", "given back before it started")
            else:
                self._answer(call_id, "cancelled", "cancelled before it started")
            return True
        if call_id not in self.handed:
            return steal  # a steal of a call answered meanwhile: nothing to do
        self._interrupt(call_id, steal)
        return True

    def _interrupt(self, call_id: int, steal: bool = False) -> None:
        """Tell the worker (cancel frame, then SIGINT). A cancel not answered in time kills the
        worker; a steal never does (the worker gives the call back only if it has not started)."""
        if self.worker is None:
            return
        if not steal:
            if call_id in self.kill_at:
                return
            self.kill_at[call_id] = time.monotonic() + CANCEL_GRACE_SECONDS
        try:
            self.worker.chan.send({"t": "cancel", "id": call_id, **({"steal": True} if steal else {})})
        except OSError:
            pass  # the worker is dying; its exit event fails what it held
        _linux.kill_quietly(self.worker.pid, signal.SIGINT)

    # -- the worker ------------------------------------------------------------------------------

    def pump(self) -> None:
        """Hand every queued call to the worker if it is idle (forking it if needed)."""
        if self.handed or not self.queue:
            return
        if self.worker is None:
            self._spawn()
        worker = self.worker
        assert worker is not None
        out = []
        for call_id, frame in self.queue.items():
            key = frame.get("fn_key") or b""
            if key in worker.keys:
                frame = {**frame, "fn": b""}
            else:
                frame = {**frame, "fn": self.fns[key]}
                worker.keys.add(key)
            out.append(_wire.encode(frame))
            self.handed[call_id] = frame
        self.queue.clear()
        self.head_since = time.monotonic()
        try:
            worker.chan.sock.sendall(b"".join(out))
        except OSError:
            pass  # it died: its exit event fails what it held

    def _spawn(self, listener: tuple[socket.socket, str] | None = None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # A cancel's SIGINT may come before the worker has its handler: held until it does (the
        # worker unblocks it), instead of killing it with SIGINT's default action.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the worker: never returns
            code = 1
            try:
                ours.close()
                _worker.main(theirs, self._config, listener)
                code = 0
            except BaseException:  # a bug of the worker's own: say where (os._exit would lose it)
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        worker = self.worker = _WorkerProc(pid, ours)
        self._sel.register(ours, selectors.EVENT_READ, ("call", "sock"))
        if worker.pidfd is not None:
            self._sel.register(worker.pidfd, selectors.EVENT_READ, ("call", "exit"))

    def on_event(self, what: str) -> None:
        """The agent's selector saw the worker's socket readable or the worker exit."""
        if what == "sock":
            self._read_worker()
        else:
            self._worker_exited()

    def _read_worker(self) -> None:
        worker = self.worker
        if worker is None:
            return
        frames = worker.chan.read_available()
        if frames is None:  # EOF: the worker is exiting; its pidfd (or the poll) reports the rest
            self._unwatch(worker.chan.sock)
            return
        for frame in frames:
            call_id = frame["id"]
            if frame["t"] == "ack":  # direct mode: a cancelled call is answered
                self.kill_at.pop(call_id, None)
                continue
            if frame["t"] == "ask":  # user code calls an actor through the client (see actors.py)
                self._send({**frame, "id": self.direct_id if self.direct_id is not None else frame["id"]})
                continue
            was_head = self.handed and next(iter(self.handed)) == call_id
            if self.handed.pop(call_id, None) is None:
                continue
            self.kill_at.pop(call_id, None)
            if was_head:
                self.head_since = time.monotonic()
            self._send(frame)
        self.pump()

    def _worker_exited(self) -> None:
        worker = self.worker
        if worker is None:
            return
        status = _linux.reap(worker.pid)
        if status is None:
            return
        try:  # answers it sent before dying still count
            worker.chan.sock.setblocking(False)
            self._read_worker()
        except OSError:
            pass
        self.worker = None
        for fd in (worker.pidfd, worker.chan.sock):
            if fd is not None:
                self._unwatch(fd)
        if worker.pidfd is not None:
            os.close(worker.pidfd)
        worker.chan.close()
        code, sig = _linux.exit_code(status)
        if self.direct_id is not None:  # the client fails what it had sent; tell it how
            self._send({"t": "exit", "id": self.direct_id, "code": code, "signal": sig, "killed": bool(self.kill_at)})
            self.direct_id = None
        how = f"killed by signal {sig}" if sig else f"exited with code {code}"
        for index, call_id in enumerate(list(self.handed)):
            self._discard_args(self.handed[call_id])  # the worker removes the files it read
            if call_id in self.kill_at:
                self._answer(call_id, "cancelled", "cancelled; its worker was killed after ignoring SIGINT")
            elif call_id in self.timed_out:
                self._answer(call_id, "timeout", "timed out; its worker was killed after ignoring the timeout")
            elif index == 0 and not self.kill_at and not self.timed_out:
                self._answer(call_id, "worker_died", f"the function's worker process {how}", code=code, signal=sig)
            else:
                self._answer(call_id, "lost", f"the worker was killed ({how}) before this call finished")
        self.handed.clear()
        self.kill_at.clear()
        self.timed_out.clear()
        self.pump()

    def tell(self, frame: dict) -> None:
        """The client's answer to a worker's ``ask``: to the worker, if it still lives."""
        if self.worker is not None:
            try:
                self.worker.chan.send(frame)
            except OSError:
                pass  # it died: its exit event says so

    def _unwatch(self, fd) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest moment ``tick`` has something to do, or None."""
        deadlines = list(self.kill_at.values())
        head = self._head_deadline()
        if head is not None:
            deadlines.append(head)
        if self.worker is not None and self.worker.pidfd is None:
            deadlines.append(time.monotonic() + 0.05)  # no pidfd: poll for its exit
        return min(deadlines) if deadlines else None

    def _head_deadline(self) -> float | None:
        if not self.handed:
            return None
        head = next(iter(self.handed.values()))
        timeout = head.get("timeout")
        return None if timeout is None else self.head_since + timeout + TIMEOUT_GRACE_SECONDS

    def tick(self, now: float) -> None:
        """Kill a worker that overstayed a cancel or a timeout; poll exits without pidfd."""
        worker = self.worker
        if worker is None:
            return
        if worker.pidfd is None:
            self._worker_exited()
            if self.worker is None:
                return
        head = self._head_deadline()
        if head is not None and now >= head:
            self.timed_out.add(next(iter(self.handed)))
            self.kill()
        elif any(now >= t for t in self.kill_at.values()):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its process group; its exit event answers what it held."""
        if self.worker is not None:
            _linux.killpg_quietly(self.worker.pid, signal.SIGKILL)
            _linux.kill_quietly(self.worker.pid, signal.SIGKILL)

    def _discard_args(self, frame: dict) -> None:
        """Remove the bulk argument file of a call that will not run here (see sandpool._functions.bulk)."""
        if frame.get("args_path"):
            root = self._config.get("root") or "/"
            try:
                os.unlink(os.path.join(root, frame["args_path"].lstrip("/")))
            except OSError:
                pass

    def _answer(self, call_id: int, kind: str, message: str, **extra) -> None:
        self._send({"t": "error", "id": call_id, "kind": kind, "message": message, **extra})
