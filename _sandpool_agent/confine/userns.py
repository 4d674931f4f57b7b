"""Rootless sandboxes: the template of an ordinary user runs in a user namespace of its own.

An unprivileged user cannot mount, make pid namespaces or pivot_root, except inside a user
namespace it made. So the template of a non-root owner (the runtime sets ``ENV`` when the probe
found the namespaces level usable, see ``probe``) calls ``enter`` first thing: a new user
namespace in which the user is root. Everything the template forks is in that namespace and the
namespaces level runs there as it does for root, within what the kernel allows a user namespace
(see ``namespaces``): files a sandbox writes to any host path are the user's own.

The map: when ``/etc/subuid`` and ``/etc/subgid`` give the user a range and ``newuidmap`` and
``newgidmap`` (Debian's ``uidmap``) are installed, a full one (``ranges``): 0 inside is the user,
1..N inside are the user's first subordinate range, so an image's files of several owners keep
them and ``setuid`` to those ids works inside. The setuid helpers write it for us (a forked child,
still outside, runs them on our pid once we unshared). Otherwise, or with ``SANDPOOL_SUBIDS=0``,
a single-id map the process writes itself: uid and gid 0 inside are the user's outside, no other
id exists inside, and nothing inside can act as any other host user.

The ``process`` level must not run as root of that namespace (its capabilities there reach the
namespaces sandboxes' namespaces): its agents ``leave`` first, into a nested user namespace that
maps the user's own ids back, with no capability over anything of the template's.

Stdlib only: the template imports this module.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import NamedTuple

from . import _sys

#: Set to "1" in the template's environment: enter a user namespace before serving.
ENV = "SANDPOOL_USERNS"
#: "0": the single-id map even where subordinate ranges exist (the runtime passes it on).
ENV_SUBIDS = "SANDPOOL_SUBIDS"
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
HELPER_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


class Ranges(NamedTuple):
    """The full map: (first id outside, count) of the subordinate uids and gids, 1..count inside."""

    uid: tuple[int, int]
    gid: tuple[int, int]
    newuidmap: str
    newgidmap: str

    def key(self) -> str:
        """A name for this map (the rootless layer store keeps one tree per map)."""
        return f"{self.uid[0]}-{self.uid[1]}-{self.gid[0]}-{self.gid[1]}"


def ranges(uid: int | None = None, gid: int | None = None) -> Ranges | None:
    """The full map of user ``uid`` (default: ours), or None: no range in ``/etc/subuid`` or
    ``/etc/subgid``, no ``newuidmap``/``newgidmap``, or ``SANDPOOL_SUBIDS=0``."""
    if os.environ.get(ENV_SUBIDS) == "0":
        return None
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    tools = [next((os.path.join(d, t) for d in HELPER_DIRS if os.access(os.path.join(d, t), os.X_OK)), None)
             for t in ("newuidmap", "newgidmap")]
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = None
    subuid, subgid = _first_range(SUBUID, uid, name), _first_range(SUBGID, gid, group, name)
    if None in tools or subuid is None or subgid is None:
        return None
    return Ranges(subuid, subgid, tools[0], tools[1])  # type: ignore[arg-type]


def _first_range(path: str, number: int, *names: str | None) -> tuple[int, int] | None:
    """The first ``owner:start:count`` line of ``path`` for ``number`` or one of ``names``.
    (newgidmap accepts the user's name in /etc/subgid too, as shadow does.)"""
    owners = {str(number), *filter(None, names)}
    try:
        with open(path) as f:
            for line in f:
                owner, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if owner in owners and start.isdigit() and count.isdigit() and int(count) > 0:
                    return int(start), int(count)
    except OSError:
        pass
    return None


def enter(full: Ranges | None | bool = True) -> tuple[int, int]:
    """Become root of a new user namespace (uid/gid 0 inside = ours outside; with ``full`` the
    subordinate ranges too, as ``ranges`` finds them when True); returns our (uid, gid) outside,
    for ``leave``. Raises OSError when the kernel or a setuid helper refuses."""
    uid, gid = os.getuid(), os.getgid()
    found = ranges(uid, gid) if full is True else full or None
    if found is None:
        _sys.unshare(_sys.CLONE_NEWUSER)
        _map(0, uid, 0, gid)
    else:
        _enter_mapped(found, uid, gid)
    return uid, gid


def _enter_mapped(found: Ranges, uid: int, gid: int) -> None:
    """unshare, while a forked child (still outside) has the setuid helpers write our maps. Only
    fork and exec in the child: the caller may have threads (the probe's parent)."""
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"u":
                target = str(os.getppid())
                code = 0
                for tool, own, (start, count) in ((found.newuidmap, uid, found.uid), (found.newgidmap, gid, found.gid)):
                    helper = os.fork()
                    if helper == 0:
                        try:
                            os.execv(tool, [tool, target, "0", str(own), "1", "1", str(start), str(count)])
                        finally:
                            os._exit(127)
                    code = code or os.waitstatus_to_exitcode(os.waitpid(helper, 0)[1])
        finally:
            os._exit(0 if code == 0 else 1)
    os.close(ready_r)
    try:
        try:
            _sys.unshare(_sys.CLONE_NEWUSER)
        except BaseException:
            os.close(ready_w)  # (EOF: the child maps nothing)
            raise
        os.write(ready_w, b"u")
        os.close(ready_w)
    finally:
        status = os.waitpid(child, 0)[1]
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(1, f"{found.newuidmap}/{found.newgidmap} could not map the ranges {found.key()} of "
                         f"{SUBUID} and {SUBGID} (exit {os.waitstatus_to_exitcode(status)}); fix those files, "
                         f"or set {ENV_SUBIDS}=0 for the single-id map")


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
