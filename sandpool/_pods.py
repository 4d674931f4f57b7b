"""Several containers in one sandbox (a pod): the ``containers`` option's checks, its plain form, and
the options each container runs with.

``containers=[Container(...), ...]`` replaces the single-container options (cwsandbox: they are
mutually exclusive, and the defaults' values of them are not inherited): the primary container's
fields become the sandbox's own ``container_image``, ``command``, ``args``, ``environment_variables``,
``resources``, ``working_dir``, ``mounted_files`` and ``secrets`` (``primary_options``); every other
container runs as a sandbox of its own that joins the primary's network namespace
(``member_options``; see ``sandpool._session.pod`` and ``sandpool._isolation.pods``).

As in cwsandbox: one container may leave ``name`` and ``primary`` out; with more than one, each
needs a name (unique) and exactly one is ``primary=True``. Unlike cwsandbox, ``resources`` is
optional (the pod's defaults apply). Stdlib only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _cwtypes as t
from ._errors_cw import NotSupportedLocallyError

__all__ = ["EXCLUSIVE", "PRIMARY_NAME", "member_options", "names", "normalise", "primary", "primary_options"]

#: The name of the primary container when it has none (cwsandbox's single container is "main").
PRIMARY_NAME = "main"
#: The single-container options that ``containers=`` replaces: giving both is an error.
EXCLUSIVE = ("container_image", "command", "args", "resources", "mounted_files", "secrets",
             "image_pull_credentials", "environment_variables", "security_context", "working_dir")
#: Container field -> the sandbox option it becomes.
_AS_OPTION = {"image": "container_image", "command": "command", "args": "args",
              "environment_variables": "environment_variables", "resources": "resources",
              "working_dir": "working_dir", "mounted_files": "mounted_files", "secrets": "secrets"}


def normalise(value: object, frozen: Callable[[dict[str, Any]], Any],
              option: Callable[[str, object, Callable[[dict[str, Any]], Any]], Any]) -> tuple[Any, ...] | None:
    """``containers`` as a tuple of frozen dicts (Container's fields; ``mounted_files`` and
    ``secrets`` in the plain form ``option`` (``_options_cw.normalise``) gives them), or None for
    an empty list. Raises TypeError/ValueError naming the container, field, value and fix,
    NotSupportedLocallyError for ``volume_mounts`` (a pod's volumes are the primary's)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"containers must be a list of Container, got {type(value).__name__} {value!r}; use e.g. "
                        f"containers=[Container(name='app', image='host', primary=True)]")
    if not value:
        return None
    rows = [t.coerce(t.Container, c, f"containers[{i}]") for i, c in enumerate(value)]
    if len(rows) > 1:
        unnamed = [i for i, row in enumerate(rows) if not row.name]
        if unnamed:
            raise ValueError(f"containers[{unnamed[0]}] has no name; with more than one container each needs a "
                             f"name, e.g. Container(name='sidecar', image=...)")
        marked = [row.name for row in rows if row.primary]
        if len(marked) != 1:
            raise ValueError(f"containers with more than one entry need exactly one primary=True, got "
                             f"{len(marked)} ({', '.join(map(repr, marked)) or 'none'}); mark the container that "
                             f"owns the sandbox's lifecycle with primary=True")
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            raise ValueError(f"duplicate container name {row.name!r} in containers; give each container its own name")
        if row.name:
            seen.add(row.name)
        if row.args is not None and row.command is None:
            raise ValueError(f"container {row.name or PRIMARY_NAME!r} has args={list(row.args)!r} but no command; "
                             f"local images have no entrypoint: set command too, e.g. command='python'")
        if row.volume_mounts:
            raise NotSupportedLocallyError(
                f"container {row.name!r}: volume_mounts is not supported locally; a pod's volumes= are mounted "
                f"in its primary container", feature="Container.volume_mounts")
    return tuple(frozen(_row(row, frozen, option)) for row in rows)


def _row(row: t.Container, frozen: Callable[[dict[str, Any]], Any],
         option: Callable[[str, object, Callable[[dict[str, Any]], Any]], Any]) -> dict[str, Any]:
    """A checked Container as plain hashable data (what a spec holds and the wire carries)."""
    where = f"container {row.name or PRIMARY_NAME!r}"
    secrets = option("secrets", row.secrets, frozen) if row.secrets else None
    env = row.environment_variables
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError(f"{where}: environment_variables must map str to str, got {env!r}")
    files = None if row.mounted_files is None else option("mounted_files", row.mounted_files, frozen)
    resources: Any = row.resources
    if dataclasses.is_dataclass(resources) and not isinstance(resources, type):
        resources = {f.name: getattr(resources, f.name) for f in dataclasses.fields(resources)}
    if isinstance(resources, Mapping):
        resources = frozen({k: frozen(dict(v)) if isinstance(v, Mapping) else v for k, v in resources.items()})
    elif resources is not None:
        raise TypeError(f"{where}: resources must be a ResourceOptions or a dict such as "
                        f"{{'limits': {{'memory': '256Mi'}}}}, got {row.resources!r}")
    return {"image": row.image, "name": row.name, "command": row.command, "args": row.args,
            "environment_variables": None if env is None else frozen(dict(env)), "resources": resources,
            "mounted_files": files, "working_dir": row.working_dir, "secrets": secrets, "primary": row.primary}


def primary(containers: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The primary row: the one marked ``primary``, else the only one."""
    return next((c for c in containers if c["primary"]), containers[0])


def names(containers: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every container's name, the primary's first (``PRIMARY_NAME`` when it has none)."""
    first = primary(containers)
    return [first["name"] or PRIMARY_NAME] + [c["name"] for c in containers if c is not first]


def _options(row: Mapping[str, Any]) -> dict[str, Any]:
    return {option: row[field] for field, option in _AS_OPTION.items()}


def primary_options(containers: Sequence[Mapping[str, Any]], given: Mapping[str, Any]) -> dict[str, Any]:
    """The sandbox options the primary container sets (replacing the defaults'); ValueError if
    ``given`` (the caller's explicit options) also sets one of ``EXCLUSIVE``."""
    clash = [name for name in EXCLUSIVE if given.get(name) is not None]
    if clash:
        raise ValueError(f"{clash[0]}= cannot be combined with containers=; set it on the Container instead "
                         f"(e.g. Container(image=..., command=..., environment_variables=...))")
    return _options(primary(containers))


def member_options(row: Mapping[str, Any],
                   secret_values: Callable[[Sequence[Mapping[str, Any]]], dict[str, str]]) -> dict[str, Any]:
    """The options of a non-primary container's own sandbox, over the pod's spec: its container
    fields (its secrets' values read now with ``secret_values``, into its environment); no services, volumes, snapshot
    or containers of its own (those are the pod's). ValueError for a secret that cannot be read."""
    options = _options(row)
    if row["secrets"]:
        values = secret_values(row["secrets"])
        options["environment_variables"] = {**(row["environment_variables"] or {}), **values}
    options["container_image"] = row["image"]
    return {**options, "environment_variables": options["environment_variables"] or {},
            "containers": None, "services": None, "volumes": None, "restore_from_snapshot_id": None,
            "template_id": None}
