"""The ``bridge`` network, sandbox and template side: join the network namespace the host made, and
remove the sandbox's firewall chains after it is reaped.

The client (root) makes the sandbox's network namespace itself, with its veth, address, route and
nftables chains (``sandpool._isolation.netns``), and holds it open by a descriptor; the plan names
that descriptor as ``/proc/<client pid>/fd/<n>`` (``plan["netns"]``). The agent joins it (``join``)
right after its other namespaces, before its root is built (so its ``/sys`` shows the sandbox's
interfaces, not the host's), while it still holds CAP_SYS_ADMIN. The template runs the sandbox's
``teardown`` (an ``nft`` script deleting its chains) when it reaps the agent, so the rules go with
the sandbox even when the client was SIGKILLed; the veth goes with the namespace by itself.

Stdlib only: the template imports this module.
"""

from __future__ import annotations

import errno
import os
import subprocess

from . import _sys

NFT = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")


def join(plan: dict) -> None:
    """Enter ``plan["netns"]`` (the ``bridge`` mode's namespace) if the plan names one; OSError if
    it is gone (the client died before the agent got here)."""
    path = plan.get("netns")
    if not path:
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        expected = plan.get("netns_id")
        if expected is not None:  # named by a pid: it must still be the namespace the client holds
            info = os.fstat(fd)
            if [info.st_dev, info.st_ino] != list(expected):
                raise OSError(errno.ESRCH, f"the network namespace at {path} is no longer the pod's")
        _sys.setns(fd, _sys.CLONE_NEWNET)
    finally:
        os.close(fd)


def teardown(script: str | None) -> None:
    """Run the sandbox's nft ``script`` (deleting its chains and map entries); errors are ignored:
    what is already gone stays gone, and the next runtime's sweep removes what is left."""
    if not script:
        return
    nft = next((p for p in NFT if os.path.exists(p)), None)
    if nft is None:
        return
    try:
        subprocess.run([nft, "-f", "-"], input=script.encode(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        pass
