"""sandpool: pools of isolated local sandboxes with the cwsandbox Session API, on trio.

This module only re-exports; the implementation lives in private modules.
"""

from ._config import ResourceOptions, SandboxDefaults, SandboxSpec, SandboxStatus
from ._function import RemoteFunction, Retries
from ._errors import (
    AsyncFunctionError,
    CWSandboxAuthenticationError,
    CWSandboxError,
    FunctionError,
    ProtocolError,
    RemoteError,
    SandboxDiedError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxUnavailableError,
    SandpoolError,
    SerializationError,
)
from ._imap import ResultStream
from ._opref import OperationCancelled, OperationRef
from ._pool import PoolStatistics
from ._waiting import as_completed, gather, results, wait
from ._process import Process, ProcessResult, StreamReader, StreamWriter
from ._runtime._contract import Runtime
from ._runtime._local import LocalRuntime
from ._runtime._slurm import SlurmRuntime
from ._sandbox import Sandbox
from ._session import Session

__version__ = "0.1.0"

__all__ = [
    "AsyncFunctionError", "CWSandboxAuthenticationError", "CWSandboxError", "FunctionError", "LocalRuntime",
    "OperationCancelled",
    "OperationRef", "PoolStatistics", "Process", "ProcessResult", "ProtocolError", "RemoteError", "RemoteFunction",
    "ResourceOptions", "ResultStream", "Retries",
    "Runtime", "Sandbox", "SandboxDefaults", "SandboxDiedError", "SandboxError", "SandboxExecutionError",
    "SandboxFailedError", "SandboxFileError", "SandboxNotFoundError", "SandboxNotRunningError",
    "SandboxResourceExhaustedError", "SandboxSpec", "SandboxStatus", "SandboxTerminatedError",
    "SandboxTimeoutError", "SandboxUnavailableError", "SandpoolError", "SerializationError", "Session",
    "SlurmRuntime",
    "StreamReader", "StreamWriter", "__version__", "as_completed", "gather", "results", "wait",
]
