"""The rest of cwsandbox's exception tree, under sandpool's (``_errors``), stdlib only.

cwsandbox raises these for cloud failures (validation replies, snapshots, registered volumes, runner
discovery, exec-stream codes). sandpool raises the few that have a local cause (a snapshot asked
for is ``SnapshotNotSupportedError``, an unknown runner ``RunnerNotFoundError``, an option that
needs a later feature ``NotSupportedLocallyError``); the others exist so that ``except`` clauses
written for cwsandbox keep compiling and catching on the same axes. Hierarchy and attributes are
cwsandbox 1.22's, multiple inheritance included.
"""

from __future__ import annotations

import dataclasses

from ._errors import (
    SandboxError,
    SandboxExecutionError,
    SandboxTimeoutError,
    SandboxUnavailableError,
    SandpoolError,
)

__all__ = [
    "CWSandboxValidationError", "DiscoveryError", "DiscoveryValidationError", "FieldViolation",
    "NotSupportedLocallyError", "ProfileNotFoundError", "RunnerNotFoundError", "SandboxCommandTimeoutError",
    "SandboxRequestTimeoutError", "SandboxSnapshotError", "SandboxStreamBackpressureError",
    "SandboxStreamTruncatedError", "SandboxTerminalStateUnavailableError", "SandboxValidationError",
    "SnapshotBackendThrottledError", "SnapshotBucketMismatchError", "SnapshotBucketProvisioningError",
    "SnapshotNotFoundError", "SnapshotNotReadyError", "SnapshotNotSupportedError",
    "SnapshotOnStopConflictError", "SnapshotQuotaExceededError", "SnapshotSizeExceededError",
    "SnapshotWaitTimeoutError", "VolumeBackendNotFoundError", "VolumeError", "VolumeInUseError",
    "VolumeNotFoundError", "VolumeNotReadyError", "VolumeNotSnapshottableError",
    "VolumePlacementConflictError", "VolumeQuotaExceededError", "VolumeRunnerIneligibleError",
    "VolumeRunnerUnavailableError", "VolumeTypeNotSupportedError", "VolumeWaitTimeoutError",
]

#: The issue that brings volumes, snapshots and network ingress to local sandboxes.
STATE_ISSUE = "issue 16: state and neighbours"


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One field a validation reply rejected: its ``field`` path and a ``description``."""

    field: str = ""
    description: str = ""


class NotSupportedLocallyError(SandpoolError, NotImplementedError):
    """An option or method whose local meaning is not built yet; ``feature`` names it.

    Raised at once (when options are given, or the method is called), never later, so nothing a
    caller asked for is dropped silently. Also a NotImplementedError.
    """

    _extras: tuple[str, ...] = ("feature",)


class CWSandboxValidationError(SandpoolError):
    """A request was refused field by field; ``field_violations`` is a tuple of FieldViolation."""

    _extras: tuple[str, ...] = ("field_violations",)
    field_violations: tuple[FieldViolation, ...]

    def __init__(self, message: str = "", **extras: object) -> None:
        super().__init__(message, **extras)
        self.field_violations = tuple(self.field_violations or ())  # a list given becomes a tuple


class SandboxValidationError(SandboxError, CWSandboxValidationError):
    """Field violations from a sandbox operation."""


class SandboxRequestTimeoutError(SandboxTimeoutError):
    """One request's deadline passed (cwsandbox: a unary RPC's DEADLINE_EXCEEDED)."""


class SandboxCommandTimeoutError(SandboxTimeoutError):
    """The command itself ran past its time limit (reason ``CWSANDBOX_COMMAND_TIMEOUT``)."""


class SandboxStreamBackpressureError(SandboxExecutionError):
    """The stream was ended because its reader fell behind; ``stream_code`` says so."""

    _extras: tuple[str, ...] = ("stream_code",)


class SandboxStreamTruncatedError(SandboxExecutionError):
    """Output was lost in transit (or a log line was too long); ``stream_code`` says so."""

    _extras: tuple[str, ...] = ("stream_code",)


class SandboxTerminalStateUnavailableError(SandboxError):
    """A stop succeeded but the sandbox's final state could not be learned."""


class SandboxSnapshotError(SandboxError):
    """A file-system snapshot failed; ``file_system_snapshot_id`` when one is known."""

    _extras: tuple[str, ...] = ("file_system_snapshot_id",)


class SnapshotNotFoundError(SandboxSnapshotError):
    """No snapshot has this id."""


class SnapshotNotReadyError(SandboxSnapshotError):
    """The snapshot exists but is not READY yet."""


class SnapshotNotSupportedError(SandboxSnapshotError, NotSupportedLocallyError):
    """Snapshots are not available here; locally, not yet (issue 16). Also a NotImplementedError."""


class SnapshotSizeExceededError(SandboxSnapshotError):
    """The volume is larger than a snapshot may be."""


class SnapshotQuotaExceededError(SandboxSnapshotError):
    """The snapshot quota is used up."""


class SnapshotBucketMismatchError(SandboxSnapshotError):
    """The snapshot lives in another bucket than the one configured."""


class SnapshotOnStopConflictError(SandboxSnapshotError):
    """A snapshot-on-stop cannot join a plain stop already in flight."""


class SnapshotBucketProvisioningError(SandboxUnavailableError, SandboxSnapshotError):
    """The snapshot bucket is still being provisioned. Transient."""


class SnapshotBackendThrottledError(SandboxUnavailableError, SandboxSnapshotError):
    """The snapshot backend asked to slow down. Transient."""


class SnapshotWaitTimeoutError(SandboxTimeoutError, SandboxSnapshotError):
    """A snapshot did not become READY in time."""


class VolumeError(SandboxError):
    """A registered volume failed; ``volume_id`` when one is known."""

    _extras: tuple[str, ...] = ("volume_id",)


class VolumeNotFoundError(VolumeError):
    """No volume has this id."""


class VolumeNotReadyError(VolumeError):
    """The volume is not READY."""


class VolumePlacementConflictError(VolumeError):
    """The volumes asked for cannot be placed together."""


class VolumeTypeNotSupportedError(VolumeError):
    """This kind of volume is not supported."""


class VolumeNotSnapshottableError(VolumeError):
    """The volume cannot be snapshotted."""


class VolumeRunnerIneligibleError(VolumeError):
    """The chosen runner cannot mount the volume."""


class VolumeBackendNotFoundError(VolumeError):
    """The volume's backing claim does not exist."""


class VolumeInUseError(VolumeError):
    """The volume is attached to a sandbox."""


class VolumeQuotaExceededError(VolumeError):
    """The volume quota is used up."""


class VolumeRunnerUnavailableError(VolumeError, SandboxUnavailableError):
    """The runner that holds the volume cannot be reached. Transient."""


class VolumeWaitTimeoutError(SandboxTimeoutError):
    """A volume did not become READY in time; ``volume_id``."""

    _extras: tuple[str, ...] = ("volume_id",)


class DiscoveryError(SandpoolError):
    """Runner discovery failed."""


class DiscoveryValidationError(DiscoveryError, CWSandboxValidationError):
    """A discovery request was refused field by field."""


class RunnerNotFoundError(DiscoveryError):
    """No runner has this ``runner_id``."""

    _extras: tuple[str, ...] = ("runner_id",)


class ProfileNotFoundError(DiscoveryError):
    """No runner profile has this ``profile_name`` (cwsandbox defines it without exporting it)."""

    _extras: tuple[str, ...] = ("profile_name", "runner_id")
