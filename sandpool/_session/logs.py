"""``Sandbox.stream_logs``: the main command's output (stdout and stderr, as written), line by line.

When the sandbox starts, the client opens the runtime's log of the main command
(``Runtime.open_main_log``) and keeps the file open, so the output stays readable after the sandbox
has ended. Readers never hold the log in memory: each reads the file at its own offset, one chunk
at a time, and a line longer than ``MAX_LINE_BYTES`` comes in pieces of that size. Lines are
stamped with the time sandpool first read them (``marks``, a bounded list of offsets and times),
which is what ``since_time`` and ``timestamps`` use.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, BinaryIO

import trio

from .._core.chunkstream import ChunkStream
from .._core.lifecycle import Phase
from .._errors import SandboxNotRunningError
from .parts import SandboxParts

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord

__all__ = ["LogBook", "LogsMixin", "MAX_LINE_BYTES", "log_lines", "log_pieces", "check_log_options"]

#: A longer line is streamed in pieces of this size (cwsandbox's log-line buffer).
MAX_LINE_BYTES = 1 << 20
FOLLOW_POLL_SECONDS = 0.1
_READ_BYTES = 256 * 1024
_MAX_MARKS = 4096


class LogBook:
    """One sandbox's main log: the open file and when sandpool first saw each part of it."""

    def __init__(self, file: BinaryIO | None) -> None:
        # Kept open: the agent removes the log with its directory when it ends. None: an empty log
        # (the main command ended, and its log went, before the start was even reported).
        self._file = file
        self.seen = 0  # bytes already stamped
        self.marks: list[tuple[int, float]] = []  # (offset, time first read); offsets increase

    def size(self) -> int:
        size = os.fstat(self._file.fileno()).st_size if self._file is not None else 0
        if size > self.seen:
            if len(self.marks) >= _MAX_MARKS:
                self.marks = self.marks[::2]  # coarser, still bounded; stamps stay monotonic
            self.marks.append((self.seen, time.time()))
            self.seen = size
        return size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset) if self._file is not None else b""

    def stamp(self, offset: int) -> float:
        """When the byte at ``offset`` was first read (the latest mark at or before it)."""
        when = self.marks[0][1] if self.marks else time.time()
        for at, stamp in self.marks:
            if at > offset:
                break
            when = stamp
        return when

    def offset_since(self, since: float) -> int:
        """The first offset read at or after ``since`` (the end when none was)."""
        return next((at for at, stamp in self.marks if stamp >= since), self.seen)

    def offset_of_tail(self, lines: int, end: int) -> int:
        """Where the last ``lines`` complete-or-partial lines before ``end`` start, reading backwards."""
        if lines <= 0:
            return end
        at, count = end, 0
        if end and self.read(end - 1, 1) == b"\n":
            at -= 1  # the final newline ends the last line; it does not start a new one
        while at > 0:
            start = max(0, at - _READ_BYTES)
            chunk = self.read(start, at - start)
            index = len(chunk)
            while True:
                index = chunk.rfind(b"\n", 0, index)
                if index < 0:
                    break
                count += 1
                if count == lines:
                    return start + index + 1
            at = start
        return 0

    def reopen(self) -> BinaryIO | None:
        """The log as a new file of its own (its own offset), readable while open like this one; None
        for an empty log or a released one. For a second reader in the same process (the cwsandbox
        listener of ``sandpool serve --cwsandbox``)."""
        if self._file is None:
            return None
        return open(f"/proc/self/fd/{self._file.fileno()}", "rb", buffering=0)  # noqa: SIM115 (the caller's)

    def close(self) -> None:
        """Release the file; a reader still going then sees no more (its stream ends with the sandbox)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def check_log_options(tail_lines: object, since_time: object) -> None:
    """ValueError naming the option for a bad ``tail_lines`` or ``since_time``."""
    if tail_lines is not None and (isinstance(tail_lines, bool) or not isinstance(tail_lines, int)
                                   or tail_lines < 0):
        raise ValueError(f"tail_lines must be an int >= 0 or None, got {tail_lines!r}")
    if since_time is not None and (not isinstance(since_time, datetime.datetime) or since_time.tzinfo is None):
        raise ValueError(f"since_time must be a timezone-aware datetime, got {since_time!r}; use e.g. "
                         f"datetime.now(timezone.utc) - timedelta(minutes=5)")


def _when(stamp: float) -> str:
    text = datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


async def log_lines(ended: trio.Event, book: LogBook, follow: bool, tail: int | None, since: float | None,
                    timestamps: bool) -> AsyncIterator[str]:
    """The lines of ``book`` asked for; with ``follow``, new ones too until ``ended`` is set and all
    is read."""
    async for line, _ in log_pieces(ended, book, follow, tail, since, timestamps):
        yield line


async def log_pieces(ended: trio.Event, book: LogBook, follow: bool, tail: int | None, since: float | None,
                     timestamps: bool, offset: int | None = None) -> AsyncIterator[tuple[str, int]]:
    """``log_lines``, each with the byte offset of the log just after it; ``offset`` (a value of
    those, or any byte offset up to the log's size) starts there instead of at ``since``/``tail``.
    What a sandpool server streams (``_service/control.py``), offsets letting a client resume."""
    end = book.size()
    if offset is not None:
        if offset > end:
            raise ValueError(f"offset {offset} is past the end of the log ({end} bytes); resume from an "
                             f"offset the stream gave")
        at = offset
    else:
        at = 0 if since is None else book.offset_since(since)
        if tail is not None:
            at = max(at, book.offset_of_tail(tail, end))
    pending = b""
    while True:
        end = book.size()
        while at < end:
            chunk = book.read(at, min(_READ_BYTES, end - at))
            if not chunk:
                break
            start = at - len(pending)
            at += len(chunk)
            pending += chunk
            while (cut := pending.find(b"\n")) >= 0 or len(pending) >= MAX_LINE_BYTES:
                cut = cut + 1 if cut >= 0 else MAX_LINE_BYTES
                line, pending = pending[:cut], pending[cut:]
                text = line.decode("utf-8", "replace")
                yield (f"{_when(book.stamp(start))} {text}" if timestamps else text), start + cut
                start += cut
            await trio.lowlevel.checkpoint()
        if ended.is_set() and book.size() == at:
            break
        if not follow:
            break
        with trio.move_on_after(FOLLOW_POLL_SECONDS):
            await ended.wait()
    if pending:
        text = pending.decode("utf-8", "replace")
        yield (f"{_when(book.stamp(at - len(pending)))} {text}" if timestamps else text), at


class LogsMixin(SandboxParts):
    """``stream_logs`` for Sandbox."""

    def stream_logs(self, *, follow: bool = False, tail_lines: int | None = None,
                    since_time: datetime.datetime | None = None, timestamps: bool = False,
                    timeout_seconds: float | None = None, container: str | None = None) -> ChunkStream[str]:
        """The main command's output as lines (each ending in ``\\n`` but perhaps the last):
        ``for line in sb.stream_logs(): print(line, end="")`` or ``async for``.

        Args:
            follow: keep streaming new output until the sandbox ends (like ``tail -f``).
            tail_lines: only the last N lines (as of the call).
            since_time: only output sandpool first read at or after this time (tz-aware).
            timestamps: prefix each line with that time in ISO 8601 UTC and a space.
            timeout_seconds: accepted for cwsandbox; a local log does not wait on a server, and a
                sandpool server's stream (follow or not) ends when the log is read or the sandbox ends.
            container: which container's main command (default the primary; see ``pod``).

        Starts the sandbox if needed. Readable after the sandbox ended, while this handle lives.
        A sandbox of a sandpool server streams its log from the server (``Runtime.main_log_lines``),
        a Slurm sandbox from its job's server while the job runs.
        Raises ValueError for bad arguments; NotSupportedLocallyError when the sandbox's runtime
        keeps no log; SandboxNotRunningError if the sandbox was stopped before it started (or, on
        a server, ended so long ago that the server no longer keeps it; on Slurm, its job ended).
        """
        check_log_options(tail_lines, since_time)
        if container:
            return self._in(container).stream_logs(follow=follow, tail_lines=tail_lines, since_time=since_time,
                                                   timestamps=timestamps, timeout_seconds=timeout_seconds)
        since = since_time.timestamp() if since_time is not None else None

        async def produce() -> AsyncIterator[str]:
            record = await self._ensure_started_for_logs()
            book = self._log_book
            if book is not None:
                lines = log_lines(self._terminal, book, follow, tail_lines, since, timestamps)
            else:
                lines = self._runtime.main_log_lines(record, follow=follow, tail_lines=tail_lines,
                                                     since=since, timestamps=timestamps)
            async for line in lines:
                yield line

        return ChunkStream(lambda: self._host, produce, "sandbox logs")

    async def _ensure_started_for_logs(self) -> SandboxRecord:
        """The sandbox's record once its start was tried (starting it if needed)."""
        if self._state.phase is Phase.NEW:
            self.start()
        await self._started.wait()
        if self._record is None:
            raise SandboxNotRunningError("sandbox was stopped before it started; it has no logs",
                                         sandbox_id=self.sandbox_id)
        return self._record
