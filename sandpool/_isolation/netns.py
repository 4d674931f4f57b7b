"""A bridge sandbox's network namespace, made by the client before the agent starts (blocking: run
it in a thread).

``make`` creates the namespace in the calling thread (unshare of CLONE_NEWNET affects only that
thread), and from there (rtnetlink, ``rtnl``): ``lo`` up, a veth pair whose sandbox end is
``eth0`` and whose host end ``spn<N>`` is created straight in the host's namespace (the kernel's
unique interface names allocate N across every process on the host: a name in use fails the
creation and another N is tried), ``eth0``'s address (``.2`` of a /30 of sandpool's range chosen by N) and
the default route via the host end (``.1``); IPv6 off on both ends. The thread then returns to the
host's namespace, holding the new one by a descriptor, gives the host end its address, alias
(``sandpool-<tag>``, what leak checks look for) and the nft chains (``nft``). The agent joins the
namespace through ``/proc/<pid>/fd/<fd>``; once it has, the descriptor is closed and the namespace,
its veth pair with it, lives exactly as long as the sandbox's processes.
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
import threading
from dataclasses import dataclass

from _sandpool_agent.confine import _sys

from . import network, nft, rtnl

#: How many interface indices are tried before giving up (a collision is rare: indices are random).
_ATTEMPTS = 16
_base_lock = threading.Lock()
_base_done: str | None = None


class BridgeError(OSError):
    """The bridge network could not be set up (the message says which step and why)."""


@dataclass
class Lease:
    """A made namespace: the descriptor holding it, the veth's host end, addresses, nft teardown."""

    fd: int
    iface: str
    address: str  # the sandbox's (eth0)
    gateway: str  # the host end's
    teardown: str  # nft script removing the sandbox's chains

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def close_fd(self) -> None:
        """Let go of the namespace (the agent holds it now, or the start failed)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ensure_base() -> None:
    """Once per process: IPv4 forwarding on (Docker does the same; it is never turned off again),
    the range checked against the host's routes, and sandpool's nft table (re)made."""
    global _base_done
    net = network.sandbox_range()
    with _base_lock:
        if _base_done == str(net):
            return
        _check_range(net)
        with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
            if f.read().strip() != "1":
                f.seek(0)
                f.write("1")
        nft.run(nft.base_script(str(net)))
        _base_done = str(net)


def _check_range(net: ipaddress.IPv4Network) -> None:
    """BridgeError if a route of the host that is not a sandbox's overlaps ``net``."""
    done = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        parts = line.split()
        dest = parts[1] if parts[0] in ("local", "broadcast", "unicast") else parts[0]
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        if dest == "default" or dev.startswith(nft.IFACE_PREFIX):
            continue
        try:
            other = ipaddress.IPv4Network(dest, strict=False)
        except ValueError:
            continue
        if other.overlaps(net):
            raise BridgeError(1, f"sandpool's bridge range {net} overlaps the host's route {line.strip()!r}; "
                                 f"set ${network.ENV_RANGE} to an unused range, e.g. 10.214.0.0/16")


def _slot(net: ipaddress.IPv4Network, index: int) -> tuple[str, str]:
    base = int(net.network_address) + 4 * index
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def make(tag: str, policy: network.Policy, nameservers: list[str], mark: int = 1) -> Lease:
    """Make a sandbox's namespace, veth, addresses and nft chains; BridgeError saying what failed.

    The nft chains are loaded while the namespace and veth are made (they name the interface, which
    need not exist yet): two of the three processes this runs overlap."""
    ensure_base()
    net = network.sandbox_range()
    slots = net.num_addresses // 4
    last = "no attempt"
    for _ in range(_ATTEMPTS):
        index = random.randrange(1, slots)
        iface = f"{nft.IFACE_PREFIX}{index}"
        gateway, address = _slot(net, index)
        teardown = nft.teardown_script(tag, iface)
        rules = nft.start(nft.sandbox_script(tag, iface, policy, nameservers, mark))
        fd, last = _inside(iface, gateway, address)
        try:
            nft.finish(rules)
        except OSError as exc:  # e.g. a stale map entry of that interface: another index
            last = f"nft: {exc}"
            if fd >= 0:
                os.close(fd)
            continue
        if fd >= 0:
            break
        nft_teardown_quietly(teardown)  # (an interface name in use: another index)
    else:
        raise BridgeError(1, f"cannot make a veth for a bridge sandbox: {last}")
    try:
        with rtnl.Netlink() as link:
            end = rtnl.index(iface)
            link.address(end, gateway, 30)
            link.up(end, alias=f"{network.NETNS_PREFIX}{tag}")
        _write(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6", "1")
    except OSError as exc:
        os.close(fd)  # the namespace goes, and both ends of the veth with it
        nft_teardown_quietly(teardown)
        raise BridgeError(1, f"cannot set up the bridge network of {tag}: {exc}") from exc
    return Lease(fd, iface, address, gateway, teardown)


def nft_teardown_quietly(script: str) -> None:
    try:
        nft.run(script)
    except OSError:
        pass


def _inside(iface: str, gateway: str, address: str) -> tuple[int, str]:
    """In a new network namespace of this thread: lo, the veth pair (host end ``iface`` put in the
    host's namespace), eth0's address and route. Returns (a descriptor of the namespace, "") or
    (-1, why) when that failed (the namespace is gone then); the thread is back in the host's."""
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fd = -1
    try:
        _sys.unshare(_sys.CLONE_NEWNET)
        try:
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            _write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")
            _write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
            with rtnl.Netlink() as link:  # (a netlink socket talks to the namespace it was opened in)
                link.up(rtnl.index("lo"))
                link.veth("eth0", iface, host)
                eth0 = rtnl.index("eth0")
                link.address(eth0, address, 30)
                link.up(eth0)
                link.default_route(eth0, gateway)
        finally:
            _sys.setns(host, _sys.CLONE_NEWNET)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        return -1, str(exc)
    finally:
        os.close(host)
    return fd, ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's IPv4 nameservers a sandbox can reach (loopback ones cannot be: they are left out)."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        addr = ipaddress.IPv4Address(parts[1])
                    except ValueError:
                        continue
                    if not addr.is_loopback:
                        found.append(str(addr))
    except OSError:
        pass
    return found
