"""The local meaning of cwsandbox's cloud options: validated, normalised, and never dropped silently.

Every option of cwsandbox's ``Sandbox``/``SandboxDefaults`` is a field of ``_config._SandboxOptions``;
this module decides what each one becomes locally:

- ``NO_LOCAL_MEANING``: validated and kept on the spec (in plain form), with no local effect;
  docs/differences.md lists the same names (a test compares them).
- ``NOT_YET``: giving one (non-empty) raises ``NotSupportedLocallyError`` naming the issue.
- ``runner_ids``: pins the sandbox to runners; this machine is the one runner ``"local"`` (a Slurm
  runtime's runners are its nodes): another id raises RunnerNotFoundError when the sandbox starts.
- ``runtime_class`` and ``placement_mode``: validated, kept and reported; a runtime class is
  not honoured locally, so the first use of each value warns, naming the isolation level used.
- ``secrets``, ``mounted_files``, ``network`` and ``services`` have a local meaning (see
  ``secret_values``; the network's and services': docs/network.md); so do ``containers``
  (``_pods``, docs/pods.md) and ``template_id`` (``_templates``).

Values are normalised to plain, hashable data (frozen dicts, tuples, strings) so that a spec keys a
pool and crosses the wire to a sandpool server. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

from . import _cwtypes as t
from . import _options_volumes
from ._errors_cw import NotSupportedLocallyError

__all__ = ["NOT_YET", "NO_LOCAL_MEANING", "SECRETS_FILE_ENV", "normalise", "secret_values"]

NO_LOCAL_MEANING: dict[str, str] = {
    "base_url": "no cloud endpoint: a sandpool server is chosen with address= or $SANDPOOL_ADDRESS",
    "auth": "no account: a sandpool server takes token=; credentials are checked for type, then not kept",
    "create_retry_budget_seconds": "a local create never meets cloud capacity to retry against",
    "poll_retry_budget_seconds": "local state is pushed to the client, not polled",
    "poll_rpc_timeout_seconds": "local state is pushed to the client, not polled",
    "temp_dir": "remote functions travel over the wire, not through files",
    "data_plane_mode": "a local sandbox has one channel",
    "placement_spillover": "there is one place to run: this machine",
    "security_context": "the isolation level decides users, capabilities and seccomp (docs/isolation.md)",
    "object_storage_access": "no object store",
    "image_pull_credentials": "images are pulled anonymously (docs/images.md)",
}
"""Options accepted, validated and kept on the spec, with no local effect (and why)."""

NOT_YET: dict[str, str] = {
    "file_system_snapshot": "a snapshot holds the whole filesystem locally: pass restore_from_snapshot_id=",
}
"""Options that raise NotSupportedLocallyError when given, and where their local meaning comes from."""

SECRETS_FILE_ENV = "SANDPOOL_SECRETS_FILE"
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_warned_runtime_classes: set[str] = set()


def _plain(value: Any, frozen: Callable[[dict[str, Any]], Any]) -> Any:
    """A value object as plain hashable data: dataclasses and mappings as frozen dicts, lists as tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return frozen({k: _plain(v, frozen) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, frozen) for v in value)
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}; use e.g. {name}=30")
    return float(value)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _auth(value: object) -> None:
    from ._cwextra import AuthHeaders, WandbAuth

    if not isinstance(value, (str, AuthHeaders, WandbAuth)) and not hasattr(value, "resolve_auth"):
        raise TypeError(f"auth must be an AuthStrategy, AuthHeaders, WandbAuth or an AuthProvider, got "
                        f"{type(value).__name__}; locally it has no effect, so it may also be left out")


def _runtime_class(value: object) -> str:
    if not isinstance(value, str) or len(value) > 253 or not _K8S_NAME.fullmatch(value):
        raise ValueError(f"runtime_class must be a lowercase name such as 'gvisor' or 'kata', got {value!r}")
    if value not in _warned_runtime_classes:
        _warned_runtime_classes.add(value)
        warnings.warn(f"runtime_class={value!r} has no local equivalent; the sandbox runs at its isolation "
                      f"level instead (sandbox.effective_runtime_class reports which)", UserWarning, stacklevel=4)
    return value


def _network(value: object, frozen: Callable[[dict[str, Any]], Any]) -> object:
    """NetworkOptions in plain form (the rules' local meaning: _isolation.network, docs/network.md)."""
    if isinstance(value, t.NetworkOptions):  # plain, so that it can travel to a sandpool server
        return _plain(value, frozen)
    return value  # other forms are interpreted (or refused) when the sandbox starts: _isolation.network


def _services(value: object, frozen: Callable[[dict[str, Any]], Any]) -> tuple[Any, ...]:
    """Services in plain form, checked as a bridge sandbox will use them (_services)."""
    from . import _services as services

    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"services must be a list of Service, got {type(value).__name__} {value!r}; use e.g. "
                        f"services=[Service(port=8080, visibility='public')]")
    plain = tuple(_plain(t.coerce(t.Service, s, f"services[{i}]"), frozen) for i, s in enumerate(value))
    services.parse(plain)
    return plain


def _mounted_files(value: object, frozen: Callable[[dict[str, Any]], Any]) -> tuple[Any, ...]:
    """``[{"mount_path": p, "file_content": b}]`` or ``{p: b}`` as a tuple of frozen dicts (bytes)."""
    items = list(value.items()) if isinstance(value, Mapping) else None
    if items is None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"mounted_files must be a list of {{'mount_path': ..., 'file_content': ...}} or a "
                            f"dict of path to content, got {type(value).__name__}")
        items = []
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping) or set(entry) != {"mount_path", "file_content"}:
                raise ValueError(f"mounted_files[{i}] must be a dict with exactly 'mount_path' and "
                                 f"'file_content', got {entry!r}")
            items.append((entry["mount_path"], entry["file_content"]))
    out = []
    for path, content in items:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError(f"mounted_files path must be an absolute path such as '/work/config.json', got {path!r}")
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, (bytes, bytearray)):
            raise TypeError(f"mounted_files content of {path!r} must be bytes or str, got {type(content).__name__}")
        out.append(frozen({"mount_path": path, "file_content": bytes(content)}))
    return tuple(out)


def _secrets(value: object, frozen: Callable[[dict[str, Any]], Any]) -> tuple[Mapping[str, Any], ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"secrets must be a list of Secret, got {type(value).__name__} {value!r}; use e.g. "
                        f"secrets=[Secret(store='env', name='API_KEY')]")
    return tuple(_plain(t.coerce(t.Secret, s, f"secrets[{i}]"), frozen) for i, s in enumerate(value))


@overload
def normalise(name: Literal["secrets"], value: object,
              frozen: Callable[[dict[str, Any]], Any]) -> tuple[Mapping[str, Any], ...] | None: ...
@overload
def normalise(name: str, value: object, frozen: Callable[[dict[str, Any]], Any]) -> object: ...
def normalise(name: str, value: object, frozen: Callable[[dict[str, Any]], Any]) -> object:
    """The spec's form of cloud option ``name`` (None stays None); raises for a bad or unsupported value."""
    if value is None:
        return None
    if name in NOT_YET:
        if not value:  # an empty list asks for nothing
            return None
        raise NotSupportedLocallyError(f"{name}= is not supported locally yet ({NOT_YET[name]}); drop it to run "
                                       f"here", feature=name)
    match name:
        case "base_url" | "temp_dir":
            return _text(name, value)
        case "auth":
            _auth(value)
            return None
        case "create_retry_budget_seconds" | "poll_retry_budget_seconds" | "poll_rpc_timeout_seconds":
            return _number(name, value)
        case "data_plane_mode":
            return t.DataPlaneMode.parse(value).value
        case "placement_spillover":
            return t.PlacementSpillover.parse(value).value
        case "placement_mode":
            return t.PlacementMode.parse(value).value
        case "runtime_class":
            return _runtime_class(value)
        case "runner_ids":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
                    isinstance(r, str) and r for r in value):
                raise TypeError(f"runner_ids must be a list of non-empty strings, got {value!r}; "
                                f"use e.g. runner_ids=['local']")
            return tuple(value)
        case "security_context":
            return _plain(t.coerce(t.SecurityContext, value, name), frozen)
        case "object_storage_access":
            return _plain(t.coerce(t.ObjectStorageAccess, value, name), frozen)
        case "image_pull_credentials":
            return _plain(t.coerce(t.ImagePullCredentials, value, name), frozen)
        case "network":
            return _network(value, frozen)
        case "services":
            return _services(value, frozen)
        case "mounted_files":
            return _mounted_files(value, frozen)
        case "secrets":
            return _secrets(value, frozen)
        case "volumes":
            return _options_volumes.normalise(value, frozen)
        case "containers":
            from . import _pods

            return _pods.normalise(value, frozen, normalise)
        case "template_id":
            from . import _templates

            return _templates.check_name(value, "template_id")
    raise AssertionError(f"no rule for option {name!r}")


def merge_secrets(first: Sequence[Mapping[str, Any]] | None,
                  second: Sequence[Mapping[str, Any]] | None) -> tuple[Mapping[str, Any], ...]:
    """Defaults' secrets then explicit ones, one per env_var; ValueError when two differ for one."""
    out: dict[str, Mapping[str, Any]] = {}
    for secret in (*(first or ()), *(second or ())):
        known = out.get(secret["env_var"])
        if known is not None and known != secret:
            raise ValueError(f"two different secrets set ${secret['env_var']}: {dict(known)} and {dict(secret)}; "
                             f"give one of them another env_var")
        out[secret["env_var"]] = secret
    return tuple(out.values())


def secret_values(secrets: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The environment variables the secrets set, read in the client (never in a sandbox or server).

    ``store="env"``: the client's environment variable ``name``. Any other store: the JSON file
    ``$SANDPOOL_SECRETS_FILE`` (default ``~/.config/sandpool/secrets.json``), ``{store: {name: value}}``,
    or ``{store: {name: {field: value}}}`` when the secret names a ``field``. A secret that cannot be
    found raises ValueError naming it and where it was looked for.
    """
    values: dict[str, str] = {}
    book: dict[str, Any] | None = None
    for secret in secrets:
        store, name, field = secret["store"], secret["name"], secret["field"]
        if store == "env":
            if name not in os.environ:
                raise ValueError(f"secret {name!r} (store 'env') is not set in this process's environment; "
                                 f"export {name}=... before starting the sandbox")
            values[secret["env_var"]] = os.environ[name]
            continue
        if book is None:
            book = _secrets_file()
        entry = (book.get(store) or {}).get(name) if isinstance(book.get(store), dict) else None
        if isinstance(entry, dict):
            entry = entry.get(field) if field else None
        if not isinstance(entry, str):
            where = f"[{store!r}][{name!r}]" + (f"[{field!r}]" if field else "")
            raise ValueError(f"secret {name!r} of store {store!r} is not in {_secrets_path()} (looked for "
                             f"{where}, a string); add it there, or use Secret(store='env', name=...)")
        values[secret["env_var"]] = entry
    return values


def _secrets_path() -> str:
    return os.environ.get(SECRETS_FILE_ENV) or os.path.expanduser("~/.config/sandpool/secrets.json")


def _secrets_file() -> dict[str, Any]:
    path = _secrets_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the secrets file {path}: {exc}; it must be JSON like "
                         f'{{"store": {{"name": "value"}}}}') from exc
    if not isinstance(data, dict):
        raise ValueError(f"the secrets file {path} must hold a JSON object of stores, got {type(data).__name__}")
    return data
