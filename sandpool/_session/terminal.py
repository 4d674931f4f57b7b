"""TerminalSession: an interactive command on a pseudo-terminal in a sandbox (``Sandbox.shell``).

The agent starts the command on a new pseudo-terminal (its controlling terminal, so job control,
^C and SIGWINCH work); what the terminal shows comes back as raw bytes on ``output`` (stdout and
stderr merged, as on any terminal), keystrokes go in through ``stdin``, and ``resize`` changes the
window. There is no client-side timeout. Only the newest ``KEEP_BYTES`` of output are kept for
nobody reading; a live reader holds the command back when it falls behind (flow control), so
memory stays bounded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from _sandpool_agent import wire as _wire
from .._core.chunkstream import ChunkStream
from .._core.opref import OperationRef
from .process import Process, SandboxLink, StreamWriter

__all__ = ["TerminalResult", "TerminalSession", "open_shell"]

KEEP_BYTES = 64 * 1024
DEFAULT_SIZE = (80, 24)


@dataclasses.dataclass(frozen=True)
class TerminalResult:
    """How a terminal session ended: the command's exit code and the command."""

    returncode: int
    command: list[str] = dataclasses.field(default_factory=list)


class _TtyProcess(Process):
    """A Process whose exec frame asks for a pseudo-terminal of ``size`` (cols, rows); it also
    resizes the terminal and yields its raw output, for its TerminalSession."""

    def __init__(self, link: SandboxLink, argv: list[str], size: tuple[int, int]) -> None:
        super().__init__(link, argv, cwd=None, env=None, timeout=None, check=False, stdin=True, cap=KEEP_BYTES,
                         exec_extra={"tty": list(size)})

    def resize(self, cols: int, rows: int) -> OperationRef[None]:
        return OperationRef.spawn(self._loop, self._resize, cols, rows)

    async def _resize(self, cols: int, rows: int) -> None:
        await self._sent.wait()
        if self._exit_code is None and self._failure is None:
            await self._link.send({"t": "resize", "id": self._req_id, "cols": cols, "rows": rows})

    def output(self) -> ChunkStream[bytes]:
        return ChunkStream(self._link.host, self._output, "terminal output")

    async def _output(self) -> AsyncIterator[bytes]:
        while (chunk := await self._next_output()) is not None:
            yield chunk
        if self._failure is not None:  # it never ran to its end: say why
            raise self._failure


def _size(width: object, height: object) -> tuple[int, int]:
    cols, rows = DEFAULT_SIZE[0] if width is None else width, DEFAULT_SIZE[1] if height is None else height
    _wire.check_field("resize", "cols", cols, "width")
    _wire.check_field("resize", "rows", rows, "height")
    return cols, rows  # type: ignore[return-value]  # check_field has checked both are ints


class TerminalSession(OperationRef[TerminalResult]):
    """A command on a pseudo-terminal. ``output`` (bytes), ``stdin``, ``resize(w, h)``; awaitable, or
    ``.result()`` / ``.wait()``, for its TerminalResult. ``cancel()`` kills the command."""

    def __init__(self, link: SandboxLink, command: list[str], width: int | None, height: int | None) -> None:
        super().__init__()
        self._proc = _TtyProcess(link, command, _size(width, height))
        self.output: ChunkStream[bytes] = self._proc.output()
        self.stdin: StreamWriter = self._proc.stdin  # type: ignore[assignment]  # made with stdin=True: never None
        self._launch(link.host(), self._body)

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<TerminalSession {self.command!r} {state}>"

    async def _body(self) -> TerminalResult:
        try:
            result = await self._proc
        except BaseException:
            self._proc.cancel()
            raise
        return TerminalResult(result.returncode, result.command)

    @property
    def command(self) -> list[str]:
        return self._proc.command

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def resize(self, width: int, height: int) -> OperationRef[None]:
        """Set the terminal's size in columns and rows (the command gets SIGWINCH)."""
        cols, rows = _size(width, height)
        return self._proc.resize(cols, rows)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the command exits; return its exit code."""
        return self.result(timeout).returncode

    def cancel(self) -> bool:
        self._proc.cancel()
        return super().cancel()


def open_shell(link: SandboxLink, command: list[str] | None, width: int | None, height: int | None) -> TerminalSession:
    """``Sandbox.shell``: check the command, then start it (the sandbox starts if needed)."""
    argv = ["/bin/bash"] if command is None else command
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError(f"command must be a non-empty list of strings such as ['/bin/sh'], got {command!r}")
    argv = [str(a) for a in argv]
    _wire.check_field("exec", "argv", argv, "command")
    return TerminalSession(link, argv, width, height)
