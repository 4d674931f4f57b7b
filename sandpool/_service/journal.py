"""The server's small on-disk record, so a restarted server still knows what happened earlier.

One JSON line per event: a sandbox created (its id, tags, times) and a sandbox ended (its status,
reason and return code). Opening the journal reads it back: every sandbox that was created but
never recorded as ended died with the previous server process, so it becomes TERMINATED with the
reason "the server ... exited while it ran". The file is then rewritten with the newest ``keep``
sandboxes only, so it stays small. A torn last line (the server was killed mid-write) is skipped.

A journal is one server's: opening it takes an exclusive ``flock`` on ``<path>.lock`` (held until
``close()``), so a second server given the same file stops with an error instead of interleaving.
A server on an ephemeral TCP port (``:0``) keeps its journal in memory unless given a file: its
address changes every run, so no later run could answer for its sandboxes.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, TextIO

from .._config import SandboxStatus
from .._grpc.endpoint import hold_lock

RESTART_REASON = "the sandpool server exited (killed or restarted) while the sandbox ran"


def default_path(listen: str) -> str | None:
    """``$XDG_STATE_HOME/sandpool/serve-<listen address>.jsonl`` (``~/.local/state`` by default);
    None (in memory) for an ephemeral port."""
    if not listen.startswith("unix:") and listen.endswith(":0"):
        return None
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", listen).strip("_")
    return os.path.join(base, "sandpool", f"serve-{safe}.jsonl")


class Journal:
    """Sandboxes of this and earlier server runs. ``history`` maps id -> the last entry of each."""

    def __init__(self, path: str | None, *, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self.history: dict[str, dict[str, Any]] = {}
        self._file: TextIO | None = None
        self._lock: int | None = None

    def __repr__(self) -> str:
        return f"<Journal {self.path} {len(self.history)} sandboxes>"

    def open(self) -> list[str]:
        """Take the journal's lock, read earlier runs, settle their unfinished sandboxes, compact; return
        the ids settled. OSError naming the other server if one holds the journal."""
        settled: list[str] = []
        if self.path is None:
            return settled
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        self._lock = hold_lock(f"{self.path}.lock", f"the record file {self.path}")
        os.pwrite(self._lock, json.dumps({"pid": os.getpid()}).encode(), 0)
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a torn line from a killed server
                    if not isinstance(entry, dict) or not isinstance(entry.get("sandbox_id"), str):
                        continue
                    sandbox_id = entry["sandbox_id"]
                    if entry.get("deleted"):
                        self.history.pop(sandbox_id, None)
                    else:
                        self.history[sandbox_id] = {**self.history.get(sandbox_id, {}), **entry}
        except FileNotFoundError:
            pass
        now = time.time()
        for sandbox_id, entry in self.history.items():
            if not SandboxStatus(entry.get("status", "unspecified")).is_terminal:
                entry.update(status=SandboxStatus.TERMINATED.value, status_reason=RESTART_REASON, ended_at=now)
                settled.append(sandbox_id)
        newest = sorted(self.history.values(), key=lambda e: e.get("created_at") or 0)[-self.keep:]
        self.history = {e["sandbox_id"]: e for e in newest}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in newest:
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        return settled

    def write(self, entry: dict[str, Any]) -> None:
        """Record one event (a created or an ended sandbox); merged into ``history``."""
        sandbox_id = entry["sandbox_id"]
        self.history[sandbox_id] = {**self.history.get(sandbox_id, {}), **entry}
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def trim(self) -> None:
        """Keep every unfinished sandbox and the newest ``keep`` ended ones, in memory and on disk.
        Cheap unless there are twice ``keep``: then the file is rewritten (so a long run stays small)."""
        if len(self.history) <= 2 * self.keep:
            return
        ended = [e for e in self.history.values() if SandboxStatus(e.get("status", "unspecified")).is_terminal]
        ended.sort(key=lambda e: e.get("created_at") or 0)
        for entry in ended[:-self.keep]:
            del self.history[entry["sandbox_id"]]
        if self._file is not None and self.path is not None:
            self._file.close()
            tmp = f"{self.path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for entry in self.history.values():
                    f.write(json.dumps(entry) + "\n")
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def forget(self, sandbox_id: str) -> None:
        self.history.pop(sandbox_id, None)
        self.write({"sandbox_id": sandbox_id, "status": SandboxStatus.TERMINATED.value, "deleted": True})
        self.history.pop(sandbox_id, None)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            os.close(self._lock)  # the lock file stays: removing it would race a server taking it
            self._lock = None
