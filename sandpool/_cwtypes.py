"""cwsandbox's option value types (network, services, secrets, containers, volumes, snapshots).

Frozen keyword-only value objects with cwsandbox 1.22's names and fields, so option values written
for cwsandbox build unchanged; each accepts its dict form through ``coerce``. What they mean
locally is decided where the option is validated (``_config``): some work (``Secret``,
``NetworkOptions`` egress), some are accepted without local effect, and some raise
``NotSupportedLocallyError`` until a later issue gives them a meaning (volumes, snapshots,
services, network ingress). Stdlib only.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from typing import Any, Self

__all__ = [
    "CidrBlock", "Container", "ContainerStatus", "DataPlaneMode", "EgressRule", "Endpoint",
    "EndpointAuth", "EndpointKind", "EndpointShareToken", "FileSystemSnapshot",
    "FileSystemSnapshotBucketConfig", "FileSystemSnapshotBucketMode", "FileSystemSnapshotOptions",
    "FileSystemSnapshotStatus", "FileSystemSnapshotTrigger", "HttpsEndpointStatus",
    "ImagePullCredentials", "IngressRule", "NetworkOptions", "ObjectStorageAccess",
    "ObjectStoragePermission", "PlacementMode", "PlacementSpillover", "PortRange",
    "RegisteredVolumeOptions", "SandboxControl", "SandboxFileType", "ScratchVolumeOptions", "Secret",
    "SecurityContext", "SelectorBlock", "Service", "ServiceProtocol", "ServiceVisibility",
    "StorageMedium", "TenantScope", "TlsPassthroughEndpointStatus", "VolumeMount", "coerce",
]


class _Choice(enum.StrEnum):
    """A StrEnum whose constructor names the valid values when given a wrong one."""

    @classmethod
    def parse(cls, value: object) -> Self:
        """``value`` (a member, or its value in any case) as a member; ValueError naming the valid ones."""
        if not isinstance(value, str):
            raise cls._invalid(value)
        return cls(value)

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        raise cls._invalid(value)

    @classmethod
    def _invalid(cls, value: object) -> ValueError:
        return ValueError(f"{value!r} is not a valid {cls.__name__}; use one of "
                          f"{', '.join(repr(m.value) for m in cls)}")


class PlacementMode(_Choice):
    UNSPECIFIED = "unspecified"
    SERVERLESS = "serverless"
    CKS = "cks"


class PlacementSpillover(_Choice):
    STRICT = "strict"
    CKS_THEN_SERVERLESS = "cks_then_serverless"
    SERVERLESS_THEN_CKS = "serverless_then_cks"


class DataPlaneMode(_Choice):
    AUTO = "auto"
    GATEWAY = "gateway"
    DIRECT = "direct"


class TenantScope(_Choice):
    UNSPECIFIED = "unspecified"
    SAME_USER = "same_user"
    SAME_ORG = "same_org"
    SANDBOX_NETWORK = "sandbox_network"


class ServiceProtocol(_Choice):
    UNSPECIFIED = "unspecified"
    TCP = "tcp"
    UDP = "udp"
    SCTP = "sctp"


class ServiceVisibility(_Choice):
    UNSPECIFIED = "unspecified"
    PUBLIC = "public"
    PRIVATE = "private"
    CUSTOM = "custom"


class EndpointKind(_Choice):
    HTTPS = "https"
    TLS_PASSTHROUGH = "tls_passthrough"


class EndpointAuth(_Choice):
    OPEN = "open"
    SHARE_TOKEN = "share_token"


class ObjectStoragePermission(_Choice):
    UNSPECIFIED = "unspecified"
    READ = "read"
    READ_WRITE = "read_write"


class StorageMedium(_Choice):
    UNSPECIFIED = "unspecified"
    DISK = "disk"
    MEMORY = "memory"


class SandboxFileType(_Choice):
    UNSPECIFIED = "unspecified"
    COMPOSE = "compose"


class SandboxControl(_Choice):
    UNSPECIFIED = "unspecified"
    PLATFORM = "platform"
    CONTAINER_ENGINE = "container_engine"


class FileSystemSnapshotStatus(_Choice):
    UNSPECIFIED = "unspecified"
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class FileSystemSnapshotTrigger(_Choice):
    UNSPECIFIED = "unspecified"
    ON_DELETE = "on_delete"
    MANUAL = "manual"


class FileSystemSnapshotBucketMode(_Choice):
    UNSPECIFIED = "unspecified"
    CW_MANAGED = "cw_managed"
    BRING_YOUR_OWN = "bring_your_own"


def coerce(cls: type, value: object, field: str) -> Any:
    """``value`` as a ``cls``: itself, or built from its dict form; TypeError naming ``field``."""
    if value is None or isinstance(value, cls):
        return value
    if issubclass(cls, enum.Enum):
        return cls(value)
    if isinstance(value, Mapping) and dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise TypeError(f"{field} has unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(names))}")
        return cls(**value)
    raise TypeError(f"{field} must be a {cls.__name__} or a dict of its fields, got "
                    f"{type(value).__name__} {value!r}")


def _tuple_of(cls: type, value: object, field: str) -> tuple[Any, ...] | None:
    """A list of ``cls`` (or their dict forms) as a tuple; None stays None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{field} must be a list of {cls.__name__}, got {type(value).__name__} {value!r}")
    return tuple(coerce(cls, item, f"{field}[{i}]") for i, item in enumerate(value))


def _put(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _exactly_one(obj: object, names: tuple[str, ...], what: str) -> None:
    given = [n for n in names if getattr(obj, n)]
    if len(given) != 1:
        raise ValueError(f"{what} needs exactly one of {', '.join(names)}, got "
                         f"{', '.join(given) or 'none'}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PortRange:
    """A port, or ``port``..``end_port``; ``protocol`` is a ServiceProtocol."""

    port: int
    end_port: int | None = None
    protocol: ServiceProtocol | None = None

    def __post_init__(self) -> None:
        for name in ("port", "end_port"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= 65535):
                raise ValueError(f"PortRange.{name} must be an int in 1..65535, got {value!r}")
        _put(self, "protocol", coerce(ServiceProtocol, self.protocol, "PortRange.protocol"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CidrBlock:
    """An address block, minus ``except_cidrs``."""

    cidr: str
    except_cidrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _put(self, "except_cidrs", tuple(self.except_cidrs))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectorBlock:
    """Peers chosen by Kubernetes labels (no local meaning)."""

    pod_labels: Mapping[str, str]
    namespace_labels: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EgressRule:
    """Where a sandbox may connect: exactly one of dns_name, cidr, tenant, any, selector."""

    dns_name: str | None = None
    cidr: CidrBlock | str | None = None
    tenant: TenantScope | None = None
    any: bool = False
    selector: SelectorBlock | None = None
    ports: tuple[PortRange, ...] | None = None
    dns_name_except: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, ("dns_name", "cidr", "tenant", "any", "selector"), "EgressRule")
        _put(self, "tenant", coerce(TenantScope, self.tenant, "EgressRule.tenant"))
        _put(self, "ports", _tuple_of(PortRange, self.ports, "EgressRule.ports"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngressRule:
    """Who may connect to a sandbox: exactly one of cidr, tenant, any."""

    cidr: CidrBlock | str | None = None
    tenant: TenantScope | None = None
    any: bool = False
    ports: tuple[PortRange, ...] | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, ("cidr", "tenant", "any"), "IngressRule")
        _put(self, "tenant", coerce(TenantScope, self.tenant, "IngressRule.tenant"))
        _put(self, "ports", _tuple_of(PortRange, self.ports, "IngressRule.ports"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NetworkOptions:
    """A sandbox's network policy. Locally: ``deny_egress=True`` is no network, an ``any`` egress
    rule (or none) the host's network; other egress rules and any ingress rule are refused."""

    deny_egress: bool | None = None
    deny_ingress: bool | None = None
    egress: tuple[EgressRule, ...] | None = None
    ingress: tuple[IngressRule, ...] | None = None

    def __post_init__(self) -> None:
        _put(self, "egress", _tuple_of(EgressRule, self.egress, "NetworkOptions.egress"))
        _put(self, "ingress", _tuple_of(IngressRule, self.ingress, "NetworkOptions.ingress"))
        if self.deny_egress and self.egress:
            raise ValueError("NetworkOptions: deny_egress=True cannot be combined with egress rules; drop one")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Endpoint:
    """A public endpoint of a Service (no local meaning yet)."""

    kind: EndpointKind
    auth: EndpointAuth | None = None
    request_timeout_seconds: float | None = None

    def __post_init__(self) -> None:
        _put(self, "kind", coerce(EndpointKind, self.kind, "Endpoint.kind"))
        _put(self, "auth", coerce(EndpointAuth, self.auth, "Endpoint.auth"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Service:
    """A port the sandbox serves (no local meaning yet: issue 16)."""

    port: int
    name: str | None = None
    protocol: ServiceProtocol | None = None
    visibility: ServiceVisibility | None = None
    endpoint: Endpoint | None = None

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"Service.port must be an int in 1..65535, got {self.port!r}")
        _put(self, "protocol", coerce(ServiceProtocol, self.protocol, "Service.protocol"))
        _put(self, "visibility", coerce(ServiceVisibility, self.visibility, "Service.visibility"))
        _put(self, "endpoint", coerce(Endpoint, self.endpoint, "Service.endpoint"))


class EndpointShareToken:
    """A secret token for a share-token endpoint; its repr hides the value."""

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "EndpointShareToken('**********')"

    def get_secret_value(self) -> str:
        return self._value

    def as_headers(self) -> dict[str, str]:
        return {"X-Sandbox-Share-Token": self._value}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HttpsEndpointStatus:
    port: int
    name: str
    kind: EndpointKind
    auth: EndpointAuth
    url: str
    request_timeout_seconds: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TlsPassthroughEndpointStatus:
    port: int
    name: str
    kind: EndpointKind
    address: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Secret:
    """A secret injected as the environment variable ``env_var`` (default: ``name``).

    Locally the value comes from the client: ``store="env"`` reads the client's environment
    variable ``name``; any other store reads ``$SANDPOOL_SECRETS_FILE`` (see docs/api.md).
    """

    store: str
    name: str
    field: str = ""
    env_var: str | None = None

    def __post_init__(self) -> None:
        for attr in ("store", "name"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value:
                raise ValueError(f"Secret.{attr} must be a non-empty str, got {value!r}; "
                                 f"use e.g. Secret(store='env', name='API_KEY')")
        if not isinstance(self.field, str):
            raise TypeError(f"Secret.field must be a str, got {self.field!r}")
        env_var = self.name if self.env_var is None else self.env_var
        if not isinstance(env_var, str) or not env_var or "=" in env_var or "\0" in env_var:
            raise ValueError(f"Secret.env_var must be an environment variable name, got {env_var!r}")
        _put(self, "env_var", env_var)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecurityContext:
    """Who the container runs as and with what privileges (no local meaning)."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    privileged: bool | None = None
    allow_privilege_escalation: bool | None = None
    read_only_root_filesystem: bool | None = None
    capabilities_add: tuple[str, ...] | None = None
    capabilities_drop: tuple[str, ...] | None = None
    seccomp_profile: str | None = None

    def __post_init__(self) -> None:
        for name in ("capabilities_add", "capabilities_drop"):
            if getattr(self, name) is not None:
                _put(self, name, tuple(getattr(self, name)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePullCredentials:
    """Registry credentials from a secret store (no local meaning)."""

    registry: str
    store: str
    name: str
    field: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectStorageAccess:
    """Object-storage buckets the sandbox may use (no local meaning)."""

    buckets: tuple[str, ...] = ()
    permission: ObjectStoragePermission | None = None
    object_prefix: str | None = None

    def __post_init__(self) -> None:
        _put(self, "buckets", tuple(self.buckets))
        _put(self, "permission", coerce(ObjectStoragePermission, self.permission,
                                        "ObjectStorageAccess.permission"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class VolumeMount:
    volume: str
    mount_path: str
    read_only: bool = False
    sub_path: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScratchVolumeOptions:
    """A scratch volume (locally: issue 16)."""

    name: str
    mount_path: str | None = None
    size: str | None = None
    restore_from_snapshot_id: str | None = None
    medium: StorageMedium | None = None
    sub_path: str | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        _put(self, "medium", coerce(StorageMedium, self.medium, "ScratchVolumeOptions.medium"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisteredVolumeOptions:
    """A registered volume mounted into the sandbox (locally: issue 16)."""

    name: str
    volume_id: str
    mount_path: str
    sub_path: str | None = None
    read_only: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileSystemSnapshotOptions:
    """One scratch volume that can be snapshotted (locally: issue 16)."""

    mount_path: str | None = None
    size: str | None = None
    file_system_snapshot_id: str | None = None
    name: str = "workspace"

    def to_scratch_volume(self) -> ScratchVolumeOptions:
        return ScratchVolumeOptions(name=self.name, mount_path=self.mount_path, size=self.size,
                                    restore_from_snapshot_id=self.file_system_snapshot_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileSystemSnapshot:
    file_system_snapshot_id: str
    status: FileSystemSnapshotStatus
    status_reason: str = ""
    size_bytes: int = 0
    source_sandbox_id: str = ""
    trigger: FileSystemSnapshotTrigger = FileSystemSnapshotTrigger.UNSPECIFIED
    request_id: str = ""
    object_bucket: str = ""
    source_volume_name: str = ""
    created_at: Any = None
    updated_at: Any = None
    completed_at: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileSystemSnapshotBucketConfig:
    mode: FileSystemSnapshotBucketMode = FileSystemSnapshotBucketMode.UNSPECIFIED
    bucket_name: str = ""
    region: str = ""
    effective_bucket_name: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Container:
    """One container of a sandbox with several (a pod, see ``sandpool._pods``): its own image,
    command, environment, limits, filesystem and processes; all share the sandbox's network.

    Checked as cwsandbox checks it: ``image`` non-empty, ``name`` a DNS-1123 label, ``args`` a list
    of strings, ``working_dir`` absolute; ValueError/TypeError naming the field, value and fix."""

    image: str
    name: str | None = None
    command: str | None = None
    args: tuple[str, ...] | None = None
    environment_variables: Mapping[str, str] | None = None
    resources: Any = None
    mounted_files: Any = None
    volume_mounts: tuple[VolumeMount, ...] | None = None
    secrets: tuple[Secret, ...] | None = None
    working_dir: str | None = None
    image_pull_credentials: ImagePullCredentials | None = None
    primary: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise ValueError(f"Container.image must be a non-empty image name, got {self.image!r}; "
                             f"use e.g. image='host' or image='python:3.11'")
        if self.name == "" or self.command == "" or self.working_dir == "":
            for name in ("name", "command", "working_dir"):
                if getattr(self, name) == "":
                    _put(self, name, None)  # cwsandbox: empty means not given
        if self.name is not None and (not isinstance(self.name, str) or not _DNS_LABEL.fullmatch(self.name)):
            raise ValueError(f"Container.name must be a DNS-1123 label (lowercase letters, digits and '-', at most "
                             f"63 characters), got {self.name!r}; use e.g. name='web'")
        if self.command is not None and not isinstance(self.command, str):
            raise TypeError(f"Container.command must be a str (the program), got {self.command!r}; put its "
                            f"arguments in args, e.g. command='python', args=['-m', 'http.server']")
        if self.args is not None:
            if isinstance(self.args, (str, bytes)) or not all(isinstance(a, str) for a in self.args):
                raise TypeError(f"Container.args must be a list of strings, got {self.args!r}; use e.g. "
                                f"args=['-c', 'print(1)']")
            _put(self, "args", tuple(self.args))
        if self.environment_variables is not None:
            _put(self, "environment_variables", dict(self.environment_variables))
        if self.working_dir is not None and (not isinstance(self.working_dir, str)
                                             or not self.working_dir.startswith("/")):
            raise ValueError(f"Container.working_dir must be an absolute path, got {self.working_dir!r}; "
                             f"use e.g. working_dir='/work'")
        _put(self, "volume_mounts", _tuple_of(VolumeMount, self.volume_mounts, "Container.volume_mounts"))
        _put(self, "secrets", _tuple_of(Secret, self.secrets, "Container.secrets"))
        if not isinstance(self.primary, bool):
            raise TypeError(f"Container.primary must be True or False, got {self.primary!r}")


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContainerStatus:
    """The state of one container; locally a sandbox has one, named "main"."""

    name: str
    state: Any
    exit_code: int | None = None
    restart_count: int = 0
