"""A pod's further containers, host side (runs in the runtime's trio loop).

Each container of a pod (``sandpool._pods``) is a sandbox of its own: its own agent, cgroup and
limits, mount, pid, uts, ipc and cgroup namespaces, root filesystem (its image), seccomp filter and
capability set, exactly as any sandbox of its level. What they share is the primary container's
network namespace: a further container's agent joins it (``setns``, before it builds its root)
instead of making its own, so the containers reach each other on ``localhost`` and share the pod's
``bridge`` address, rules and exposed ports.

``join`` marks a record as a member of ``primary``'s pod (``LocalRuntime.join_pod``).
``prepare`` (in ``Isolation.prepare``) opens the primary's network namespace from its agent's
``/proc/<pid>/ns/net`` and names the descriptor in the member's plan (as the bridge network names
its namespace: ``plan["netns"]``, which ``_sandpool_agent.confine.netsetup.join`` enters);
``started`` and ``release`` let go of the descriptor once the member's agent is in (or never
started). With the host's network (the ``process`` level) there is nothing to join. The ``oci``
level (crun makes the namespaces) is refused.
"""

from __future__ import annotations

import os
from typing import Any

from .._errors import SandboxFailedError

__all__ = ["join", "prepare", "release", "started"]

_PRIMARY = "pod"  # record.extra: the primary's record
_NETNS_FD = "pod_netns"  # record.extra: the descriptor of the primary's namespace, until the agent joined


def join(record: Any, primary: Any) -> None:
    """Make ``record`` a member of ``primary``'s pod; SandboxFailedError at the ``oci`` level."""
    if record.isolation == "oci":
        raise SandboxFailedError(
            "several containers per sandbox are not available at isolation='oci' (crun makes each container's "
            "namespaces); use isolation='namespaces'", sandbox_id=primary.sandbox_id, status_reason="InvalidSpec")
    record.extra[_PRIMARY] = primary


def prepare(record: Any, config: dict[str, Any], plan: dict[str, Any], mode: str) -> bool:
    """For a member (True; False for any other sandbox): name the primary's network namespace in
    its namespaces ``plan`` (with the host's network, nothing to join). SandboxFailedError if the
    primary has ended."""
    primary = record.extra.get(_PRIMARY)
    if primary is None:
        return False
    if mode == "host":
        return True
    pid = primary.agent_pid
    if pid is None or primary.exited.is_set():
        raise SandboxFailedError(f"container of pod {primary.sandbox_id}: its primary container has ended; start "
                                 f"the pod again", sandbox_id=record.sandbox_id, status_reason="PodEnded")
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:  # its agent is gone (reaped, not yet reported)
        raise SandboxFailedError(f"container of pod {primary.sandbox_id}: cannot join its network ({exc})",
                                 sandbox_id=record.sandbox_id, status_reason="PodEnded") from exc
    record.extra[_NETNS_FD] = fd
    if os.geteuid() == 0:
        plan["netns"] = f"/proc/{os.getpid()}/fd/{fd}"
    else:  # a rootless agent may not open the client's descriptors (its uids are the sandbox's range):
        info = os.fstat(fd)  # it opens the primary's namespace itself, checked to be this one (the
        plan["netns"] = f"/proc/{pid}/ns/net"  # primary's pid may be reused; the descriptor held
        plan["netns_id"] = [info.st_dev, info.st_ino]  # here keeps the namespace and its identity)
    lease = primary.extra.get("bridge")
    if lease is not None:  # the pod's bridge network: its DNS and address too
        if os.path.exists("/etc/resolv.conf"):
            plan["binds"] = [*plan["binds"], [os.path.realpath("/etc/resolv.conf"), "/etc/resolv.conf"]]
        config["env"].setdefault("SANDPOOL_SANDBOX_ADDRESS", lease.address)
    return True


def started(record: Any) -> None:
    """The member's agent is in its namespaces: it holds the network namespace now."""
    release(record)


def release(record: Any) -> None:
    fd = record.extra.pop(_NETNS_FD, None)
    if fd is not None:
        os.close(fd)
