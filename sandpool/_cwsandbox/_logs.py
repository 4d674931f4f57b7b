"""StreamLogs: the main command's output, as lines stamped with the time the server first saw them.

The runtime hands out the main command's log file (``Runtime.open_main_log``) right after the sandbox
starts; the open file keeps the output readable after the sandbox is gone. Lines are read into
memory when someone asks (and once more when the sandbox ends), at most ``KEEP_BYTES`` of the newest.

Resume, as cwsandbox's service does it: every entry of a stream carries the stream's
``log_session_id`` and ``next_log_offset`` (here: the number of lines of the log up to and including
this entry's). A client whose follow stream broke (UNAVAILABLE, a server restart) reconnects with
``resume_log_session_id`` and ``resume_log_offset`` and gets the rest, from that line on, formatted as
the session was (``timestamps``). A session this server does not know (another server run, another
sandbox, or forgotten: at most ``MAX_SESSIONS`` are kept) gets the in-band ``SESSION_NOT_FOUND``
error entry, on which the client starts afresh; an offset older than the lines still kept gets
``REPLAY_GAP`` (the same), one past the end ``INVALID_RESUME_OFFSET`` (terminal).
"""

from __future__ import annotations

import collections
import datetime
import os
import secrets
import time
from typing import TYPE_CHECKING, BinaryIO

import trio

from .._grpc.bridge import Sender
from ._proto import Message, pb, timestamp

if TYPE_CHECKING:
    from ._registry import Entry

KEEP_BYTES = 8 * 1024 * 1024
MAX_SESSIONS = 4096
SESSION_NOT_FOUND, REPLAY_GAP, INVALID_RESUME_OFFSET = "SESSION_NOT_FOUND", "REPLAY_GAP", "INVALID_RESUME_OFFSET"
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
            self._skip_to_tail(self._file)
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

    def _skip_to_tail(self, file: BinaryIO) -> None:
        size = os.fstat(file.fileno()).st_size
        if size - file.tell() <= KEEP_BYTES:
            return
        file.seek(size - KEEP_BYTES)
        file.readline()  # resume at the start of a line
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


class LogSessions:
    """The log sessions a client may resume: id -> (sandbox id, timestamps), the newest MAX_SESSIONS."""

    def __init__(self) -> None:
        self._sessions: collections.OrderedDict[str, tuple[str, bool]] = collections.OrderedDict()

    def open(self, sandbox_id: str, timestamps: bool) -> str:
        session_id = f"logs-{secrets.token_hex(8)}"
        self._sessions[session_id] = (sandbox_id, timestamps)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session_id

    def find(self, session_id: str, sandbox_id: str) -> bool | None:
        """The session's ``timestamps``, or None if it is unknown here or belongs to another sandbox."""
        found = self._sessions.get(session_id)
        if found is None or found[0] != sandbox_id:
            return None
        self._sessions.move_to_end(session_id)
        return found[1]


def _entry(stamp: float, data: bytes, with_timestamp: bool, offset: int, session_id: str) -> Message:
    if with_timestamp:
        when = datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="microseconds")
        data = f"{when.replace('+00:00', 'Z')} ".encode() + data
    return pb.LogEntry(data=data, timestamp=timestamp(stamp), next_log_offset=offset, log_session_id=session_id)


def _refusal(code: str, message: str) -> Message:
    return pb.LogEntry(error=pb.LogStreamError(code=code, message=message))


async def stream_logs(entry: Entry, request: Message, send: Sender, sessions: LogSessions) -> None:
    """Send the entries StreamLogs asks for; with ``follow``, keep sending until the sandbox has ended.
    A resume request continues its session from its offset, or is refused in band."""
    log: MainLog = entry.log or MainLog(None)
    log.catch_up()
    if request.resume_log_session_id:
        session_id = request.resume_log_session_id
        timestamps = sessions.find(session_id, request.sandbox_id)
        at = request.resume_log_offset
        if timestamps is None:
            await send.send(_refusal(SESSION_NOT_FOUND, f"log session {session_id[:64]!r} is unknown to this "
                                                        f"server for sandbox {request.sandbox_id}; start a new stream"))
            return
        if at > log.end:
            await send.send(_refusal(INVALID_RESUME_OFFSET, f"resume offset {at} is past the end of the log "
                                                            f"({log.end} lines)"))
            return
        if at < log.first:
            await send.send(_refusal(REPLAY_GAP, f"lines before {log.first} are no longer kept (offset {at}); "
                                                 f"start a new stream"))
            return
    else:
        since = request.since_time.ToSeconds() if request.HasField("since_time") else None
        tail = request.tail_lines if request.tail_lines > 0 else None  # a plain int32: 0 is "not set"
        timestamps = request.timestamps
        session_id = sessions.open(request.sandbox_id, timestamps)
        at = log.start(tail, since)
    while True:
        at = max(at, log.first)
        for stamp, data in log.lines[at - log.first:]:
            at += 1
            await send.send(_entry(stamp, data, timestamps, at, session_id))
        if not request.follow or entry.ended.is_set():
            if entry.ended.is_set() and at < log.end:
                continue  # the final read at the end brought more
            return
        with trio.move_on_after(FOLLOW_POLL_SECONDS):
            await entry.ended.wait()
        log.catch_up()
