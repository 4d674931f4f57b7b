"""SandboxStatus: the states a sandbox reports, with cwsandbox's lowercase values."""

from __future__ import annotations

import enum

__all__ = ["SandboxStatus"]


class SandboxStatus(enum.StrEnum):
    """Server-side state of a sandbox; values are lowercase, as in cwsandbox."""

    PENDING = "pending"
    CREATING = "creating"
    PREPARING = "preparing"
    RUNNING = "running"
    PAUSED = "paused"
    TERMINATING = "terminating"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"
    UNSPECIFIED = "unspecified"

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and TERMINATED: the sandbox will not run again."""
        return self in (SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED)

    @property
    def is_running(self) -> bool:
        """True for RUNNING and PAUSED: the sandbox exists and holds its resources."""
        return self in (SandboxStatus.RUNNING, SandboxStatus.PAUSED)

    @classmethod
    def parse(cls, value: SandboxStatus | str) -> SandboxStatus:
        """Return the status for a member or its lowercase value.

        Uppercase names ("RUNNING") raise ValueError, as in cwsandbox, saying what to write.
        """
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"status must be a SandboxStatus or a str, got "
                            f"{type(value).__name__} {value!r}; use e.g. status='running'")
        try:
            return cls(value)
        except ValueError:
            hint = f'use "{value.lower()}"; ' if value.lower() in cls._value2member_map_ else ""
            raise ValueError(f"unknown status {value!r}; {hint}valid statuses (lowercase): "
                             f"{', '.join(repr(s.value) for s in cls)}") from None


