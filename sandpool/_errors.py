"""The sandpool exception tree: one base class, few branches, stdlib only.

The root (``SandpoolError``) and the branch to ``ProtocolError`` live with the sandbox side in
``_sandpool_agent.errors``, which owns the wire format; this module builds the rest on them.

Every class takes a message plus keyword-only extras (declared in ``_extras``, defaulting to
None) and keeps them as attributes. ``str(e)`` is the message. Exceptions pickle with their
extras intact, because they cross the agent's wire and process boundaries.
"""

from __future__ import annotations

__all__ = [
    "ActorDiedError",
    "AsyncFunctionError",
    "CWSandboxAuthenticationError",
    "CWSandboxError",
    "FunctionError",
    "ProtocolError",
    "RemoteError",
    "SandboxDiedError",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxResourceExhaustedError",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "SandboxUnavailableError",
    "SandpoolError",
    "SerializationError",
    "SandboxProtocolError",
]


from _sandpool_agent.errors import CWSandboxError, ProtocolError, SandboxError, SandboxProtocolError, SandpoolError


class CWSandboxAuthenticationError(SandpoolError):
    """A sandpool server refused the call: the token is missing or wrong (cwsandbox's name)."""


class SandboxNotRunningError(SandboxError):
    """The operation needs a running sandbox, and this one is stopped or not started."""


class SandboxUnavailableError(SandboxNotRunningError):
    """The runtime or transport that hosts the sandbox cannot be reached. Often transient."""


class SandboxTimeoutError(SandboxError):
    """A client-side wait (start, wait, exec deadline) ran out of time."""


class SandboxTerminatedError(SandboxError):
    """The sandbox was stopped (by this client or another) while it was being waited on."""


class SandboxFailedError(SandboxError):
    """The sandbox reached the FAILED state; ``status_reason`` says why when known."""

    _extras: tuple[str, ...] = ("status_reason",)


class SandboxNotFoundError(SandboxError):
    """No sandbox has this ``sandbox_id`` (never existed, or already deleted)."""


class SandboxExecutionError(SandboxError):
    """A command failed: a non-zero exit with ``check=True``, or a broken exec stream.

    ``exec_result`` is the ProcessResult when there is one; ``exception_type`` and
    ``exception_message`` describe a failure reported by the sandbox side.
    """

    _extras: tuple[str, ...] = ("exec_result", "exception_type", "exception_message")
    exec_result: object  # a ProcessResult (of the session layer, above this module), or None
    exception_type: str | None
    exception_message: str | None


class SandboxFileError(SandboxError):
    """A file operation failed on ``filepath``.

    ``reason`` is one of ``CWSANDBOX_FILE_NOT_FOUND``, ``CWSANDBOX_FILE_IS_DIRECTORY``,
    ``CWSANDBOX_FILE_PERMISSION_DENIED``, ``CWSANDBOX_FILE_TOO_LARGE``,
    ``CWSANDBOX_FILE_IO_FAILED`` or ``CWSANDBOX_FILE_OUTSIDE_SANDBOX``.
    """

    _extras: tuple[str, ...] = ("filepath",)
    filepath: str | None


class SandboxResourceExhaustedError(SandboxError):
    """The machine (or runtime) lacks the cpu, memory, pids or gpus the sandbox asks for."""


class SandboxDiedError(SandboxError):
    """The sandbox's agent died underneath a call: an infrastructure failure, not user code.

    ``exit_code`` or ``signal`` (a number, e.g. 9 for an OOM kill) says how it died. A call
    that meets this error may be retried on a fresh sandbox; the dead one is never reused.
    """

    _extras: tuple[str, ...] = ("exit_code", "signal")
    exit_code: int | None  # set in __init__ (declared for type checkers)
    signal: int | None


class ActorDiedError(SandboxDiedError):
    """An actor is gone: its sandbox (or worker process) died, its constructor raised, it was
    killed, or its session closed. Raised by the calls it had not answered and by later calls
    (unless ``max_restarts`` brought it back: later calls then go to the new instance).
    ``actor_name`` is its name (None for an unnamed actor); ``__cause__`` the death's own error.
    """

    _extras: tuple[str, ...] = ("actor_name",)


class FunctionError(SandpoolError):
    """Base for errors of remote functions (``@session.function``) themselves."""


class AsyncFunctionError(FunctionError):
    """``@session.function`` was applied to an ``async def``, which it does not support."""


class SerializationError(FunctionError):
    """A function, argument or result could not be pickled; ``obj_repr`` names the object."""

    _extras: tuple[str, ...] = ("obj_repr",)


class RemoteError(FunctionError, SandboxExecutionError):
    """A remote function raised an exception that cannot be rebuilt here as its own type.

    Exceptions whose class is loaded here and takes their plain-data arguments are raised as
    themselves (and as SandboxExecutionError too); this box is the fallback, and is also a
    SandboxExecutionError, as in cwsandbox. ``type_name`` (also ``exception_type``) is the remote
    class's qualified name, ``remote_traceback`` the formatted remote traceback, ``sandbox_id``
    where it ran, and ``exception_message`` the remote message.
    """

    _extras: tuple[str, ...] = ("type_name", "remote_traceback", "sandbox_id")
