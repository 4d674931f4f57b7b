"""sandpool errors as cwsandbox's gRPC errors: one translation, at one boundary.

cwsandbox's client maps an error to its own exception from the gRPC status code and, first, from an
AIP-193 ``ErrorInfo`` (domain ``cwsandbox.com``) carried in ``grpc-status-details-bin``. So every
failure leaves the server as an :class:`RpcFailure`: code, message, reason, metadata and optional
field violations, which ``status_for`` turns into the status the client parses.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc
import trio

from .. import _errors as sp
from .. import _errors_cw as cw
from .._grpc.bridge import RpcEnded
from ._proto import rpc

log = logging.getLogger("sandpool.cwsandbox")

DOMAIN = "cwsandbox.com"
SANDBOX_NOT_FOUND = "CWSANDBOX_SANDBOX_NOT_FOUND"
BACKEND_UNAVAILABLE = "CWSANDBOX_BACKEND_UNAVAILABLE"
REQUEST_ID_CONFLICT = "CWSANDBOX_REQUEST_ID_CONFLICT"
NOT_IMPLEMENTED = "CWSANDBOX_NOT_IMPLEMENTED"
FILE_TOO_LARGE = "CWSANDBOX_FILE_TOO_LARGE"
INVALID_REQUEST = "CWSANDBOX_INVALID_REQUEST"
#: sandpool's snapshot errors as the client's snapshot reasons (the rest: a failed capture)
_SNAPSHOT_REASONS: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (cw.SnapshotNotFoundError, grpc.StatusCode.NOT_FOUND, "CWSANDBOX_FSS_NOT_FOUND"),
    (cw.SnapshotNotSupportedError, grpc.StatusCode.FAILED_PRECONDITION, "CWSANDBOX_FSS_NOT_SUPPORTED"),
    (cw.SandboxSnapshotError, grpc.StatusCode.INTERNAL, "CWSANDBOX_FSS_CREATE_FAILED"),
)

#: sandpool's file reasons the client does not know, as the nearest one it does (the original is
#: kept in the metadata as ``sandpool_reason``); unknown reasons would fall through to the code.
_FILE_REASONS = {
    "CWSANDBOX_FILE_OUTSIDE_SANDBOX": "CWSANDBOX_FILE_PERMISSION_DENIED",
    "CWSANDBOX_FILE_NO_SPACE": "CWSANDBOX_FILE_IO_FAILED",
    "CWSANDBOX_FILE_INVALID": "CWSANDBOX_FILE_IO_FAILED",
    "CWSANDBOX_FILE_NOT_REGULAR": "CWSANDBOX_FILE_PERMISSION_DENIED",  # a FIFO or device, not asked for
}
_FILE_CODES = {
    "CWSANDBOX_FILE_NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "CWSANDBOX_FILE_IS_DIRECTORY": grpc.StatusCode.FAILED_PRECONDITION,
    "CWSANDBOX_FILE_PERMISSION_DENIED": grpc.StatusCode.FAILED_PRECONDITION,
    "CWSANDBOX_FILE_TOO_LARGE": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclasses.dataclass(eq=False)
class RpcFailure(Exception):
    """A failure to report to the client as a gRPC status with AIP-193 details."""

    code: grpc.StatusCode
    message: str
    reason: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    violations: tuple[tuple[str, str], ...] = ()  # (field, description) for INVALID_ARGUMENT

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, bytes], ...]) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


def status_for(failure: RpcFailure) -> grpc.Status:
    """The grpc.Status (with ``grpc-status-details-bin``) that reports ``failure``."""
    status = rpc.Status(code=failure.code.value[0], message=failure.message)
    if failure.reason:
        status.details.add().Pack(rpc.ErrorInfo(reason=failure.reason, domain=DOMAIN, metadata=failure.metadata))
    if failure.violations:
        bad = rpc.BadRequest()
        for field, description in failure.violations:
            bad.field_violations.add(field=field, description=description)
        status.details.add().Pack(bad)
    return _Status(failure.code, failure.message, (("grpc-status-details-bin", status.SerializeToString()),))


def not_found(sandbox_id: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.NOT_FOUND, f"sandbox {sandbox_id!r} not found", SANDBOX_NOT_FOUND,
                      {"sandbox_id": sandbox_id})


def unimplemented(what: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by the local sandpool server",
                      NOT_IMPLEMENTED)


def invalid(field: str, message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message, violations=((field, message),))


def file_failure(reason: str, message: str, path: str, **metadata: str) -> RpcFailure:
    """A file operation's failure with a reason the client maps to SandboxFileError."""
    known = _FILE_REASONS.get(reason, reason)
    extra = {"filepath": path, **metadata}
    if known != reason:
        extra["sandpool_reason"] = reason
    return RpcFailure(_FILE_CODES.get(known, grpc.StatusCode.INTERNAL), message, known, extra)


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as trio's nurseries raise them."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (leaves or exc.exceptions)[0]
    return exc


def translate(exc: BaseException) -> RpcFailure:
    """The RpcFailure for any exception raised while serving a call (logged if unexpected)."""
    exc = _first_leaf(exc)
    if isinstance(exc, trio.Cancelled):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, "the sandpool server is shutting down", BACKEND_UNAVAILABLE)
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, RpcEnded):
        return RpcFailure(grpc.StatusCode.CANCELLED, str(exc))
    message = str(exc) or type(exc).__name__
    sandbox_id = getattr(exc, "sandbox_id", None)
    for kind, code, reason in _SNAPSHOT_REASONS:
        if isinstance(exc, kind):
            snapshot_id = getattr(exc, "file_system_snapshot_id", None)
            return RpcFailure(code, message, reason, {"file_system_snapshot_id": snapshot_id} if snapshot_id else {})
    if isinstance(exc, sp.SandboxNotFoundError):
        return not_found(sandbox_id or "?")
    if isinstance(exc, sp.SandboxFileError):
        return file_failure(exc.reason or "CWSANDBOX_FILE_IO_FAILED", message, exc.filepath or "")
    if isinstance(exc, sp.SandboxTimeoutError):
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, message)
    if isinstance(exc, sp.SandboxResourceExhaustedError):
        return RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    if isinstance(exc, sp.SandboxUnavailableError):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, message, BACKEND_UNAVAILABLE)
    if isinstance(exc, (sp.SandboxNotRunningError, sp.SandboxDiedError, sp.SandboxTerminatedError,
                        sp.SandboxFailedError)):
        # CANCELLED is what the client turns into SandboxNotRunningError.
        return RpcFailure(grpc.StatusCode.CANCELLED, message)
    if isinstance(exc, (ValueError, TypeError)):
        return invalid("sandbox.spec", message)
    if isinstance(exc, sp.SandpoolError):
        return RpcFailure(grpc.StatusCode.INTERNAL, message)
    log.error("unexpected error while serving a cwsandbox call", exc_info=exc)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error in the sandpool server: {message}")
