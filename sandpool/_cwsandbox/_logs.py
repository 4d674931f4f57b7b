"""StreamLogs: the main command's output, as lines stamped with the time the server first saw them.

The runtime hands out the main command's log file (``Runtime.open_main_log``) right after the sandbox
starts; the open file keeps the output readable after the sandbox is gone. Lines are read into
memory when someone asks (and once more when the sandbox ends), at most ``KEEP_BYTES`` of the newest.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import BinaryIO

import trio

from ._proto import pb, timestamp

KEEP_BYTES = 8 * 1024 * 1024
FOLLOW_POLL_SECONDS = 0.1
_READ_BYTES = 1 << 20


class MainLog:
    """The lines of one sandbox's main log, read so far: ``lines[i]`` is (seconds, bytes ending in \\n)."""

    def __init__(self, file: BinaryIO | None) -> None:
        self._file = file
        self.lines: list[tuple[float, bytes]] = []
        self.first = 0  # absolute number of lines[0]; older lines were dropped to keep KEEP_BYTES
        self.partial = b""  # the unfinished last line
        self._kept = 0

    @property
    def end(self) -> int:
        return self.first + len(self.lines)

    def catch_up(self) -> None:
        """Read whatever the main command wrote since the last call (at most the newest KEEP_BYTES of it:
        older lines would be dropped anyway, and reading them would stall the server's loop)."""
        if self._file is not None:
            self._skip_to_tail()
        while self._file is not None:
            data = self._file.read(_READ_BYTES)
            if not data:
                return
            now = time.time()
            *complete, self.partial = (self.partial + data).split(b"\n")
            for line in complete:
                self.lines.append((now, line + b"\n"))
                self._kept += len(line) + 1
            while self._kept > KEEP_BYTES and self.lines:
                self._kept -= len(self.lines.pop(0)[1])
                self.first += 1

    def _skip_to_tail(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size - self._file.tell() <= KEEP_BYTES:
            return
        self._file.seek(size - KEEP_BYTES)
        self._file.readline()  # resume at the start of a line
        self.first += len(self.lines) + 1  # at least one line was skipped; readers move past them all
        self.lines.clear()
        self.partial, self._kept = b"", 0

    def close(self) -> None:
        """Stop reading (the sandbox's output is complete); the lines read so far stay."""
        if self._file is not None:
            self.catch_up()
            self._file.close()
            self._file = None
            if self.partial:
                self.lines.append((time.time(), self.partial))
                self.partial = b""

    def start(self, tail_lines: int | None, since: float | None) -> int:
        """The absolute line number a reader starts at."""
        start = self.first
        if since is not None:
            start = next((self.first + i for i, (ts, _) in enumerate(self.lines) if ts >= since), self.end)
        if tail_lines is not None:
            start = max(start, self.end - tail_lines)
        return start


def _entry(stamp: float, data: bytes, with_timestamp: bool, offset: int):
    if with_timestamp:
        when = datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="microseconds")
        data = f"{when.replace('+00:00', 'Z')} ".encode() + data
    return pb.LogEntry(data=data, timestamp=timestamp(stamp), next_log_offset=offset)


async def stream_logs(entry, request, send: trio.MemorySendChannel) -> None:
    """Send the entries StreamLogs asks for; with ``follow``, keep sending until the sandbox has ended."""
    log: MainLog = entry.log or MainLog(None)
    since = request.since_time.ToSeconds() if request.HasField("since_time") else None
    tail = request.tail_lines if request.tail_lines > 0 else None  # a plain int32: 0 is "not set"
    log.catch_up()
    at = log.start(tail, since)
    while True:
        at = max(at, log.first)
        for stamp, data in log.lines[at - log.first:]:
            at += 1
            await send.send(_entry(stamp, data, request.timestamps, at))
        if not request.follow or entry.ended.is_set():
            if entry.ended.is_set() and at < log.end:
                continue  # the final read at the end brought more
            return
        with trio.move_on_after(FOLLOW_POLL_SECONDS):
            await entry.ended.wait()
        log.catch_up()
