"""TerminalSession: an interactive command on a pseudo-terminal in a sandbox (``Sandbox.shell``)."""

from __future__ import annotations

import dataclasses

__all__ = ["TerminalResult", "TerminalSession"]


@dataclasses.dataclass(frozen=True)
class TerminalResult:
    """How a terminal session ended: the command's exit code and the command."""

    returncode: int
    command: list[str] = dataclasses.field(default_factory=list)


class TerminalSession:
    """Placeholder replaced below."""
