"""sandpool: pools of isolated local sandboxes with the cwsandbox Session API, on trio.

This module only re-exports; the implementation lives in private modules.
"""

from ._config import ResourceOptions, SandboxDefaults, SandboxSpec, SandboxStatus
from ._cwextra import (
    AuthConfig,
    AuthHeaders,
    AuthProvider,
    AuthStrategy,
    PvcVolumeSource,
    Runner,
    RunnerResources,
    Volume,
    VolumeLocality,
    VolumeState,
    WandbAuth,
    disable_signal_handlers,
    format_bytes,
    format_cpu,
    set_auth_mode,
)
from ._isolation.runners import get_runner, list_runners
from ._cwtypes import (
    CidrBlock,
    Container,
    ContainerStatus,
    DataPlaneMode,
    EgressRule,
    Endpoint,
    EndpointAuth,
    EndpointKind,
    EndpointShareToken,
    FileSystemSnapshot,
    FileSystemSnapshotBucketConfig,
    FileSystemSnapshotBucketMode,
    FileSystemSnapshotOptions,
    FileSystemSnapshotStatus,
    FileSystemSnapshotTrigger,
    HttpsEndpointStatus,
    ImagePullCredentials,
    IngressRule,
    NetworkOptions,
    ObjectStorageAccess,
    ObjectStoragePermission,
    PlacementMode,
    PlacementSpillover,
    PortRange,
    RegisteredVolumeOptions,
    SandboxControl,
    SandboxFileType,
    ScratchVolumeOptions,
    Secret,
    SecurityContext,
    SelectorBlock,
    Service,
    ServiceProtocol,
    ServiceVisibility,
    StorageMedium,
    TenantScope,
    TlsPassthroughEndpointStatus,
    VolumeMount,
)
from ._errors_cw import *  # noqa: F403  (cwsandbox's remaining exception classes)
from . import _errors_cw
from ._functions.function import RemoteFunction, Retries
from ._functions.actor import ActorClass, ActorHandle, enter, kill
from ._errors import (
    ActorDiedError,
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
    SandboxProtocolError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxUnavailableError,
    SandpoolError,
    SerializationError,
)
from ._functions.imap import ResultStream
from ._core.opref import OperationCancelled, OperationRef
from ._functions.pool import PoolStatistics
from ._core.waiting import as_completed, gather, results, wait
from ._session.process import Process, ProcessResult, StreamReader, StreamWriter
from ._runtime.contract import Runtime
from ._runtime.local import LocalRuntime
from ._runtime.slurm.runtime import SlurmRuntime
from ._session.sandbox import Sandbox
from ._session.session import Session
from ._session.terminal import TerminalResult, TerminalSession

Waitable = Sandbox | OperationRef | Process | TerminalSession  # type: ignore[type-arg]  # isinstance works with it
"""What ``wait`` and ``results`` accept (cwsandbox's alias)."""

__version__ = "0.1.0"

__all__ = [
    "ActorClass", "ActorDiedError", "ActorHandle", "enter", "kill",
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
    # cwsandbox's option types and helpers (_cwtypes, _cwextra), and the terminal
    "AuthConfig", "AuthHeaders", "AuthProvider", "AuthStrategy", "CidrBlock", "Container", "ContainerStatus",
    "DataPlaneMode", "EgressRule", "Endpoint", "EndpointAuth", "EndpointKind", "EndpointShareToken",
    "FileSystemSnapshot", "FileSystemSnapshotBucketConfig", "FileSystemSnapshotBucketMode",
    "FileSystemSnapshotOptions", "FileSystemSnapshotStatus", "FileSystemSnapshotTrigger", "HttpsEndpointStatus",
    "ImagePullCredentials", "IngressRule", "NetworkOptions", "ObjectStorageAccess", "ObjectStoragePermission",
    "PlacementMode", "PlacementSpillover", "PortRange", "PvcVolumeSource", "RegisteredVolumeOptions", "Runner",
    "RunnerResources", "SandboxControl", "SandboxFileType", "ScratchVolumeOptions", "Secret", "SecurityContext",
    "SelectorBlock", "Service", "ServiceProtocol", "ServiceVisibility", "StorageMedium", "TenantScope",
    "TerminalResult", "TerminalSession", "TlsPassthroughEndpointStatus", "Volume", "VolumeLocality",
    "VolumeMount", "VolumeState", "WandbAuth", "Waitable", "disable_signal_handlers", "format_bytes",
    "format_cpu", "get_runner", "list_runners", "set_auth_mode",
    "SandboxProtocolError",
]
__all__ += _errors_cw.__all__  # the form type checkers read
