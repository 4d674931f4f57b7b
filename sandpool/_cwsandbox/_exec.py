"""StreamExec and Exec: a sandpool Process, its bytes forwarded as they come.

StreamExec: ``ready`` as soon as the command is submitted (stdin written before the process starts is
queued in order), ``output`` frames per stream with the bytes exactly as written, then ``exit`` (or an
in-band ``error`` if the sandbox died under the command). The command's stdin is a pipe closed by
``close`` or by the end of the request stream (a client without stdin half-closes right after
``init``). Leaving early (the client cancelled, or its deadline passed) kills the command's process tree.

StreamExec is the hot path of cwsandbox's client (its every ``exec``), so it crosses into the loop
only where it must: the gRPC server thread starts the command (``start``: sandpool's sync exec path,
the frame written from that thread) and answers ``ready`` itself; a pooled thread pumps the request
stream into stdin (``StdinPump``). A command that exits within ``QUICK_SECONDS`` is answered whole
from the server thread (``answer_if_ended``); a longer one's output and exit are forwarded live
from the loop (``forward``). Exec (unary) runs in the loop (``exec_unary``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import trio

from .. import _errors as sp
from .._core.opref import OperationCancelled
from .._grpc.bridge import Sender
from ._errors import invalid, unimplemented
from ._proto import Message, pb, timestamp

if TYPE_CHECKING:
    from .._session.process import Process
    from .._session.sandbox import Sandbox
    from .._session.streams import StreamReader
    from ._pods import InContainer

STDOUT, STDERR = pb.ExecStreamOutput.STREAM_STDOUT, pb.ExecStreamOutput.STREAM_STDERR
#: The in-band error code of a command whose sandbox died under it (killed, out of memory): the client
#: raises SandboxExecutionError with this reason. A sandbox stopped on purpose is CANCELLED instead
#: (SandboxNotRunningError), a timeout DEADLINE_EXCEEDED (SandboxTimeoutError).
SANDBOX_DIED = "SANDBOX_DIED"
#: StreamExec waits this long for its command to end before forwarding its output live from the loop:
#: a command that ends sooner (most do) is answered whole from the server thread, with no task in the
#: loop at all; a longer one's first output comes at most this much later than it would live.
QUICK_SECONDS = 0.01
#: The largest output frame of a command answered whole (the client takes up to 100 MiB a message).
QUICK_FRAME_BYTES = 1 << 20
#: Output kept per stream by the unary Exec when the request sets no max_output_bytes.
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024


def _command(command: Message) -> list[str]:
    if not command:
        raise invalid("command", "command must not be empty; pass an argv list such as ['echo', 'hi']")
    return list(command)


def start(sandbox: Sandbox | InContainer, init: Message, timeout: float | None) -> Process:
    """StreamExec's command, started from the calling thread (a gRPC server thread: the exec frame goes
    out from there, with no hop into the loop). Its stdin is a pipe (see :class:`StdinPump`)."""
    if init.tty:
        raise unimplemented("an interactive TTY (Sandbox.shell, cwsandbox sh)")
    return sandbox.exec(_command(init.command), env=dict(init.env) or None, stdin=True, timeout_seconds=timeout)


def ready() -> Message:
    """The ``ready`` frame: the command is submitted, stdin may come."""
    return pb.ExecStreamResponse(ready=pb.ExecStreamReady(ready_time=timestamp(time.time())))


class StdinPump:
    """Moves a StreamExec's request stream into its process's stdin, in a pooled thread of its own
    (``pump(requests)``): ``stdin`` bytes in order, each written before the next is taken (the stdin
    window holds a client that sends faster than the command reads); ``close`` or the end of the
    requests closes stdin. A second ``init`` cancels the process and leaves ``failure`` for
    :func:`forward` to report."""

    def __init__(self, proc: Process) -> None:
        self.proc = proc
        self.failure: Exception | None = None

    def pump(self, requests: Iterator[Message]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None  # started with stdin=True
        try:
            for request in requests:
                kind = request.WhichOneof("message")
                if kind == "stdin":
                    stdin.write(request.stdin).result()
                elif kind == "close":
                    break
                elif kind == "init":
                    self.failure = invalid("init", "init may only be the first message of StreamExec")
                    self.proc.cancel()
                    return
        except grpc.RpcError:
            return  # the call ended (cancelled, deadline): forward's task is cancelled with it
        except (sp.SandboxExecutionError, sp.SandboxNotRunningError, sp.SandboxDiedError, OperationCancelled):
            return  # the process, or its whole sandbox, has ended: stdin left for it is dropped, and
            # forward reports how it ended, in band
        if self.proc.returncode is None:  # an exited command's stdin needs no closing (no frame for nothing)
            stdin.close()


def answer_if_ended(proc: Process, seconds: float) -> list[Message] | None:
    """In the server thread: the frames of a command that exits within ``seconds``, its output per
    stream then ``exit``; None for one still running, or one that ended without an exit code (died,
    cancelled, timed out: ``forward`` reports each as it does for any command). Its output is whole:
    with no live reader its bytes were acknowledged as they came, and what an agent can send in
    ``seconds`` is far below the sandbox's output cap (``MAX_OUTPUT_BYTES``)."""
    try:
        result = proc.result(seconds)
    except (TimeoutError, OperationCancelled, sp.SandboxError, sp.ProtocolError):
        return None
    frames = [pb.ExecStreamResponse(output=pb.ExecStreamOutput(stream=stream, data=data[at:at + QUICK_FRAME_BYTES]))
              for stream, data in ((STDOUT, result.stdout_bytes), (STDERR, result.stderr_bytes))
              for at in range(0, len(data), QUICK_FRAME_BYTES)]
    frames.append(pb.ExecStreamResponse(exit=pb.ExecStreamExit(exit_code=result.returncode,
                                                                completed_time=timestamp(time.time()))))
    return frames


def is_last(response: Message) -> bool:
    """True for StreamExec's last response (``exit`` or ``error``): the client stops reading there."""
    return response.WhichOneof("message") in ("exit", "error")


async def forward(proc: Process, pump: StdinPump, send: Sender) -> None:
    """In the loop: send ``proc``'s output frames per stream as they come, then ``exit`` (or an in-band
    ``error`` if the sandbox died under the command). Leaving early kills the command's process tree."""
    async def output(reader: StreamReader, stream: int) -> None:
        while (chunk := await reader._next_bytes()) is not None:
            await send.send(pb.ExecStreamResponse(output=pb.ExecStreamOutput(stream=stream, data=chunk)))

    try:
        await _drain(proc, output)
        try:
            result = await proc
        except sp.SandboxDiedError as exc:  # the stream is up: say so in band (the client's SandboxExecutionError)
            await send.send(pb.ExecStreamResponse(error=pb.ExecStreamError(message=str(exc), code=SANDBOX_DIED)))
            return
        except OperationCancelled:
            if pump.failure is not None:  # the request stream was invalid: that is the call's failure
                raise pump.failure from None
            raise
        await send.send(pb.ExecStreamResponse(exit=pb.ExecStreamExit(
            exit_code=result.returncode, completed_time=timestamp(time.time()))))
    finally:
        if not proc.done():
            proc.cancel()


async def exec_unary(sandbox: Sandbox | InContainer, request: Message, timeout: float | None) -> Message:
    """Run ``request.command`` to the end; its ExecResponse with at most max_output_bytes per stream."""
    limit = request.max_output_bytes if request.max_output_bytes > 0 else DEFAULT_MAX_OUTPUT_BYTES
    proc = sandbox.exec(_command(request.command), env=dict(request.env) or None,
                        timeout_seconds=timeout)
    kept = {STDOUT: bytearray(), STDERR: bytearray()}
    produced = {STDOUT: 0, STDERR: 0}

    async def collect(reader: StreamReader, stream: int) -> None:
        while (chunk := await reader._next_bytes()) is not None:
            produced[stream] += len(chunk)
            kept[stream] += chunk[:max(0, limit - len(kept[stream]))]

    try:
        await _drain(proc, collect)
        result = await proc
    finally:
        if not proc.done():
            proc.cancel()
    return pb.ExecResponse(
        stdout=bytes(kept[STDOUT]), stderr=bytes(kept[STDERR]), exit_code=result.returncode,
        stdout_truncated=produced[STDOUT] > limit, stderr_truncated=produced[STDERR] > limit,
        stdout_bytes_produced=produced[STDOUT], stderr_bytes_produced=produced[STDERR])


async def _drain(proc: Process, consume: Callable[[StreamReader, int], Awaitable[None]]) -> None:
    """Run ``consume(reader, stream)`` on stdout and stderr until both end: they end however the process
    does (it exits, fails, its sandbox goes, or it is cancelled), once their last bytes are taken."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, proc.stderr, STDERR)
        await consume(proc.stdout, STDOUT)
