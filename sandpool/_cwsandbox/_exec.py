"""StreamExec and Exec on the trio side: a sandpool Process, its bytes forwarded as they come.

StreamExec: ``ready`` as soon as the command is submitted (stdin written before the process starts is
queued in order), ``output`` frames per stream with the bytes exactly as written, then ``exit`` (or an
in-band ``error`` if the sandbox died under the command). The
command's stdin is a pipe closed by ``close`` or by the end of the request stream (a client without
stdin half-closes right after ``init``). Leaving early (the client cancelled, or its deadline passed)
kills the command's process tree.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .. import _errors as sp
from .._grpc.bridge import Sender
from ._errors import invalid, unimplemented
from ._proto import Message, pb, timestamp

if TYPE_CHECKING:
    from .._session.process import Process
    from .._session.sandbox import Sandbox
    from .._session.streams import StreamReader, StreamWriter
    from ._pods import InContainer

STDOUT, STDERR = pb.ExecStreamOutput.STREAM_STDOUT, pb.ExecStreamOutput.STREAM_STDERR
#: The in-band error code of a command whose sandbox died under it (killed, out of memory): the client
#: raises SandboxExecutionError with this reason. A sandbox stopped on purpose is CANCELLED instead
#: (SandboxNotRunningError), a timeout DEADLINE_EXCEEDED (SandboxTimeoutError).
SANDBOX_DIED = "SANDBOX_DIED"
#: Output kept per stream by the unary Exec when the request sets no max_output_bytes.
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024


def _command(command: Message) -> list[str]:
    if not command:
        raise invalid("command", "command must not be empty; pass an argv list such as ['echo', 'hi']")
    return list(command)


async def stream_exec(sandbox: Sandbox | InContainer, init: Message, requests: trio.MemoryReceiveChannel[Message],
                      send: Sender, timeout: float | None) -> None:
    """Run ``init.command``, feeding it the stdin of ``requests``; send its responses to ``send``."""
    if init.tty:
        raise unimplemented("an interactive TTY (Sandbox.shell, cwsandbox sh)")
    proc = sandbox.exec(_command(init.command), env=dict(init.env) or None, stdin=True,
                        timeout_seconds=timeout)
    try:
        await send.send(pb.ExecStreamResponse(ready=pb.ExecStreamReady(ready_time=timestamp(time.time()))))

        async def forward(reader: StreamReader, stream: int) -> None:
            while (chunk := await reader._next_bytes()) is not None:
                await send.send(pb.ExecStreamResponse(output=pb.ExecStreamOutput(stream=stream, data=chunk)))

        async with trio.open_nursery() as nursery:
            assert proc.stdin is not None  # exec'd with stdin=True
            nursery.start_soon(_feed_stdin, proc.stdin, requests)
            await _drain(proc, forward)
            nursery.cancel_scope.cancel()
        try:
            result = await proc
        except sp.SandboxDiedError as exc:  # the stream is up: say so in band (the client's SandboxExecutionError)
            await send.send(pb.ExecStreamResponse(error=pb.ExecStreamError(message=str(exc), code=SANDBOX_DIED)))
            return
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
    """Run ``consume(reader, stream)`` on stdout and stderr until both end. A process that fails without
    exiting (its sandbox stopped, or it never started) ends them too: its streams would never close."""
    done = trio.Event()
    proc.add_done_callback(lambda _ref: done.set())
    async with trio.open_nursery() as nursery:
        async def readers() -> None:
            async with trio.open_nursery() as streams:
                streams.start_soon(consume, proc.stdout, STDOUT)
                streams.start_soon(consume, proc.stderr, STDERR)
            nursery.cancel_scope.cancel()

        nursery.start_soon(readers)
        await done.wait()
        if proc.returncode is None:  # failed: nothing more will come
            nursery.cancel_scope.cancel()


async def _feed_stdin(stdin: StreamWriter, requests: trio.MemoryReceiveChannel[Message]) -> None:
    """Write ``stdin`` requests to a process's stdin in order; close it on ``close`` or at the end."""
    try:
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "stdin":
                await stdin.write(request.stdin)
            elif kind == "close":
                break
            elif kind == "init":
                raise invalid("init", "init may only be the first message of StreamExec")
        await stdin.close()
    except (sp.SandboxExecutionError, sp.SandboxNotRunningError, sp.SandboxDiedError):
        pass  # the process, or its whole sandbox, has ended: stdin left for it is dropped, and
        # awaiting the process (in stream_exec) reports how it ended, in band
