"""The ``volumes=`` option in plain form: what each volume is and where it goes; checked, not yet placed.

Three kinds, each a frozen dict with ``kind``, ``mount_path`` (absolute, normalised, not ``/`` nor
under ``/proc``, ``/sys``, ``/dev`` or ``/run/sandpool``, never nested in another volume's) and
``read_only``:

- ``scratch`` (cwsandbox's ``ScratchVolumeOptions``): an empty tmpfs of ``size`` bytes (default
  1 GiB) for this sandbox only, gone with it (``medium`` is accepted; both are memory-backed);
- ``named`` (``RegisteredVolumeOptions``, ``volume_id`` = a local volume's name made by ``sandpool
  volume create NAME``): a directory of the volume store shared by every sandbox that mounts it,
  outliving them; ``sub_path`` mounts a directory below it;
- ``bind`` (a dict with ``host_path``; sandpool's own): a host directory named explicitly,
  **read-only unless** ``read_only=False``; ``host_path`` must be absolute and free of ``..``
  (symlinks are refused when the sandbox starts, see ``_isolation.volumes``).

Stdlib only; imported by ``_options_cw``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _cwtypes as t
from ._errors_cw import NotSupportedLocallyError
from ._quantity import parse_memory

#: A named volume's name: what ``sandpool volume create`` accepts.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
DEFAULT_SCRATCH_BYTES = 2**30
#: Where a volume may not be mounted: the sandbox's own kernel views and the agent's directory.
RESERVED = ("/proc", "/sys", "/dev", "/run/sandpool")
_BIND_KEYS = {"host_path", "mount_path", "read_only", "name"}


def check_name(value: object, field: str = "volume name") -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(f"{field} must be 1-63 letters, digits, '.', '_' or '-' (no '/' and no '..'), got "
                         f"{value!r}; e.g. 'datasets'")
    return value


def normalise(value: object, frozen: Callable[[dict[str, Any]], Any]) -> tuple[Any, ...] | None:
    """``volumes=`` as a tuple of frozen dicts (see the module doc); None for an empty list.
    TypeError or ValueError naming the entry, the value and the fix."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"volumes must be a list of ScratchVolumeOptions, RegisteredVolumeOptions or "
                        f"{{'host_path': ..., 'mount_path': ...}} dicts, got {type(value).__name__} {value!r}")
    out = [frozen(_entry(item, f"volumes[{i}]")) for i, item in enumerate(value)]
    _check_targets(out)
    return tuple(out) or None


def _entry(item: object, field: str) -> dict[str, Any]:
    if isinstance(item, Mapping) and item.get("kind") in ("scratch", "named", "bind"):
        return dict(item)  # already plain (a spec that crossed the wire)
    if isinstance(item, Mapping) and "host_path" in item:
        unknown = sorted(set(item) - _BIND_KEYS)
        if unknown:
            raise TypeError(f"{field} has unknown key {unknown[0]!r}; a bind takes {', '.join(sorted(_BIND_KEYS))}")
        return _bind(item, field)
    if isinstance(item, Mapping) and "volume_id" in item:
        item = t.coerce(t.RegisteredVolumeOptions, item, field)
    elif isinstance(item, Mapping):
        item = t.coerce(t.ScratchVolumeOptions, item, field)
    if isinstance(item, t.RegisteredVolumeOptions):
        return {"kind": "named", "name": item.name, "volume": check_name(item.volume_id, f"{field}.volume_id"),
                "mount_path": _mount_path(item.mount_path, field), "sub_path": _sub_path(item.sub_path, field),
                "read_only": _flag(item.read_only, f"{field}.read_only")}
    if isinstance(item, t.ScratchVolumeOptions):
        if item.restore_from_snapshot_id:
            raise NotSupportedLocallyError(
                f"{field}.restore_from_snapshot_id: a scratch volume is not restored from a snapshot locally; a "
                f"snapshot holds the whole filesystem, so pass restore_from_snapshot_id= to the sandbox instead",
                feature="ScratchVolumeOptions.restore_from_snapshot_id")
        if item.sub_path:
            raise ValueError(f"{field}.sub_path: a scratch volume starts empty, so it has no sub_path; drop it")
        size = DEFAULT_SCRATCH_BYTES if item.size is None else parse_memory(item.size, field=f"{field}.size")
        if size <= 0:
            raise ValueError(f"{field}.size must be above 0, got {item.size!r}; use e.g. size='1Gi'")
        return {"kind": "scratch", "name": item.name, "mount_path": _mount_path(item.mount_path, field),
                "size": int(size), "read_only": _flag(item.read_only, f"{field}.read_only")}
    raise TypeError(f"{field} must be a ScratchVolumeOptions, a RegisteredVolumeOptions (volume_id = a local "
                    f"volume's name) or a dict with host_path and mount_path, got {type(item).__name__} {item!r}")


def _bind(item: Mapping[str, Any], field: str) -> dict[str, Any]:
    host = item["host_path"]
    if not isinstance(host, str) or not host.startswith("/") or "\0" in host or os.path.normpath(host) != host \
            or any(part in (".", "..") for part in host.split("/")):
        raise ValueError(f"{field}.host_path must be an absolute, normalised path without '..' naming the host "
                         f"directory itself, got {host!r}; e.g. '/srv/datasets'")
    return {"kind": "bind", "name": str(item.get("name") or ""), "host_path": host,
            "mount_path": _mount_path(item.get("mount_path"), field),
            "read_only": _flag(item.get("read_only", True), f"{field}.read_only")}


def _mount_path(path: object, field: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or ":" in path or "," in path \
            or any(part in (".", "..") for part in path.split("/")) or os.path.normpath(path) != path:
        raise ValueError(f"{field}.mount_path must be an absolute, normalised path inside the sandbox (no '..', "
                         f"',' or ':'), got {path!r}; e.g. mount_path='/data'")
    if path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED):
        raise ValueError(f"{field}.mount_path {path!r} is the sandbox's root or under {', '.join(RESERVED)}; "
                         f"choose another directory, e.g. '/data'")
    return path


def _sub_path(sub: object, field: str) -> str:
    if sub is None or sub == "":
        return ""
    if not isinstance(sub, str) or sub.startswith("/") or "\0" in sub \
            or any(part in (".", "..") for part in sub.split("/")):
        raise ValueError(f"{field}.sub_path must be a relative path below the volume without '..', got {sub!r}; "
                         f"e.g. sub_path='train'")
    return sub.strip("/")


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be True or False, got {value!r}")
    return value


def _check_targets(entries: list[Any]) -> None:
    paths = sorted(e["mount_path"] for e in entries)
    for a, b in zip(paths, paths[1:]):
        if b == a or b.startswith(a + "/"):
            raise ValueError(f"volumes: {b!r} is {'the same as' if a == b else 'inside'} another volume's "
                             f"mount_path {a!r}; give each volume its own directory, not nested")
