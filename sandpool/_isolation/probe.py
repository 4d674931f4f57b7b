"""Which isolation levels this machine supports, probed once per process and cached.

``process`` works everywhere. ``namespaces`` needs Linux and overlayfs, and either root
(capabilities to mount and make every namespace type) or, for an ordinary user, unprivileged user
namespaces (rootless, see ``userns``); the probe forks a child that really unshares them all (as an
ordinary user: in a user namespace it made first), so a container without CAP_SYS_ADMIN, or a
kernel that forbids unprivileged user namespaces, answers no, and says why. Both need libseccomp too: they never run without their syscall
filter. ``oci`` needs the namespaces level's prerequisites, root, and ``crun`` on PATH. ``auto`` is the strongest of process and namespaces (oci is opt-in).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys

from _sandpool_agent.confine import _sys, seccomp

LEVELS = ("process", "namespaces", "oci")
_NAMESPACE_FLAGS = (_sys.CLONE_NEWNS | _sys.CLONE_NEWPID | _sys.CLONE_NEWUTS | _sys.CLONE_NEWIPC
                    | _sys.CLONE_NEWNET | _sys.CLONE_NEWCGROUP)
#: argv: the directory holding _sandpool_agent, "1" to enter a user namespace first, the flags.
#: Exit 0: it worked; errno: the unshare failed; 128 | errno: the user namespace did.
_PROBE_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from _sandpool_agent.confine import _sys, userns
step = 1
try:
    if sys.argv[2]:
        userns.enter()
    step = 2
    _sys.unshare(int(sys.argv[3]))
except OSError as exc:
    sys.exit(min(exc.errno or 1, 127) | (128 if step == 1 else 0))
"""


@functools.cache
def unavailable(level: str) -> str | None:
    """Why ``level`` cannot run here, or None when it can."""
    if level == "process":
        return None
    if level not in LEVELS:
        return f"unknown isolation level {level!r}"
    if not sys.platform.startswith("linux") or not _sys.AVAILABLE:
        return f"the {level} level needs Linux (this is {sys.platform})"
    if level == "oci" and os.geteuid() != 0:
        return f"the oci level needs root (uid {os.geteuid()}); use isolation='namespaces' (rootless) instead"
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                return "the kernel has no overlayfs (try 'modprobe overlay')"
    except OSError:
        return "/proc/filesystems is unreadable"
    failure = _try_unshare() or seccomp.unavailable()
    if failure:
        return failure
    if level == "oci" and not oci_runtime():
        return "no OCI runtime: install crun (apt-get install crun)"
    return None


def best() -> str:
    """What ``isolation="auto"`` means on this machine (the process level says once that it is the last resort)."""
    why = unavailable("namespaces")
    if why is None:
        return "namespaces"
    _last_resort(why)
    return "process"


@functools.cache
def _last_resort(why: str) -> None:
    logging.getLogger("sandpool").warning(
        "isolation='auto' fell back to the process level, the last resort: sandboxes share the host's files "
        "and network and cannot use images (the namespaces level is unavailable: %s)", why)


def oci_runtime() -> str | None:
    """Path of crun, or None (runc is not wired up: crun is faster and needs no cgroup manager)."""
    from _sandpool_agent.confine.oci import runtime_binary

    return runtime_binary()


def rootless() -> bool:
    """Whether this process's sandboxes run in a user namespace (see ``userns``): not root."""
    return os.geteuid() != 0


def _try_unshare() -> str | None:
    """Start a child that makes every namespace the level uses (as an ordinary user, inside a user
    namespace it makes first, as the template does); its exit status is the answer. The child is a
    fresh interpreter, not a fork: a fork of this process runs Python beside the locks of whatever
    threads it has (a gRPC server's), and such a child has died of SIGSEGV, which read as "no"."""
    user = rootless()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(_sys.__file__))))
    child = subprocess.run([sys.executable, "-I", "-c", _PROBE_CHILD, package_root, "1" if user else "",
                            str(_NAMESPACE_FLAGS)], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    code = child.returncode
    if code < 0:
        return f"the probe's child died of signal {-code} ({child.stderr.decode(errors='replace')[-200:]!r})"
    if code >= 128:
        return (f"uid {os.geteuid()} cannot make a user namespace ({os.strerror(code - 128)}): unprivileged "
                f"user namespaces are off (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces "
                f"> 0, or an AppArmor/SELinux policy that allows them), or run as root")
    if code:
        inside = " in a user namespace" if user else ""
        return f"unshare of pid/mount/net/uts/ipc/cgroup namespaces{inside} failed: {os.strerror(code)}"
    return None
