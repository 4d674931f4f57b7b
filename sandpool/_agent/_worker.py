"""The call worker: a process forked by the agent that runs cloudpickled functions, one at a time.

It reads ``call`` and ``cancel`` frames from its socket to the agent and answers every call with
one ``result`` or ``error`` frame (see ``_calls`` for the kinds). Answers of a batch are buffered
and sent together, at most ``FLUSH_SECONDS`` late, so that thousands of tiny calls cost a handful
of writes.

Interruption is by signal, and only while user code runs: SIGINT (sent by the agent after a
``cancel`` frame) raises KeyboardInterrupt in the function if its call was cancelled, and SIGALRM
(armed from the call's ``timeout``) raises the private ``_TimedOut``. Outside user code the
handlers only note the signal, so the worker's own bookkeeping is never cut in half.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import time
import traceback

from .. import _wire
from . import _linux

#: Longest delay of an answer kept back to be sent with the next ones.
FLUSH_SECONDS = 0.002


class _Interrupted(KeyboardInterrupt):
    """Raised in user code when its call is cancelled (a KeyboardInterrupt, as Ctrl-C would be)."""


class _TimedOut(BaseException):
    """Raised in user code when its call's ``timeout`` passes (not an Exception: hard to swallow)."""


def main(sock: socket.socket, config: dict) -> None:
    """Entry point in the forked worker: detach from the agent's resources and serve."""
    os.setpgid(0, 0)  # its own group: a kill reaches whatever the function started
    _linux.set_parent_death_signal(signal.SIGKILL)
    fd = sock.fileno()
    os.closerange(3, fd)  # the owner socket, the agent's selector and exec pipes are not ours
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    import cloudpickle  # pre-imported by the template, so this is a dictionary lookup

    Worker(sock, cloudpickle).run()


class Worker:
    def __init__(self, sock: socket.socket, pickler) -> None:
        self.sock = sock
        self.buf = _wire.FrameBuffer()
        self.pickler = pickler
        self.fns: dict[bytes, object] = {}
        self.pending: collections.deque[dict] = collections.deque()
        self.cancelled: set[int] = set()
        self.outbox: list[bytes] = []
        self.flushed_at = time.monotonic()
        self.current: int | None = None
        self.in_user = False
        self.signalled = False

    def run(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGALRM, self._on_alarm)
        while True:
            if not self.pending:
                self.flush()
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                self._take(self.buf.feed(data))
                continue
            if self.signalled:
                self.signalled = False
                self._drain()
            self._run(self.pending.popleft())
            if not self.pending or time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
                self.flush()

    # -- frames --------------------------------------------------------------------------------

    def _take(self, frames: list[dict]) -> None:
        for frame in frames:
            if frame["t"] == "call":
                self.pending.append(frame)
            elif frame["t"] == "cancel":
                self.cancelled.add(frame["id"])

    def _drain(self) -> None:
        """Take the frames already readable, without blocking."""
        while True:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self._take(self.buf.feed(data))

    def _answer(self, frame: dict) -> None:
        self.outbox.append(_wire.encode(frame))

    def _error(self, call_id: int, kind: str, message: str, **extra: object) -> None:
        self._answer({"t": "error", "id": call_id, "kind": kind, "message": message, **extra})

    def flush(self) -> None:
        for stream in (sys.stdout, sys.stderr):  # print() in user code must not wait for exit
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        if self.outbox:
            data, self.outbox = b"".join(self.outbox), []
            self.sock.sendall(data)
        self.flushed_at = time.monotonic()

    # -- one call --------------------------------------------------------------------------------

    def _run(self, frame: dict) -> None:
        call_id = frame["id"]
        if call_id in self.cancelled:
            self.cancelled.discard(call_id)
            self._error(call_id, "cancelled", "cancelled before it started")
            return
        key = frame.get("fn_key") or b""
        what = "function"
        try:
            if frame["fn"]:
                self.fns[key] = self.pickler.loads(frame["fn"])
            fn = self.fns[key]
            what = "arguments"
            args, kwargs = self.pickler.loads(frame["args"])
        except BaseException as exc:  # noqa: BLE001 - any unpickling failure is reported, not fatal
            self._error(call_id, "serialization", f"the {what} could not be unpickled in the sandbox: "
                        f"{type(exc).__name__}: {exc}", traceback=_format(exc))
            return
        timeout = frame.get("timeout")
        started = time.perf_counter()
        self.current = call_id
        try:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            self.in_user = True
            try:
                value = fn(*args, **kwargs)
            finally:
                self.in_user = False
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _Interrupted:
            self._error(call_id, "cancelled", "interrupted by cancellation")
        except _TimedOut:
            self._error(call_id, "timeout", f"the call did not finish within {timeout} s")
        except BaseException as exc:  # noqa: BLE001 - the user's exception travels back
            self._user_error(call_id, exc)
        else:
            micros = int((time.perf_counter() - started) * 1e6)
            try:
                data = self.pickler.dumps(value, protocol=5)
            except BaseException as exc:  # noqa: BLE001
                self._error(call_id, "serialization", f"the result ({type(value).__module__}."
                            f"{type(value).__qualname__}) could not be pickled: {type(exc).__name__}: {exc}")
            else:
                self._answer({"t": "result", "id": call_id, "data": data, "us": micros})
        finally:
            self.current = None
            self.cancelled.discard(call_id)

    def _user_error(self, call_id: int, exc: BaseException) -> None:
        if exc.__traceback__ is not None:  # drop this module's own frame
            exc.__traceback__ = exc.__traceback__.tb_next
        cls = type(exc)
        try:
            message = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
            message = f"<{cls.__name__} with an unprintable message>"
        extra: dict[str, object] = {"type_name": f"{cls.__module__}.{cls.__qualname__}", "traceback": _format(exc)}
        try:
            extra["data"] = self.pickler.dumps(exc, protocol=5)
        except BaseException:  # noqa: BLE001 - the caller gets a RemoteError with the text instead
            pass
        self._error(call_id, "user", message, **extra)

    # -- signals ---------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame) -> None:
        if not self.in_user:
            self.signalled = True  # the loop reads the cancel frames before the next call
            return
        self._drain()
        waiting = [f for f in self.pending if f["id"] in self.cancelled]
        if waiting:  # answer queued cancelled calls now, so the agent does not kill the running one
            self.pending = collections.deque(f for f in self.pending if f["id"] not in self.cancelled)
            answers = []
            for f in waiting:
                self.cancelled.discard(f["id"])
                answers.append(_wire.encode({"t": "error", "id": f["id"], "kind": "cancelled",
                                             "message": "cancelled before it started"}))
            self.sock.sendall(b"".join(answers))  # not flush(): user code may be inside print()
        if self.current in self.cancelled:
            raise _Interrupted()

    def _on_alarm(self, signum, frame) -> None:
        if self.in_user:
            raise _TimedOut()


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
