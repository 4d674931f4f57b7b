"""Sandbox options: resources, defaults, the resolved spec and the one merge.

Stdlib only: the agent and the service import it without trio. Every option of a sandbox is
declared once, in ``_SandboxOptions``; ``resolve_spec`` is the only place overrides meet defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Self

from . import _options_cw, _pods, _templates
from ._ids import check_snapshot_id
from ._quantity import parse_cpu, parse_memory, parse_pids
from ._status import SandboxStatus

__all__ = [
    "CLOUD_ONLY_OPTIONS", "ISOLATION_LEVELS", "ResourceOptions", "SandboxDefaults", "SandboxSpec",
    "SandboxStatus", "parse_cpu", "parse_memory", "resolve_spec",
]

CLOUD_ONLY_OPTIONS = frozenset({
    "base_url", "auth", "runner_ids", "placement_mode", "placement_spillover", "data_plane_mode",
    "poll_retry_budget_seconds", "poll_rpc_timeout_seconds", "create_retry_budget_seconds",
    "temp_dir", "runtime_class", "security_context", "services", "volumes", "secrets",
    "object_storage_access", "file_system_snapshot", "containers", "image_pull_credentials",
    "mounted_files", "template_id",
})
"""cwsandbox's options beyond the local core: each is a field, whose local meaning (an effect, none,
or NotSupportedLocallyError) ``_options_cw.normalise`` decides; docs/differences.md lists them."""

#: The options ``session.function(...)`` takes beside the sandbox's: offered when a misspelt option
#: is close to one of them (``retires=3``), since those reach ``resolve_spec`` as unknown names.
FUNCTION_OPTIONS = ("retries", "timeout_seconds", "max_concurrency", "reuse")

ISOLATION_LEVELS = ("auto", "process", "namespaces", "oci")
"""Values of ``isolation``; "auto" picks the strongest level the machine supports."""


def _suggest(name: str, valid: Sequence[str]) -> str:
    """'; did you mean 'x'?' for the closest valid name, or '.' when none is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


# --- resources -------------------------------------------------------------------------------


class _FrozenDict(dict[str, Any]):
    """A read-only dict that hashes by content: options can key a pool and still JSON-encode."""

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("this mapping is read-only; build a new one, e.g. with_overrides(...)")

    # every mutator raises, whatever dict's signature for it
    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]  # dict's is None: this one hashes
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (dict(self),))


_RESOURCE_PARSERS: dict[str, Any] = {
    "cpu": parse_cpu, "memory": parse_memory, "ephemeral-storage": parse_memory,
    "pids": parse_pids,
}
_GPU_KEYS = ("count", "type", "memory_gb")


def _resource_side(side: str, value: object) -> _FrozenDict | None:
    """Validate requests or limits: known resources with valid quantities; {} becomes None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{side} must be a dict of resources, got {type(value).__name__} "
                        f"{value!r}; use e.g. {side}={{'cpu': '2', 'memory': '1Gi'}}")
    for key, quantity in value.items():
        if key not in _RESOURCE_PARSERS:
            if "gpu" in str(key):
                raise ValueError(f"{side}[{key!r}] is not a resource key; use gpu=N or "
                                 f"gpu={{'count': N, 'type': ...}} beside {side}")
            raise ValueError(f"unknown resource {key!r} in {side}"
                             f"{_suggest(str(key), list(_RESOURCE_PARSERS))} "
                             f"Valid resources: {', '.join(_RESOURCE_PARSERS)}")
        _RESOURCE_PARSERS[key](quantity, field=f"{side}[{key!r}]")
    return _FrozenDict(value) or None


def _gpu(value: object) -> _FrozenDict | None:
    """Normalise gpu to ``{"count": n}``, plus "type"/"memory_gb" when given; count 0 is None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"count": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"gpu must be an int or a dict, got {type(value).__name__} {value!r}; "
                        f"use e.g. gpu=1 or gpu={{'count': 1, 'type': 'A100'}}")
    for key in value:
        if key not in _GPU_KEYS:
            raise ValueError(f"unknown gpu key {key!r}{_suggest(str(key), _GPU_KEYS)} "
                             f"Valid keys: {', '.join(_GPU_KEYS)}")
    count, kind, memory_gb = (value.get(k) for k in _GPU_KEYS)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"gpu['count'] must be an int >= 0, got {count!r}; "
                         f"use e.g. gpu={{'count': 1, 'type': {kind!r}}}")
    if kind is not None and not isinstance(kind, str):
        raise TypeError(f"gpu['type'] must be a str or None, got {kind!r}; use e.g. 'A100'")
    if memory_gb is not None and (isinstance(memory_gb, bool) or not isinstance(
            memory_gb, (int, float)) or not 0 < memory_gb < math.inf):
        raise ValueError(f"gpu['memory_gb'] must be a number > 0, got {memory_gb!r}; use e.g. 80")
    normal = {k: v for k, v in zip(_GPU_KEYS, (count, kind, memory_gb)) if v is not None}
    return _FrozenDict(normal) if count else None


def _parsed(side: str, key: str, doc: str) -> Any:
    """A property giving ``requests``/``limits`` [key] parsed to a number, or None if unset."""

    def get(self: ResourceOptions) -> Any:
        mapping = getattr(self, side)
        if mapping is None or key not in mapping:
            return None
        return _RESOURCE_PARSERS[key](mapping[key])

    return property(get, doc=doc)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResourceOptions:
    """cpu, memory, pids and ephemeral-storage requests and limits, plus gpus.

    Quantities use Kubernetes syntax (``cpu="500m"``, ``memory="1Gi"``). Empty dicts become
    None; if only one of requests and limits is given it is used for both; ``gpu=2`` means
    ``{"count": 2}``. Raises ValueError for an unknown resource, a bad quantity or a request
    above its limit; TypeError for a wrong type. Use ``coerce`` to accept the dict forms.
    """

    requests: Mapping[str, str | int | float] | None = None
    limits: Mapping[str, str | int | float] | None = None
    gpu: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        requests = _resource_side("requests", self.requests)
        limits = _resource_side("limits", self.limits)
        requests, limits = requests or limits, limits or requests
        for key in (requests or {}).keys() & (limits or {}).keys():
            assert requests is not None and limits is not None  # a key is in both
            req, lim = requests[key], limits[key]
            if _RESOURCE_PARSERS[key](req) > _RESOURCE_PARSERS[key](lim):
                raise ValueError(f"requests[{key!r}]={req!r} exceeds limits[{key!r}]={lim!r}; "
                                 f"raise the limit or lower the request")
        object.__setattr__(self, "requests", requests)
        object.__setattr__(self, "limits", limits)
        object.__setattr__(self, "gpu", _gpu(self.gpu))

    @classmethod
    def coerce(cls, value: object) -> ResourceOptions | None:
        """Return ResourceOptions (or None) from any accepted form of ``resources``.

        Accepts None; a ResourceOptions; the nested dict ``{"requests": .., "limits": ..,
        "gpu": ..}``; or the flat dict ``{"cpu": "2", "memory": "1Gi", "gpu": 1}``, whose
        quantities become both requests and limits. An empty dict is None.
        """
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"resources must be None, a ResourceOptions, a dict like "
                            f"{{'cpu': '2', 'memory': '1Gi', 'gpu': 1}} or a dict like "
                            f"{{'requests': {{...}}, 'limits': {{...}}, 'gpu': 1}}; got "
                            f"{type(value).__name__} {value!r}")
        if not value.keys() & {"requests", "limits"}:
            flat = {k: v for k, v in value.items() if k != "gpu"}
            return cls(requests=flat, limits=flat, gpu=value.get("gpu")) if value else None
        for key in value:
            if key not in ("requests", "limits", "gpu"):
                raise ValueError(f"resources mixes the nested and flat forms ({key!r} beside "
                                 f"'requests'/'limits'); move {key!r} into requests/limits")
        return cls(**value)

    cpu_request = _parsed("requests", "cpu", "Requested cores (float), or None.")
    cpu_limit = _parsed("limits", "cpu", "Core limit (float), or None.")
    memory_request = _parsed("requests", "memory", "Requested memory in bytes (int), or None.")
    memory_limit = _parsed("limits", "memory", "Memory limit in bytes (int), or None.")
    pids_limit = _parsed("limits", "pids", "Maximum number of processes (int), or None.")

    @property
    def gpu_count(self) -> int:
        """Number of gpus; 0 when none are asked for."""
        return self.gpu["count"] if self.gpu else 0

    def to_dict(self) -> dict[str, dict[str, Any] | None]:
        """The nested form in plain dicts, ``{"requests": .., "limits": .., "gpu": ..}``."""
        return {k: None if v is None else dict(v) for k, v in
                (("requests", self.requests), ("limits", self.limits), ("gpu", self.gpu))}


# --- sandbox options -------------------------------------------------------------------------


def _str_tuple(field: str, value: object) -> tuple[str, ...]:
    """Return a list of strings as a tuple; a bare string is rejected (it is not a list)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{field} must be a list of strings, not a string: got {value!r}; "
                        f"use {field}=[{value!r}]")
    if not isinstance(value, Sequence):
        raise TypeError(f"{field} must be a list of strings, got {type(value).__name__} "
                        f"{value!r}; use e.g. {field}=['x']")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{field}[{i}] must be a str, got {type(item).__name__} {item!r}; "
                            f"use {str(item)!r}")
    return tuple(value)


def _str_mapping(field: str, value: object) -> _FrozenDict:
    """Return a read-only copy of a str-to-str mapping; environment names are checked too."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a dict of str to str, got {type(value).__name__} "
                        f"{value!r}; use e.g. {field}={{'KEY': 'value'}}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"{field} keys and values must be str, got {key!r}: {item!r}; "
                            f"use {str(key)!r}: {str(item)!r}")
        if field == "environment_variables" and (not key or "=" in key or "\0" in key + item):
            raise ValueError(f"environment_variables has an invalid entry {key!r}: {item!r}; "
                             f"names must be non-empty without '=', and nothing may contain NUL")
    return _FrozenDict(value)


def _seconds(field: str, value: object, example: float) -> float:
    """Return a finite number of seconds > 0 as a float."""
    number = value if not isinstance(value, bool) and isinstance(value, (int, float)) else None
    if number is None or not 0 < number < math.inf:
        raise (ValueError if number is not None else TypeError)(
            f"{field} must be a finite number of seconds > 0, got {type(value).__name__} "
            f"{value!r}; use e.g. {field}={example}")
    return float(number)


def _text(field: str, value: object, example: str, *, optional: bool = True) -> None:
    """Check for a non-empty str (or None when optional); TypeError, or ValueError for ''."""
    if (value is not None or not optional) and (not isinstance(value, str) or not value):
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{field} must be a non-empty str{' or None' if optional else ''}, got {value!r}; "
            f"use e.g. {field}={example!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SandboxOptions:
    """Every option of a sandbox, declared once; validated and normalised on construction.

    Lists become tuples and dicts read-only dicts (so options hash and compare by content);
    ``resources`` goes through ``ResourceOptions.coerce``. Raises TypeError or ValueError
    naming the field, the value and the fix.
    """

    container_image: str = "host"
    command: str | None = None  # None: no command; the agent just stays alive
    args: tuple[str, ...] | None = None
    tags: tuple[str, ...] = ()
    environment_variables: Mapping[str, str] = dataclasses.field(default_factory=_FrozenDict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=_FrozenDict)
    resources: ResourceOptions | None = None
    working_dir: str | None = None
    max_lifetime_seconds: float | None = None  # None: lives until stopped
    idle_timeout_seconds: float | None = None  # stopped after this long with nothing running; None: never
    request_timeout_seconds: float = 300.0
    isolation: str = "auto"  # one of ISOLATION_LEVELS
    network: object = None  # "none", "host", a bool or NetworkOptions; None: "none" if it can be
    max_output_bytes: int = 64 * 1024 * 1024  # per exec stream, kept for results
    # cwsandbox's cloud options (CLOUD_ONLY_OPTIONS), in the plain form _options_cw.normalise gives.
    # Local effect: secrets (environment variables, resolved by resolve_spec), mounted_files (written
    # before start() resolves), runtime_class/placement_mode (reported). The others: see _options_cw.
    secrets: tuple[Mapping[str, str], ...] | None = None
    mounted_files: tuple[Mapping[str, Any], ...] | None = None
    runtime_class: str | None = None
    placement_mode: str | None = None
    placement_spillover: str | None = None
    runner_ids: tuple[str, ...] | None = None
    data_plane_mode: str | None = None
    base_url: str | None = None
    auth: object = None  # checked for type, then not kept (no local meaning, and a credential)
    create_retry_budget_seconds: float | None = None
    poll_retry_budget_seconds: float | None = None
    poll_rpc_timeout_seconds: float | None = None
    temp_dir: str | None = None
    security_context: Mapping[str, Any] | None = None
    object_storage_access: Mapping[str, Any] | None = None
    image_pull_credentials: Mapping[str, Any] | None = None
    services: tuple[Any, ...] | None = None
    volumes: tuple[Any, ...] | None = None
    file_system_snapshot: object = None
    containers: tuple[Any, ...] | None = None
    template_id: str | None = None
    restore_from_snapshot_id: str | None = None  # start from a snapshot (cwsandbox: file_system_snapshot_id)

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:  # normalise a field of a frozen instance
            object.__setattr__(self, name, value)

        for name in (*CLOUD_ONLY_OPTIONS, "network"):
            put(name, _options_cw.normalise(name, getattr(self, name), _FrozenDict))

        _text("container_image", self.container_image, "host", optional=False)
        _text("command", self.command, "python")
        if self.args is not None:
            put("args", _str_tuple("args", self.args))
            if self.command is None:
                raise ValueError(f"args={self.args!r} needs a command; set command too, "
                                 f"e.g. command='python', or drop args")
        put("tags", _str_tuple("tags", self.tags))
        put("environment_variables",
            _str_mapping("environment_variables", self.environment_variables))
        put("annotations", _str_mapping("annotations", self.annotations))
        put("resources", ResourceOptions.coerce(self.resources))
        _text("working_dir", self.working_dir, "/work")
        if self.max_lifetime_seconds is not None:
            put("max_lifetime_seconds",
                _seconds("max_lifetime_seconds", self.max_lifetime_seconds, 3600))
        if self.idle_timeout_seconds is not None:
            put("idle_timeout_seconds", _seconds("idle_timeout_seconds", self.idle_timeout_seconds, 600))
        if self.restore_from_snapshot_id is not None:
            check_snapshot_id(self.restore_from_snapshot_id, "restore_from_snapshot_id")
        put("request_timeout_seconds",
            _seconds("request_timeout_seconds", self.request_timeout_seconds, 300.0))
        if self.isolation not in ISOLATION_LEVELS:
            raise ValueError(f"isolation must be one of {', '.join(map(repr, ISOLATION_LEVELS))},"
                             f" got {self.isolation!r}; use isolation='auto' for the strongest "
                             f"level this machine supports")
        size = self.max_output_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"max_output_bytes must be an int > 0, got {size!r}; "
                             f"use e.g. max_output_bytes={64 * 1024 * 1024}")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> Self:
        """Build from a mapping of field names (a dict, or an OmegaConf DictConfig).

        None for a field whose default is not None means the default. Raises TypeError for an
        unknown key, naming the closest field.
        """
        if not isinstance(mapping, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a mapping, got "
                            f"{type(mapping).__name__} {mapping!r}; use e.g. {{'tags': ['x']}}")
        _reject_unknown(mapping, f"{cls.__name__} key", "fields")
        fields: dict[str, Any] = {k: v for k, v in mapping.items()
                                  if k in _OPTIONS and (v is not None or _OPTIONS[k].default is None)}
        return cls(**fields)

    def with_overrides(self, **overrides: Any) -> Self:
        """Return a copy with these fields replaced whole (no merging of tags or dicts).

        Unknown names raise TypeError.
        """
        _reject_unknown(overrides, "sandbox option", "options")
        return dataclasses.replace(self, **overrides)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxDefaults(_SandboxOptions):
    """Options shared by the sandboxes of a Session; ``resolve_spec`` merges overrides onto them."""

    @classmethod
    def coerce(cls, value: object) -> SandboxDefaults:
        """Return SandboxDefaults from itself, a mapping (via ``from_dict``) or None (defaults).

        Raises TypeError for anything else.
        """
        if value is None or isinstance(value, Mapping):
            return cls.from_dict(value or {})
        if not isinstance(value, cls):
            raise TypeError(f"defaults must be a SandboxDefaults, a dict of its fields or None, "
                            f"got {type(value).__name__} {value!r}")
        return value

    def merge_tags(self, additional: Sequence[str] | None) -> tuple[str, ...]:
        """Return these tags followed by ``additional``, order kept, duplicates kept."""
        return self.tags + _str_tuple("tags", () if additional is None else additional)

    def merge_environment_variables(self, additional: Mapping[str, str] | None) -> dict[str, str]:
        """Return these environment variables updated by ``additional`` (which wins)."""
        return {**self.environment_variables,
                **_str_mapping("environment_variables", {} if additional is None else additional)}

    def merge_annotations(self, additional: Mapping[str, str] | None) -> dict[str, str]:
        """Return these annotations updated by ``additional`` (which wins)."""
        return {**self.annotations,
                **_str_mapping("annotations", {} if additional is None else additional)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxSpec(_SandboxOptions):
    """The fully resolved options of one sandbox, as a runtime receives them.

    Built by ``resolve_spec``. Hashable (so it can key a pool) when ``network`` is.
    """

    def argv(self) -> list[str] | None:
        """The command line ``[command, *args]``, or None when there is no command."""
        return None if self.command is None else [self.command, *(self.args or ())]


_OPTIONS = {f.name: f for f in dataclasses.fields(_SandboxOptions)}


def _fresh(name: str) -> Any:
    """The value option ``name`` has when nothing sets it."""
    field = _OPTIONS[name]
    if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _reject_unknown(names: Mapping[str, Any], what: str, plural: str) -> None:
    """Raise TypeError for the first name that is not an option."""
    for name in names:
        if name not in _OPTIONS:
            hint = _suggest(str(name), list(_OPTIONS))
            if hint == "." and (close := difflib.get_close_matches(str(name), FUNCTION_OPTIONS, n=1)):
                hint = f"; did you mean {close[0]!r} (an option of session.function)?"
            raise TypeError(f"unknown {what} {name!r}{hint} Valid {plural}: {', '.join(_OPTIONS)}")


def resolve_spec(defaults: SandboxDefaults | Mapping[str, Any] | None = None, /,
                 **overrides: Any) -> SandboxSpec:
    """Merge one sandbox's overrides onto the defaults: the only merge in sandpool.

    ``defaults`` is a SandboxDefaults, a mapping for ``SandboxDefaults.from_dict``, or None
    for ``SandboxDefaults()``. An override of None means "not given". Rules (cwsandbox's, with
    one fix): tags are the defaults' then the overrides', duplicates kept; environment_variables
    and annotations are dict-merged, the override winning; a falsy container_image keeps the
    default; secrets are the defaults' then the overrides', one per env_var (two different ones
    for one variable raise ValueError), and their values (read here, in the client, see
    ``_options_cw.secret_values``) join environment_variables; every other option is replaced
    whole. The fix: ``command`` without ``args`` runs with no args (cwsandbox would inherit the
    default args). What the cloud options mean locally: ``CLOUD_ONLY_OPTIONS``.

    Raises TypeError for an unknown option (naming the closest valid one) or a wrong type,
    ValueError for an invalid value.
    """
    defaults = SandboxDefaults.coerce(defaults)
    if "file_system_snapshot_id" in overrides:  # cwsandbox's name for it
        overrides["restore_from_snapshot_id"] = overrides.pop("file_system_snapshot_id")
    _reject_unknown(overrides, "sandbox option", "options")
    if overrides.get("template_id") is not None:  # a stored spec under the explicit options
        overrides = _templates.apply(overrides)
        _reject_unknown(overrides, "template option", "options")
    if overrides.get("containers") or defaults.containers:  # a pod: the primary container's fields, none of the defaults'
        pod = _pods.normalise(overrides.get("containers") or defaults.containers, _FrozenDict, _options_cw.normalise)
        overrides = {**overrides, **_pods.primary_options(pod or (), overrides), "containers": pod}
        defaults = dataclasses.replace(defaults, **{name: _fresh(name) for name in _pods.EXCLUSIVE})
    merged = {name: getattr(defaults, name) for name in _OPTIONS}
    merged.update((k, v) for k, v in overrides.items() if k in _OPTIONS and v is not None)
    merged["container_image"] = overrides.get("container_image") or defaults.container_image
    merged["tags"] = defaults.merge_tags(overrides.get("tags"))
    merged["environment_variables"] = defaults.merge_environment_variables(
        overrides.get("environment_variables"))
    merged["annotations"] = defaults.merge_annotations(overrides.get("annotations"))
    if overrides.get("command") is not None and overrides.get("args") is None:
        merged["args"] = None  # the fix: cwsandbox keeps the default args here
    secrets = _options_cw.merge_secrets(
        defaults.secrets, _options_cw.normalise("secrets", overrides.get("secrets"), _FrozenDict))
    if secrets:
        values = _options_cw.secret_values(secrets)
        clash = sorted(values.keys() & merged["environment_variables"].keys())
        if clash:
            raise ValueError(f"{clash[0]} is set both by environment_variables and by a secret; drop one")
        merged["environment_variables"] = {**merged["environment_variables"], **values}
    merged["secrets"] = secrets or None
    return SandboxSpec(**merged)
