"""Templates: named sandbox specs stored on this machine, for ``template_id=`` and
``Sandbox.run_from_template``.

A template is a JSON file ``<store>/<name>.json`` holding ``{"name", "created", "options"}``, where
``options`` are sandbox options in plain JSON form (``containers`` as dicts of Container's fields).
The store is ``$SANDPOOL_TEMPLATE_DIR``, else ``/var/lib/sandpool/templates`` for root and
``$XDG_DATA_HOME/sandpool/templates`` (``~/.local/share``) for others: it outlives sessions, as the
image and volume stores do (sandpool's state directory is swept temporary state).
``sandpool templates save|ls|rm`` manage it; ``apply`` lays a template under a sandbox's explicit
options, as cwsandbox's CreateSandboxFromTemplate does ("replace on presence"). Stdlib only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ENV_TEMPLATE_DIR", "apply", "check_name", "listing", "load", "remove", "save", "store_dir"]

ENV_TEMPLATE_DIR = "SANDPOOL_TEMPLATE_DIR"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: Explicit options that replace a template's ``containers`` (and the other way round).
_CONTAINER_OPTIONS = ("container_image", "command", "args", "resources", "mounted_files", "secrets",
                      "environment_variables", "working_dir")


def store_dir() -> str:
    explicit = os.environ.get(ENV_TEMPLATE_DIR)
    if explicit:
        return explicit
    if os.geteuid() == 0:
        return "/var/lib/sandpool/templates"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "sandpool", "templates")


def check_name(name: object, field: str = "name") -> str:
    """``name`` if it is a valid template name; TypeError/ValueError naming ``field`` and the fix."""
    if not isinstance(name, str):
        raise TypeError(f"{field} must be a template name (str), got {type(name).__name__} {name!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{field}={name!r} is not a template name: use letters, digits, '_', '.' and '-' "
                         f"(at most 128, not starting with '.' or '-'), e.g. {field}='web-and-db'")
    return name


def _path(name: str) -> str:
    return os.path.join(store_dir(), check_name(name) + ".json")


def plain(value: object, where: str = "options") -> Any:
    """``value`` as JSON data: value objects (Container, ResourceOptions, ...) as dicts of their set
    fields, enums as their values, tuples as lists; TypeError naming ``where`` for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                 if getattr(value, f.name) is not None and not f.name.startswith("_")}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}, which a template cannot store; use plain data "
                    f"(str, numbers, lists, dicts; file contents as str)")


def save(name: str, options: Mapping[str, Any], check: Callable[..., object]) -> str:
    """Store ``options`` (sandbox options, checked now by ``check(**options)``: ``resolve_spec``)
    as template ``name``, replacing one of that name; returns its path. ValueError/TypeError for
    bad options."""
    check_name(name)
    data = plain(dict(options))
    if "template_id" in data:
        raise ValueError("a template cannot name another template (template_id); store the options themselves")
    check(**data)  # every option checked now, not when the template is used
    os.makedirs(store_dir(), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store_dir(), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"name": name, "created": time.time(), "options": data}, f, indent=1)
    os.replace(tmp, _path(name))
    return _path(name)


def load(name: str) -> dict[str, Any]:
    """The options of template ``name``; ValueError naming it and how to list them if there is none."""
    try:
        with open(_path(name), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"template_id={name!r}: no such template in {store_dir()}; list them with 'sandpool "
                         f"templates ls', save one with 'sandpool templates save {name} FILE'") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"template {name!r} cannot be read ({exc}); save it again with 'sandpool templates "
                         f"save'") from exc
    options = record.get("options") if isinstance(record, dict) else None
    if not isinstance(options, dict):
        raise ValueError(f"template {name!r} has no options; save it again with 'sandpool templates save'")
    return options


def listing() -> list[dict[str, Any]]:
    """Every template: name, created, containers (their names) and path."""
    try:
        entries = sorted(os.listdir(store_dir()))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        path = os.path.join(store_dir(), entry)
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            options = record["options"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        containers = [c.get("name") or "main" for c in options.get("containers") or ()]
        out.append({"name": entry[:-5], "created": record.get("created"), "containers": containers, "path": path})
    return out


def remove(name: str) -> bool:
    """Delete template ``name``; False if there is none."""
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


def apply(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over the options of the template it names (``template_id``): an explicit
    option replaces the template's whole; explicit container options (``container_image``, ...)
    replace the template's ``containers`` and explicit ``containers`` its container options."""
    stored = load(check_name(overrides["template_id"], "template_id"))
    given = {k: v for k, v in overrides.items() if v is not None}
    if any(k in given for k in _CONTAINER_OPTIONS):
        stored.pop("containers", None)
    if "containers" in given:
        for key in _CONTAINER_OPTIONS:
            stored.pop(key, None)
    return {**stored, **given}
