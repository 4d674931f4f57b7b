"""Spare children (see ``supervisor``): which ones the template keeps, and the root one builds.

Per network mode in use, the template keeps spares with a root built for each of the last
``ROOTS_PER_MODE`` roots asked for (``NEWEST_ROOT_SPARES`` for the newest), and one without a root
(for any other plan). Spares are forked in bursts, never one alone: a child forked alone keeps, as
private memory, a copy of each page the template writes in every round of its loop (~110 pages,
~0.4 MiB), while one forked right beside another keeps only the few the template writes between
the two forks. So a burst that would fork a single child takes one spare more, while its kind has
fewer than ``EXTRA`` times its count (spares that are not ready yet, as under load, make the template
fork agents; one more spare beside each is one the next sandboxes take), or to any kind where the
template waited for a second spawn in vain.

Stdlib only: this runs in the template (``python -I -S``).
"""

from __future__ import annotations

import os
import stat
import socket
from collections import Counter

from . import namespaces

#: Per network mode, spares keep roots built for this many of the plans (root_key) asked for last.
ROOTS_PER_MODE = 3
#: Spares with the newest root: one is ready while the next builds (~3-7 ms), for starts in a row.
NEWEST_ROOT_SPARES = 2
#: A burst of one takes a spare more while its kind has fewer than this many times its count.
EXTRA = 2
#: Added to a spare's nice value while it builds a root (then set back).
BUILD_NICENESS = 10

Kind = tuple[str, "str | None", "dict | None"]  # (network mode, root_key or None, the plan to build it)


def ask(wanted: dict[str, dict[str, dict]], mode: str, key: str, plan: dict) -> None:
    """Record that a sandbox of network ``mode`` asked for the root ``key`` (of ``plan``):
    ``wanted[mode]`` keeps the last ``ROOTS_PER_MODE`` asked for, oldest first."""
    roots = wanted.setdefault(mode, {})
    roots.pop(key, None)
    roots[key] = plan
    while len(roots) > ROOTS_PER_MODE:
        del roots[next(iter(roots))]


def missing(wanted: dict[str, dict[str, dict]], have: Counter, buildable: bool, unbuildable: set[str],
            forking: int, extra: int | None = EXTRA) -> list[Kind]:
    """The spares to fork now, in a burst with ``forking`` other children: each a ``Kind``, those
    missing from ``have`` (a count per ``(mode, key)``) first. ``buildable``: spares may build
    roots at all; none builds a root in ``unbuildable``. ``extra``: the one more for a burst of one
    goes only to a kind with fewer than ``extra`` times its count (None: to any)."""
    wishes = []
    for mode in sorted(wanted):
        roots = [(key, plan) for key, plan in reversed(wanted[mode].items()) if buildable and key not in unbuildable]
        counts = [(key, plan, NEWEST_ROOT_SPARES) for key, plan in roots[:1]]
        counts += [(None, None, 1)] + [(key, plan, 1) for key, plan in roots[1:]]
        wishes += [(mode, key, plan, count) for key, plan, count in counts]
    kinds: list[Kind] = [(mode, key, plan) for mode, key, plan, count in wishes
                         for _ in range(count - have[mode, key])]
    if forking + len(kinds) == 1:  # never a burst of one child: one more, where its kind has room
        kinds += [(mode, key, plan) for mode, key, plan, count in wishes
                  if extra is None or have[mode, key] + kinds.count((mode, key, plan)) < extra * count][:1]
    return kinds


def file_stamps(plan: dict) -> tuple:
    """(inode, mtime) of each file (not directory) ``plan`` binds: a bind shows the file it was made
    of, so a root built before a client's module was saved again (by rename) must not be used."""
    stamps = []
    for source, _target in plan.get("binds") or ():
        try:
            info = os.stat(source)
        except OSError:
            stamps.append(None)
            continue
        if not stat.S_ISDIR(info.st_mode):
            stamps.append((info.st_ino, info.st_mtime_ns))
    return tuple(stamps)


def build_root(plan: dict, spare_dir: str, holder: socket.socket | None) -> None:
    """In a spare, before it is handed a sandbox: the root for plans like ``plan`` (the namespaces
    level's ``build_root``), its scratch tree on a tmpfs over the template's own directory, which
    is there as long as any spare. Built at a lower CPU priority: it runs beside the sandbox that
    took the spare before, which is starting. A spare that cannot build it exits (the sandbox that
    follows takes a spare without a root or is forked, and reports the error)."""
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness + BUILD_NICENESS))
        namespaces.build_root(namespaces.relocated(plan, spare_dir), holder)
        os.setpriority(os.PRIO_PROCESS, 0, niceness)  # (root may raise it again) the agent's, as forked
    except OSError:
        os._exit(3)
