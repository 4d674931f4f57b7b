"""The call worker: a process forked by the agent that runs cloudpickled functions, one at a time.

It answers every ``call`` frame with one ``result`` or ``error`` frame (see ``_calls`` for the
kinds). Results and exceptions leave as plain data (``_plain``): a result that is not plain data
fails its call here, unless the call frame says ``pickle`` (the caller's opt-in). Answers of a
batch are buffered and sent together, at most ``FLUSH_SECONDS`` late, so that thousands of tiny
calls cost a handful of writes.

Two ways to reach it. Relayed: calls come from the agent over the worker's socket to it, and the
agent sees every answer. Direct (local sandboxes): the agent hands it a listening Unix socket in
the sandbox's /tmp; the client connects there and calls go both ways without the agent, which only
forwards ``cancel`` frames on the agent socket; the worker acknowledges each one there (``ack``)
once that call is answered, so the agent knows when to stop waiting to kill it.

Interruption is by signal, and only while user code runs: SIGINT (sent by the agent after a
``cancel`` frame) makes the worker read its frames, answer cancelled calls and give back stolen
ones that wait, and raises KeyboardInterrupt in the function if its own call was cancelled; SIGALRM
(armed from the call's ``timeout``) raises the private ``_TimedOut``. Outside user code, and while
the SIGINT handler itself runs, the handlers only note the signal, so the worker's own bookkeeping
is never cut in half.

A steal (``cancel`` with ``steal``) is kept until its call is read, started or answered: in direct
mode it comes on the agent's socket and may be read before its call, still unread on the client's.
"""

from __future__ import annotations

import collections
import mmap
import os
import select
import signal
import socket
import sys
import time
import traceback

from . import wire as _wire
from . import linux as _linux, plain as _plain, spool as _spool
from . import actors as _actors  # loaded before any call: actor calls name its functions

#: Longest delay of an answer kept back to be sent with the next ones.
FLUSH_SECONDS = 0.002
#: Longest message and traceback text of a user's exception sent back (longer ones are clipped).
MAX_MESSAGE_CHARS = 64 * 1024
MAX_TRACEBACK_CHARS = 1024 * 1024


class _Interrupted(KeyboardInterrupt):
    """Raised in user code when its call is cancelled (a KeyboardInterrupt, as Ctrl-C would be)."""


class _TimedOut(BaseException):
    """Raised in user code when its call's ``timeout`` passes (not an Exception: hard to swallow)."""


def main(sock: socket.socket, config: dict, listener: tuple[socket.socket, str] | None = None) -> None:
    """Entry point in the forked worker: detach from the agent's resources and serve. With a
    ``listener`` (socket, path), the first connection to it is the client's (direct mode)."""
    os.setpgid(0, 0)  # its own group: a kill reaches whatever the function started
    _linux.set_parent_death_signal(signal.SIGKILL)
    # the owner socket, the agent's selector and exec pipes are not ours
    _linux.close_all_but(*(s.fileno() for s in (sock, listener[0] if listener else None) if s is not None))
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    import cloudpickle  # pre-imported by the template, so this is a dictionary lookup

    client = None
    if listener is not None:
        client, _ = listener[0].accept()  # the first connection is the client's; nobody else's
        listener[0].close()
        try:
            os.unlink(listener[1])
        except OSError:
            pass
    Worker(sock, cloudpickle, config.get("root") or "/", client).run()


class Worker:
    def __init__(self, agent: socket.socket, pickler, root: str, client: socket.socket | None = None) -> None:
        self.agent = agent  # to the agent: calls and answers when relayed; cancels and acks when direct
        self.client = client
        self.io = client or agent  # where calls come from and answers go
        self.poller = select.poll()  # direct: waits on both (not select(): it fails on fds >= 1024)
        for sock in (client, agent) if client is not None else ():
            self.poller.register(sock, select.POLLIN)
        self.buf = _wire.FrameBuffer()
        self.agent_buf = _wire.FrameBuffer() if client is not None else self.buf
        self.root = root  # where the sandbox's "/" is, seen from here ("/" when namespaced)
        self.pickler = pickler
        self.fns: dict[bytes, object] = {}
        self.unloaded: dict[bytes, bytes] = {}  # fn_key -> bytes that came with a call that never ran
        self.durations: dict[bytes, float] = {}  # fn_key -> its calls' typical duration (s, EWMA)
        self.pending: collections.deque[dict] = collections.deque()
        self.cancelled: set[int] = set()
        self.steals: set[int] = set()  # calls to give back if they have not started (work stealing)
        self.to_ack: set[int] = set()  # direct: cancels the agent waits to see answered
        self.answered: collections.deque[int] = collections.deque(maxlen=4096)  # recent call ids
        self.outbox: list[bytes] = []
        self.flushed_at = time.monotonic()
        self.current: int | None = None
        self.in_user = False
        self.signalled = False
        self.handling = False  # inside the SIGINT handler's reading and answering
        self.alarmed = False  # the call's timeout passed while the SIGINT handler ran

    def run(self) -> None:
        _actors.serve(self._send_agent, self._read_agent, self._call_input)
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the agent across fork
        while True:
            if not self.pending:
                self.flush()
                if not self._wait_for_frames():
                    return
                continue
            if self.signalled:
                self.signalled = False
                self._drain()
                self._answer_cancelled_waiting()
                self._send_outbox()  # given back now, not after the next call (it may be long)
                continue  # the cancels or steals may have taken every pending call
            frame = self.pending.popleft()
            if self.outbox and (self.durations.get(frame.get("fn_key") or b"", 1.0) >= FLUSH_SECONDS
                                or time.monotonic() - self.flushed_at >= FLUSH_SECONDS):
                self.flush()  # answers never wait behind a call that may be long
            self._run(frame)
            if not self.pending:
                self.flush()

    # -- frames --------------------------------------------------------------------------------

    def _wait_for_frames(self) -> bool:
        """Block until frames come (from the client, or cancels from the agent), take every
        readable one and answer the cancels and steals of calls not started; False at EOF."""
        if self.client is None:
            readable = [(self.io, self.buf)]
        else:
            ready = {fd for fd, _ in self.poller.poll()}
            readable = [(sock, buf) for sock, buf in ((self.client, self.buf), (self.agent, self.agent_buf))
                        if sock.fileno() in ready]
        for sock, buf in readable:
            data = sock.recv(1 << 20)
            if not data:
                return False
            self._take(buf.feed(data))
        self._answer_cancelled_waiting()
        if self.outbox or self.to_ack:
            self.flush()
        return True

    def _take(self, frames: list[dict]) -> None:
        for frame in frames:
            if frame["t"] == "call" and frame["id"] in self.steals:  # its steal came first (direct)
                self.steals.discard(frame["id"])
                self._give_up(frame, "lost", "given back before it started")
            elif frame["t"] == "call":
                self.pending.append(frame)
            elif frame["t"] == "told":  # the answer to an actor call the user's code made
                _actors.told(frame)
            elif frame["t"] == "cancel" and frame.get("steal"):
                self.steals.add(frame["id"])
            elif frame["t"] == "cancel":
                self.cancelled.add(frame["id"])
                if self.client is not None:
                    self.to_ack.add(frame["id"])

    def _drain(self) -> None:
        """Take the frames already readable, without blocking."""
        for sock, buf in ((self.io, self.buf), (self.agent, self.agent_buf)) if self.client else ((self.io, self.buf),):
            while True:
                try:
                    data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                self._take(buf.feed(data))

    def _send_agent(self, frame: dict) -> None:
        """Send a frame to the agent (an actor call's ``ask``, relayed to the client), under the
        running call's id (the agent puts its direct worker's there in direct mode)."""
        self.agent.sendall(_wire.encode({**frame, "id": self.current or 0}))

    def _read_agent(self, timeout: float) -> bool:
        """Take the frames the agent sent within ``timeout`` seconds (``told`` answers among them);
        False once it is gone. Polls: a SIGINT handler may read them first."""
        poller = select.poll()  # not select(): it fails on fds >= 1024
        poller.register(self.agent, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return True
        try:
            data = self.agent.recv(1 << 20, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        self._take(self.agent_buf.feed(data))
        return True

    def _call_input(self) -> tuple[int, bool]:
        """Where the next call comes from (a file descriptor), and whether one waits already (an
        actor running calls at once lets it in instead of waiting)."""
        return self.io.fileno(), bool(self.pending)

    def _answer(self, frame: dict) -> None:
        self.outbox.append(_wire.encode(frame))
        self.answered.append(frame["id"])

    def _error(self, call_id: int, kind: str, message: str, **extra: object) -> None:
        self._answer({"t": "error", "id": call_id, "kind": kind, "message": message, **extra})

    def _answer_cancelled_waiting(self) -> None:
        """Answer (in the outbox) cancelled calls that have not started, and give back stolen ones
        ("lost": the client runs them elsewhere); forget cancels of calls already answered and
        steals of calls that started. A steal of a call not read yet stays, for ``_take``."""
        if not (self.cancelled or self.steals):
            return
        if any(f["id"] in self.cancelled or f["id"] in self.steals for f in self.pending):
            keep = collections.deque()
            for f in self.pending:
                if f["id"] in self.steals:
                    self.steals.discard(f["id"])
                    self.cancelled.discard(f["id"])
                    self._give_up(f, "lost", "given back before it started")
                elif f["id"] in self.cancelled:
                    self.cancelled.discard(f["id"])
                    self._give_up(f, "cancelled", "cancelled before it started")
                else:
                    keep.append(f)
            self.pending = keep
        if self.cancelled or self.steals:
            answered = set(self.answered)
            self.cancelled -= answered  # answered before the cancel came: nothing to stop
            self.steals -= answered
            self.steals.discard(self.current)  # it runs: it stays here

    def _give_up(self, frame: dict, kind: str, message: str) -> None:
        """Answer a call that will not run here, and remove its argument file (see sandpool._functions.bulk).

        A function that came with the call is kept all the same (unpickled when a call first needs
        it): the client counts it as sent to this worker and sends its next calls without it."""
        if frame.get("args_path"):
            try:
                os.unlink(self._host_path(frame["args_path"]))
            except OSError:
                pass
        if frame.get("fn"):  # the client sends later calls of this function without its bytes
            self.unloaded[frame.get("fn_key") or b""] = frame["fn"]
        self._error(frame["id"], kind, message)

    def _acks(self) -> bytes:
        """Acks for every cancel the agent sent whose call is answered by now (direct mode)."""
        done = [i for i in self.to_ack if i in self.answered]
        for call_id in done:
            self.to_ack.discard(call_id)
        return b"".join(_wire.encode({"t": "ack", "id": i}) for i in done)

    def flush(self) -> None:
        for stream in (sys.stdout, sys.stderr):  # print() in user code must not wait for exit
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        self._send_outbox()
        self.flushed_at = time.monotonic()

    def _send_outbox(self) -> None:
        """Send the answers kept back, and the acks due (not the user's stdout: see _on_sigint)."""
        if self.outbox:
            data, self.outbox = b"".join(self.outbox), []
            self.io.sendall(data)
        if self.to_ack:
            acks = self._acks()
            if acks:
                self.agent.sendall(acks)

    # -- one call --------------------------------------------------------------------------------

    def _run(self, frame: dict) -> None:
        call_id = frame["id"]
        key = frame.get("fn_key") or b""
        if call_id in self.cancelled:
            self.cancelled.discard(call_id)
            self._give_up(frame, "cancelled", "cancelled before it started")
            return
        self.steals.discard(call_id)  # it starts: a steal from now on leaves it here
        what = "function"
        try:
            if frame["fn"] or (key not in self.fns and key in self.unloaded):
                self.fns[key] = self.pickler.loads(frame["fn"] or self.unloaded.pop(key))
            fn = self.fns[key]
            what = "arguments"
            if frame.get("args_path"):
                args, kwargs = self._load_file(frame["args_path"])
            else:
                args, kwargs = self.pickler.loads(frame["args"])
        except BaseException as exc:  # noqa: BLE001 - any unpickling failure is reported, not fatal
            self._error(call_id, "serialization", f"the {what} could not be unpickled in the sandbox: "
                        f"{type(exc).__name__}: {exc}", traceback=_format(exc))
            return
        timeout = frame.get("timeout")
        started = time.perf_counter()
        self.current = call_id
        self.alarmed = False
        try:
            self.in_user = True  # first: from here on the handlers interrupt this call
            try:
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                if self.signalled:  # a SIGINT came while the worker was between calls
                    self.signalled = False
                    self._on_sigint(signal.SIGINT, None)
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
            self._user_error(call_id, exc, bool(frame.get("pickle")))
        else:
            seconds = time.perf_counter() - started
            micros = int(seconds * 1e6)
            last = self.durations.get(key)
            self.durations[key] = seconds if last is None else 0.8 * last + 0.2 * seconds
            self._result(frame, value, micros)
        finally:
            self.current = None
            self.cancelled.discard(call_id)

    def _result(self, frame: dict, value: object, micros: int) -> None:
        """Answer a call with its value: plain data (see ``_plain``), or a cloudpickle when the
        caller trusts the function (``pickle`` in the frame). A non-plain value fails the call here,
        so nothing but plain data leaves the sandbox unasked."""
        call_id, pickled = frame["id"], bool(frame.get("pickle"))
        answer: dict[str, object] = {"t": "result", "id": call_id, "us": micros}
        spool = None
        try:
            if not pickled:
                parts = _plain.encode_parts(value)
                if len(parts) == 1 and len(parts[0]) < _spool.BULK_BYTES:  # the common small result
                    answer["data"] = parts[0]
                    self._answer(answer)
                    return
            spool = _spool.Spool(self._host_path(frame["bulk"]) if frame.get("bulk") else None, call_id)
            if pickled:
                self.pickler.Pickler(spool, protocol=5).dump(value)
            else:
                for part in parts:
                    spool.write(part)
            if spool.fd is None:
                answer["data"] = b"".join(spool.chunks)
            else:
                answer["path"] = f"{frame['bulk']}/{os.path.basename(spool.close())}"
            self._answer(answer)
        except _plain.NotPlain as exc:
            self._error(call_id, "serialization", f"the result ({_qualified(type(value))}) is not plain data: {exc}; "
                        f"return plain data ({_plain.PLAIN_TYPES}), or pass unsafe_pickle_results=True to "
                        "@session.function(...) to receive any object, for code you trust")
        except BaseException as exc:  # noqa: BLE001 - a result that will not travel fails its call only
            if spool is not None:
                spool.discard()
            how = "pickled" if pickled else "sent"
            self._error(call_id, "serialization", f"the result ({_qualified(type(value))}) could not be {how}: "
                        f"{type(exc).__name__}: {exc}")

    def _host_path(self, sandbox_path: str) -> str:
        return os.path.join(self.root, sandbox_path.lstrip("/"))

    def _load_file(self, sandbox_path: str):
        """Unpickle a bulk argument file through a read-only mapping, and remove it."""
        fd = os.open(self._host_path(sandbox_path), os.O_RDONLY)
        try:
            os.unlink(self._host_path(sandbox_path))
            with mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ) as mapped:
                return self.pickler.loads(mapped)
        finally:
            os.close(fd)

    def _user_error(self, call_id: int, exc: BaseException, pickled: bool) -> None:
        """Answer with the user's exception as plain data (``exc``: its class's name, its args and
        attributes as far as they are plain), plus its pickle (``data``) when the caller trusts it."""
        if exc.__traceback__ is not None:  # drop this module's own frame
            exc.__traceback__ = exc.__traceback__.tb_next
        cls = type(exc)
        try:
            message = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
            message = f"<{cls.__name__} with an unprintable message>"
        extra: dict[str, object] = {"type_name": _qualified(cls), "traceback": _clip(_format(exc), MAX_TRACEBACK_CHARS)}
        try:
            extra["exc"] = _plain.describe_exception(exc)
        except BaseException:  # noqa: BLE001 - user code (a property, a __dict__) failed: a RemoteError then
            pass
        if pickled:
            try:
                extra["data"] = self.pickler.dumps(exc, protocol=5)
            except BaseException:  # noqa: BLE001 - the caller rebuilds it from the plain data instead
                pass
        self._error(call_id, "user", _clip(message, MAX_MESSAGE_CHARS), **extra)

    # -- signals ---------------------------------------------------------------------------------

    def _on_sigint(self, signum, frame) -> None:
        """Read the frames, answer what they cancel or steal among the calls waiting (sent now,
        with any answer kept back, so the agent does not kill the running call and stolen calls
        run elsewhere at once; not flush(): the user code may be inside print()), then interrupt
        the running call if it was cancelled. A SIGINT during this only has it read again."""
        if not self.in_user or self.handling:
            self.signalled = True  # the loop (or the handler running) reads the frames
            return
        while True:
            self.handling, self.signalled = True, False
            try:
                self._drain()
                self._answer_cancelled_waiting()
                self._send_outbox()
            finally:
                self.handling = False
            if not self.signalled:
                break
        if self.alarmed:
            self.alarmed = False
            raise _TimedOut()
        if self.current in self.cancelled:
            raise _Interrupted()

    def _on_alarm(self, signum, frame) -> None:
        if self.in_user and self.handling:
            self.alarmed = True  # raised once the SIGINT handler is done with the frames
        elif self.in_user:
            raise _TimedOut()


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... [{len(text) - limit} more characters]"


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
