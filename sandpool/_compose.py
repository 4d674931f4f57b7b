"""Compose-style files for ``Sandbox.run_from_file``: their services as a pod's containers.

The file is YAML when a YAML parser (PyYAML) is installed, else JSON or TOML (``.json``/``.toml``
by name; bytes are tried as JSON, then TOML, then YAML). It has Docker Compose's shape, of which
this subset has a local meaning::

    services:
      web:
        image: host                       # required (no build:)
        command: ["python", "-m", "http.server", "8000"]   # or a string, split as a shell would
        entrypoint: ...                   # put before command, as Compose does
        environment: {KEY: value}         # or ["KEY=value", ...]
        working_dir: /srv
        deploy: {resources: {limits: {cpus: "0.5", memory: 256M, pids: 100},
                             reservations: {cpus: "0.25", memory: 128M}}}

``name`` and ``version`` at the top are ignored, as are a service's ``depends_on``,
``container_name``, ``restart``, ``labels`` and ``healthcheck`` (containers start together, the
primary first); anything else raises ValueError naming the service, the key and what is supported.
Stdlib only (PyYAML is used when present, never required).
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_FILE_BYTES", "containers", "parse", "read"]

#: cwsandbox's limit for an uploaded file.
MAX_FILE_BYTES = 256 * 1024
_SERVICE_KEYS = {"image", "command", "entrypoint", "environment", "working_dir", "deploy"}
_IGNORED_SERVICE_KEYS = {"depends_on", "container_name", "restart", "labels", "healthcheck"}
_TOP_KEYS = {"services", "name", "version"}
_RESOURCE_KEYS = {"cpus": "cpu", "memory": "memory", "pids": "pids"}


def read(contents: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    """(the file's bytes, its name or "<bytes>"); a str is always a path (cwsandbox's rule).
    ValueError for a missing, unreadable or too big file."""
    if isinstance(contents, (bytes, bytearray)):
        data, source = bytes(contents), "<bytes>"
    elif isinstance(contents, (str, os.PathLike)):
        source = os.fspath(contents)
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"run_from_file: cannot read {source!r} ({exc.strerror}); a str is a path: pass the "
                             f"file's text as bytes (text.encode()) instead") from exc
    else:
        raise TypeError(f"run_from_file needs a path (str or Path) or the file's bytes, got {type(contents).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"run_from_file: {source} is over {MAX_FILE_BYTES} bytes (cwsandbox's limit); split it")
    return data, source


def parse(data: bytes, source: str) -> dict[str, Any]:
    """The document in ``data``; ValueError naming ``source`` and the format it tried."""
    ext = os.path.splitext(source)[1].lower()
    kinds = {".json": ["json"], ".toml": ["toml"], ".yaml": ["yaml"], ".yml": ["yaml"]}.get(ext, ["json", "toml", "yaml"])
    errors = []
    for kind in kinds:
        try:
            doc = _load(kind, data)
        except ValueError as exc:
            errors.append(f"{kind}: {exc}")
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: the top level must be a mapping with 'services', got {type(doc).__name__}")
        return doc
    raise ValueError(f"{source} cannot be read as a compose file ({'; '.join(errors)})")


def _load(kind: str, data: bytes) -> Any:
    if kind == "json":
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(str(exc)) from None
    if kind == "toml":
        try:
            return tomllib.loads(data.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(str(exc)) from None
    try:
        import yaml  # type: ignore[import-untyped]  # PyYAML ships no types (types-PyYAML is no dependency)
    except ImportError:
        raise ValueError("YAML needs PyYAML (pip install pyyaml); or write the file as JSON or TOML") from None
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def containers(doc: Mapping[str, Any], source: str, primary_service: str,
               image_overrides: Mapping[str, str] | None = None,
               default_resources: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The document's services as Container dicts (name = the service's), ``primary_service``
    marked primary; ValueError naming the service, key, value and fix."""
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{source}: top-level key {unknown[0]!r} has no local meaning; only 'services' is read "
                         f"(networks: the pod shares one; volumes: pass volumes= to Sandbox.run)")
    services = doc.get("services")
    if not isinstance(services, Mapping) or not services:
        raise ValueError(f"{source}: 'services' must map service names to their settings, e.g. "
                         f"services: {{web: {{image: host}}}}")
    if primary_service not in services:
        raise ValueError(f"primary_service={primary_service!r} is not a service of {source}; use one of "
                         f"{', '.join(map(repr, services))}")
    for name in image_overrides or {}:
        if name not in services:
            raise ValueError(f"image_overrides names {name!r}, which is not a service of {source}; use one of "
                             f"{', '.join(map(repr, services))}")
    return [_container(str(name), spec, source, name == primary_service, (image_overrides or {}).get(name),
                       default_resources) for name, spec in services.items()]


def _container(name: str, spec: object, source: str, primary: bool, image: str | None,
               default_resources: Mapping[str, Any] | None) -> dict[str, Any]:
    where = f"{source}: service {name!r}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a mapping of settings such as {{image: host}}, got {spec!r}")
    unknown = sorted(set(spec) - _SERVICE_KEYS - _IGNORED_SERVICE_KEYS)
    if unknown:
        hint = "; set image: instead (images are pulled, not built)" if unknown[0] == "build" else ""
        raise ValueError(f"{where}: key {unknown[0]!r} is not supported locally{hint}; supported: "
                         f"{', '.join(sorted(_SERVICE_KEYS))}")
    image = image or spec.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where} has no image; set image: (e.g. image: host) or pass image_overrides={{{name!r}: ...}}")
    argv = _argv(where, "entrypoint", spec.get("entrypoint")) + _argv(where, "command", spec.get("command"))
    out: dict[str, Any] = {"name": name, "image": image, "primary": primary}
    if argv:
        out["command"], out["args"] = argv[0], argv[1:]
    if spec.get("environment") is not None:
        out["environment_variables"] = _environment(where, spec["environment"])
    if spec.get("working_dir") is not None:
        out["working_dir"] = spec["working_dir"]
    resources = _resources(where, spec.get("deploy"))
    if resources is None and default_resources:
        resources = dict(default_resources)
    if resources is not None:
        out["resources"] = resources
    return out


def _argv(where: str, key: str, value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ValueError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


def _environment(where: str, value: object) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict(v.split("=", 1) if "=" in v else (v, os.environ.get(v, "")) for v in value)
    raise ValueError(f"{where}: environment must be a mapping or a list of 'KEY=value', got {value!r}")


def _resources(where: str, deploy: object) -> dict[str, Any] | None:
    if deploy is None:
        return None
    if not isinstance(deploy, Mapping) or set(deploy) - {"resources"}:
        raise ValueError(f"{where}: only deploy.resources is read, got deploy={deploy!r}")
    res = deploy.get("resources") or {}
    out: dict[str, Any] = {}
    for side, ours in (("limits", "limits"), ("reservations", "requests")):
        given = res.get(side) if isinstance(res, Mapping) else None
        if not given:
            continue
        if not isinstance(given, Mapping) or set(given) - set(_RESOURCE_KEYS):
            raise ValueError(f"{where}: deploy.resources.{side} may set {', '.join(_RESOURCE_KEYS)}, got {given!r}")
        out[ours] = {_RESOURCE_KEYS[k]: str(v) for k, v in given.items()}
    return out or None
