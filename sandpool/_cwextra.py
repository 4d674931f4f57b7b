"""cwsandbox's module-level helpers and cloud objects, with their local meaning.

- auth (``AuthStrategy``, ``AuthHeaders``, ``AuthProvider``, ``WandbAuth``, ``set_auth_mode``):
  accepted, no local meaning: a local runtime has no account; a sandpool server takes ``token=``.
- discovery: the ``Runner`` record of this machine, the one runner ``"local"`` (``list_runners``
  and ``get_runner``, which read the machine's admission ledger, are in ``_isolation/runners.py``).
- registered volumes (``Volume``, ``PvcVolumeSource``): not supported locally yet (issue 16).
- ``disable_signal_handlers``: nothing to disable (sandpool installs no signal handlers).
- ``format_bytes``, ``format_cpu``: the same human-readable forms as cwsandbox.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ._errors_cw import STATE_ISSUE, NotSupportedLocallyError

__all__ = [
    "AuthConfig", "AuthHeaders", "AuthProvider", "AuthStrategy", "LOCAL_RUNNER_ID", "PvcVolumeSource",
    "Runner", "RunnerResources", "Volume", "VolumeLocality", "VolumeState", "WandbAuth",
    "disable_signal_handlers", "format_bytes", "format_cpu", "set_auth_mode",
]

LOCAL_RUNNER_ID = "local"


class AuthStrategy(enum.StrEnum):
    COREWEAVE_API_KEY = "coreweave_api_key"
    WANDB = "wandb"


@dataclasses.dataclass(frozen=True)
class AuthHeaders:
    """Headers an auth provider resolved to (no local meaning)."""

    headers: Mapping[str, str]
    strategy: str


@runtime_checkable
class AuthProvider(Protocol):
    """Anything that resolves auth headers for a base URL (no local meaning)."""

    def resolve_auth(self, *, base_url: str) -> AuthHeaders: ...


@dataclasses.dataclass(frozen=True)
class WandbAuth:
    """W&B credentials (no local meaning)."""

    entity: str | None = None
    project: str | None = None

    def resolve_auth(self, *, base_url: str) -> AuthHeaders:
        """No headers: a local runtime has no account (the W&B key is never read)."""
        return AuthHeaders(headers={}, strategy=AuthStrategy.WANDB.value)


AuthConfig = AuthStrategy | AuthProvider | AuthHeaders


def set_auth_mode(name: str, get_auth: Any) -> None:
    """Accepted for compatibility; a local runtime has no account, so nothing is recorded."""
    if not isinstance(name, str) or not callable(get_auth):
        raise TypeError(f"set_auth_mode(name, get_auth) takes a str and a callable, got {name!r}, {get_auth!r}")


def disable_signal_handlers() -> None:
    """Accepted for compatibility: sandpool installs no signal handlers (see docs/lifecycle.md)."""


def format_bytes(value: int) -> str:
    """``1536 * 2**20`` -> ``"1.5 GiB"``; under 1 KiB in bytes (``"1000 B"``)."""
    if value < 1024:
        return f"{value} B"
    size = float(value)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        size /= 1024
        if size < 1024 or unit == "PiB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def format_cpu(millicores: int) -> str:
    """``500`` -> ``"0.5 vCPU"``."""
    return f"{millicores / 1000:.1f} vCPU"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerResources:
    available_cpu_millicores: int
    available_memory_bytes: int
    available_gpu_count: int
    running_sandboxes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Runner:
    """A place sandboxes run; locally, this machine."""

    runner_id: str
    organization_id: str
    runner_group_id: str
    tags: tuple[str, ...]
    healthy: bool
    is_shared: bool
    connected_at: Any
    max_cpu_millicores: int
    max_memory_bytes: int
    max_gpu_count: int
    supported_gpu_types: tuple[str, ...]
    supported_architectures: tuple[str, ...]
    supports_privileged: bool
    available_storage_classes: tuple[str, ...]
    supported_service_visibilities: tuple[str, ...]
    resources: RunnerResources | None = None


class VolumeState(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    VALIDATING = "validating"
    READY = "ready"
    ERROR = "error"
    DELETING = "deleting"


class VolumeLocality(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    CLUSTER_LOCAL = "cluster_local"
    GLOBAL = "global"


class PvcVolumeSource:
    """A Kubernetes claim backing a registered volume (not supported locally yet)."""

    def __init__(self, *, runner_id: str, namespace: str, claim_name: str, sub_path: str | None = None) -> None:
        self.runner_id, self.namespace, self.claim_name, self.sub_path = runner_id, namespace, claim_name, sub_path


def _no_volumes(*args: Any, **kwargs: Any) -> Any:
    raise NotSupportedLocallyError(f"registered volumes are not supported locally yet ({STATE_ISSUE})",
                                   feature="Volume")


class Volume:
    """A registered volume. Every operation raises NotSupportedLocallyError (issue 16)."""

    create = get = list = staticmethod(_no_volumes)
    update = delete = validate = wait_until_ready = _no_volumes
