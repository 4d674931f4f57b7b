"""Volumes, host side: the named volume store, and each volume of a spec as a mount for the agent.

Named volumes live in ``$SANDPOOL_VOLUME_DIR`` (default ``<image store>/.volumes``, which sandboxes
never see), one directory per name holding ``data/`` (what sandboxes see, mode 0755, owned by the
client's user) and ``volume.json``; ``sandpool volume create|ls|rm`` manage them. ``entries``
turns a spec's ``volumes`` (``sandpool._options_volumes``) into the agent's mount list
(``_sandpool_agent.confine.volumes``): a named volume that does not exist, a bind of a host path
that is missing, not a directory, reached through a symlink (so not the directory that was named),
or that holds or lies inside sandpool's own state (its state directory, image or volume store) is
refused, with the reason and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Mapping
from typing import Any

from .._options_volumes import check_name
from . import images

ENV_VOLUME_DIR = "SANDPOOL_VOLUME_DIR"


def store_dir() -> str:
    return os.environ.get(ENV_VOLUME_DIR) or os.path.join(images.store_dir(), ".volumes")


def data_dir(name: str) -> str:
    return os.path.join(store_dir(), check_name(name), "data")


def create(name: str) -> str:
    """Make the named volume (no-op if it exists); its data directory."""
    path = data_dir(name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        os.chmod(path, 0o755)
        with open(os.path.join(os.path.dirname(path), "volume.json"), "w") as f:
            json.dump({"name": name, "created": time.time()}, f)
    return path


def listing() -> list[dict[str, Any]]:
    """Every named volume: name, created, path (of its data directory)."""
    try:
        names = sorted(os.listdir(store_dir()))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(store_dir(), name)
        try:
            with open(os.path.join(path, "volume.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        out.append({"name": name, "created": meta.get("created"), "path": os.path.join(path, "data")})
    return out


def remove(name: str) -> bool:
    """Remove the named volume and its files (False if there was none). Sandboxes that have it
    mounted keep the directory, emptied."""
    path = os.path.dirname(data_dir(name))
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path)
    return True


def entries(volumes: tuple[Mapping[str, Any], ...] | None, state_dir: str) -> list[dict[str, Any]]:
    """The agent's mounts for a spec's ``volumes``; ValueError naming the volume and the fix."""
    out = []
    for i, vol in enumerate(volumes or ()):
        field = f"volumes[{i}]"
        entry = {"target": vol["mount_path"], "read_only": bool(vol["read_only"])}
        if vol["kind"] == "scratch":
            entry["size"] = int(vol["size"])
        elif vol["kind"] == "named":
            source = data_dir(vol["volume"])
            if not os.path.isdir(source):
                raise ValueError(f"{field}: volume {vol['volume']!r} does not exist; make it with "
                                 f"'sandpool volume create {vol['volume']}'")
            _check_sub_path(source, vol["sub_path"], field)
            entry.update(source=source, sub=vol["sub_path"])
        else:
            entry.update(source=_checked_bind(vol["host_path"], field, state_dir), sub="")
        out.append(entry)
    return out


def _checked_bind(host: str, field: str, state_dir: str) -> str:
    real = os.path.realpath(host)
    if real != host:
        raise ValueError(f"{field}: host_path {host!r} leads through a symlink to {real!r}, which is not the "
                         f"directory named; name {real!r} itself if that is the one meant")
    if not os.path.isdir(host):
        raise ValueError(f"{field}: host_path {host!r} is not an existing directory; make it first (a bind "
                         f"shows a host directory, it does not create one)")
    for own in (state_dir, images.store_dir(), store_dir()):
        own = os.path.realpath(own)
        if host == own or own.startswith(host.rstrip("/") + "/") or host.startswith(own + "/"):
            raise ValueError(f"{field}: host_path {host!r} holds or lies in sandpool's own state ({own}: "
                             f"other sandboxes' files); bind a directory of your own data")
    return host


def _check_sub_path(source: str, sub: str, field: str) -> None:
    """Each component of ``sub`` below ``source`` is a directory, not a symlink (a sandbox sharing the
    volume may have made one to lead the mount elsewhere). The agent walks it again without following
    symlinks when it mounts, so a swap after this check fails the start too."""
    here = source
    for name in (n for n in sub.split("/") if n):
        here = os.path.join(here, name)
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            raise ValueError(f"{field}: sub_path {sub!r} does not exist in the volume; make the directory "
                             f"first") from None
        if not stat.S_ISDIR(mode):
            raise ValueError(f"{field}: sub_path {sub!r} reaches {name!r}, a symlink or a file, not a directory; "
                             f"a volume's sub_path must be a directory of the volume itself")
