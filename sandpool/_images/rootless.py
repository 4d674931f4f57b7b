"""Layer stores of ordinary users: unpacked and removed inside a user namespace.

An ordinary user's sandboxes run in a user namespace (``_sandpool_agent.confine.userns``), mapped
with the user's subordinate id ranges when ``/etc/subuid``, ``/etc/subgid`` and ``newuidmap`` allow
it, else with the single-id map. Its layers are unpacked in a user namespace mapped the same way
(a short ``python -I -S`` child per layer, ``_rootless_child``), so each file keeps the owner the
image gives it wherever that map has the id (the user's own id otherwise, 0 inside), whiteouts are
the 0/0 character devices the kernel lets anyone make, and opaque directories carry
``user.overlay.opaque`` (the overlay is mounted with ``userxattr``). Files of subordinate ids cannot
be removed by the user outside, so removal goes through the same child.

A store keeps one tree per map (``variant``): changing the ranges, installing ``uidmap`` or setting
``SANDPOOL_SUBIDS=0`` starts from an empty tree of layers and records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import _sandpool_agent
from _sandpool_agent.confine import userns

from .errors import ImageError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rootless_child.py")
_PACKAGE_PATH = os.path.dirname(os.path.dirname(os.path.abspath(_sandpool_agent.__file__)))


def active() -> bool:
    """Whether this process's layer store is a rootless one (not root)."""
    return os.geteuid() != 0


def variant() -> str:
    """The suffix of this user's tree in a store: '' for root, else the map's name."""
    if not active():
        return ""
    found = userns.ranges()
    return f"-rootless-{found.key()}" if found else "-rootless"


def extract(blob: str, compression: str, dest: str) -> tuple[int, str]:
    """``extract.extract`` in a user namespace mapped as the template's; (bytes, diff_id)."""
    from . import extract as unpacker

    answer = _run({"op": "extract", "blob": blob, "compression": compression, "dest": dest,
                   "max_bytes": unpacker.MAX_LAYER_BYTES})
    return int(answer["size"]), str(answer["diff_id"])


def remove(*paths: str) -> None:
    """Remove ``paths`` (trees of the store) from inside the user namespace; missing ones are fine."""
    if paths:
        _run({"op": "remove", "paths": list(paths)})


def _run(request: dict[str, Any]) -> dict[str, Any]:
    from .extract import Refused

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if userns.ENV_SUBIDS in os.environ:
        env[userns.ENV_SUBIDS] = os.environ[userns.ENV_SUBIDS]
    argv = [sys.executable, "-I", "-S", CHILD, json.dumps({**request, "path": _PACKAGE_PATH})]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ImageError(f"the rootless layer unpacker failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-1000:] or 'no output'}")
    if "error" in answer:
        raise (Refused if answer.get("refused") else ImageError)(str(answer["error"]))
    return answer
