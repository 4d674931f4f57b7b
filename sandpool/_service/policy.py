"""The server's authorization floor: which sandboxes a remote client may have it run.

A client's commands run with the privileges of the sandbox's level on the server's machine: at
``process`` they run as the server's own user on its file system (root, for a root server). So a
server never runs a client's sandbox below ``min_isolation``, and gives it the host's network only
when ``allow_host_network`` says so (a sandbox on the host's network reaches every loopback service
of the machine). ``isolation="auto"`` from a client means the strongest level the machine has,
which must be at or above the floor. Decisions here are plain functions; ``control.py`` applies them
before the runtime sees the spec.

Defaults: a root server's floor is ``namespaces`` and refuses host networking; a server of an
ordinary user (which has only the ``process`` level, whose sandboxes share the host's network
anyway) has the floor ``process`` and allows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from .._config import SandboxSpec
from .._isolation import network

LEVELS = ("process", "namespaces", "oci")


class Refused(Exception):
    """The server's policy refuses what a client asked for (gRPC PERMISSION_DENIED)."""


def _rank(level: str) -> int:
    return LEVELS.index(level)


@dataclass(frozen=True)
class Policy:
    """``min_isolation``: the weakest level a client may get; ``allow_host_network``: whether a
    client's sandbox may use the host's network."""

    min_isolation: str = "process"
    allow_host_network: bool = True

    def __post_init__(self) -> None:
        if self.min_isolation not in LEVELS:
            raise ValueError(f"--min-isolation must be one of {', '.join(LEVELS)}, got {self.min_isolation!r}")

    @classmethod
    def default(cls, min_isolation: str | None = None, allow_host_network: bool | None = None, *,
                euid: int | None = None) -> Policy:
        """The policy of a server that named only these (None: the default for its user)."""
        root = (os.geteuid() if euid is None else euid) == 0
        floor = min_isolation or ("namespaces" if root else "process")
        host = (floor == "process") if allow_host_network is None else allow_host_network
        return cls(floor, host)

    def __str__(self) -> str:
        return f"min-isolation={self.min_isolation}, host network {'allowed' if self.allow_host_network else 'refused'}"

    def admit(self, spec: SandboxSpec, auto_level: Callable[[], str]) -> SandboxSpec:
        """``spec`` with its isolation level pinned, if this policy lets a client have it.

        ``auto_level()`` is what ``isolation="auto"`` means on this machine. Raises Refused naming
        the option, the floor and the fix; ValueError/TypeError for a network option that cannot map.
        """
        level = auto_level() if spec.isolation == "auto" else spec.isolation
        if _rank(level) < _rank(self.min_isolation):
            if spec.isolation == "auto":
                raise Refused(f"permission denied: isolation='auto' means {level!r} on this server, below its "
                              f"floor {self.min_isolation!r} (the server cannot run sandboxes at its own floor)")
            raise Refused(f"permission denied: isolation={level!r} is below this server's floor "
                          f"{self.min_isolation!r}; ask for isolation={self.min_isolation!r} or 'auto' (the server's "
                          f"operator can lower the floor with --min-isolation)")
        if not self.allow_host_network and network.resolve(spec.network, level) == "host":
            raise Refused(f"permission denied: network={spec.network!r} gives the sandbox the host's network, which "
                          f"this server's policy refuses; use network='none' (the server's operator can allow it "
                          f"with --allow-host-network)")
        if any(volume["kind"] == "bind" for volume in spec.volumes or ()):
            raise Refused("permission denied: a volume with host_path binds a directory of the server's machine, "
                          "which a server never does for a client; use a named volume ('sandpool volume create' on "
                          "the server) or a scratch volume")
        return spec if spec.isolation == level else spec.with_overrides(isolation=level)
