"""How a failed call to a sandpool server becomes a sandpool exception: the one place gRPC errors
map (``RemoteRuntime`` and the fast plane's clients raise what ``translate`` returns)."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any, cast

import grpc

from .. import _errors, _errors_cw
from .._errors import SandboxNotFoundError, SandboxUnavailableError
from .._grpc import messages as m

__all__ = ["translate"]


def translate(error: grpc.RpcError, address: str, sandbox_id: str | None = None) -> Exception:
    """The sandpool error (or ValueError/TypeError) for a failed call. The one place gRPC errors map."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    pairs = error.trailing_metadata() or () if hasattr(error, "trailing_metadata") else ()
    # (grpc's stub types the items as key/value records; they are (key, value) namedtuples)
    trailer: dict[str, Any] = dict(cast("Iterable[tuple[str, Any]]", pairs))
    name = trailer.get(m.META_ERROR)
    if name in m.ERROR_NAMES:
        builtin: type[Exception] = getattr(builtins, name)
        return builtin(details)
    cls = (getattr(_errors, name, None) or getattr(_errors_cw, name, None)) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, _errors.SandpoolError):
        extras = m.extras_for(cls, trailer.get(m.META_ERROR_EXTRAS))
        if issubclass(cls, _errors.SandboxError):
            return cls(details, sandbox_id=sandbox_id, **extras)
        return cls(details, **extras)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return _errors.CWSandboxAuthenticationError(f"the sandpool server at {address} refused the call: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return SandboxNotFoundError(details, sandbox_id=sandbox_id)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _errors.SandboxResourceExhaustedError(f"{details} (server {address})", sandbox_id=sandbox_id)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return _errors.ProtocolError(f"the sandpool server at {address} rejected a message: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _errors.SandboxTimeoutError(f"the sandpool server at {address} did not answer in time: {details}",
                                           sandbox_id=sandbox_id)
    return SandboxUnavailableError(f"the sandpool server at {address} is unavailable ({code.name}): {details}",
                                   sandbox_id=sandbox_id)
