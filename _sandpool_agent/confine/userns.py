"""Rootless sandboxes: the template of an ordinary user runs in a user namespace of its own.

An unprivileged user cannot mount, make pid namespaces or pivot_root, except inside a user
namespace it made. So the template of a non-root owner (the runtime sets ``ENV`` when the probe
found the namespaces level usable, see ``probe``) calls ``enter`` first thing: a new user
namespace in which the user is root (a single-id map the process writes itself: uid and gid 0
inside are the user's outside; no subordinate ranges, so no setuid helper is involved and nothing
inside can become any other host user). Everything the template forks is in that namespace and
the namespaces level runs there as it does for root, within what the kernel allows a user
namespace (see ``namespaces``): files a sandbox writes to any host path are the user's own.

The ``process`` level must not run as root of that namespace (its capabilities there reach the
namespaces sandboxes' namespaces): its agents ``leave`` first, into a nested user namespace that
maps the user's own ids back, with no capability over anything of the template's.

Stdlib only: the template imports this module.
"""

from __future__ import annotations

import os

from . import _sys

#: Set to "1" in the template's environment: enter a user namespace before serving.
ENV = "SANDPOOL_USERNS"


def enter() -> tuple[int, int]:
    """Become root of a new user namespace (uid/gid 0 inside = ours outside); returns our
    (uid, gid) outside, for ``leave``. Raises OSError when the kernel refuses."""
    uid, gid = os.getuid(), os.getgid()
    _sys.unshare(_sys.CLONE_NEWUSER)
    _map(0, uid, 0, gid)
    return uid, gid


def leave(outside: tuple[int, int]) -> None:
    """From root of the template's user namespace to the user again (``outside``: its ids there),
    in a nested user namespace: what runs afterwards holds no capability over the template's."""
    _sys.unshare(_sys.CLONE_NEWUSER)
    _map(outside[0], 0, outside[1], 0)


def _map(uid_inside: int, uid_outside: int, gid_inside: int, gid_outside: int) -> None:
    _write("/proc/self/setgroups", "deny")  # (required before an unprivileged gid_map)
    _write("/proc/self/uid_map", f"{uid_inside} {uid_outside} 1\n")
    _write("/proc/self/gid_map", f"{gid_inside} {gid_outside} 1\n")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
