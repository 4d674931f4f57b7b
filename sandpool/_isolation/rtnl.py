"""The few rtnetlink requests a bridge sandbox's network needs, sent from this process (no ``ip``
process per step: under load each costs 10-50 ms).

A netlink socket talks to the network namespace of the thread that opened it, so ``Netlink()``
opened after a thread's ``unshare(CLONE_NEWNET)`` configures the new namespace. Each request is
acknowledged; a refusal raises OSError with the kernel's errno and the step's name. Stdlib only.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFLA_IFNAME, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 3, 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY = 4, 5
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BBHiII")  # ifinfomsg: family, pad, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def _ip(address: str) -> bytes:
    return socket.inet_aton(address)


class Netlink:
    """An rtnetlink socket of the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes, step: str) -> None:
        self._seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self._seq, 0)
                       + body)
        while True:
            data = self.sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, mtype, _flags, seq, _port = _HEADER.unpack_from(data, offset)
                if mtype == NLMSG_ERROR and seq == self._seq:
                    code = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                    if code:
                        raise OSError(code, f"{step}: {os.strerror(code)}")
                    return
                offset += max(length + (-length % 4), _HEADER.size)

    def veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: ``name`` here, ``peer`` in the namespace ``peer_netns_fd`` (EEXIST there if taken)."""
        peer_info = _IFINFO.pack(0, 0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer)) + _attr(
            IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
        info = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))
        body = _IFINFO.pack(0, 0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)) + _attr(IFLA_LINKINFO, info)
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"veth {name}/{peer}")

    def up(self, index: int, alias: str | None = None) -> None:
        """Set link ``index`` up (and its alias)."""
        body = _IFINFO.pack(0, 0, 0, index, IFF_UP, IFF_UP) + (_attr(IFLA_IFALIAS, _name(alias)) if alias else b"")
        self._request(RTM_NEWLINK, 0, body, f"link {index} up")

    def address(self, index: int, address: str, prefix: int) -> None:
        body = _IFADDR.pack(socket.AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index) + _attr(
            IFA_LOCAL, _ip(address)) + _attr(IFA_ADDRESS, _ip(address))
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"address {address}/{prefix}")

    def default_route(self, index: int, gateway: str) -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0) \
            + _attr(RTA_GATEWAY, _ip(gateway)) + _attr(RTA_OIF, struct.pack("=I", index))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, f"default route via {gateway}")


def index(name: str) -> int:
    """The index of interface ``name`` in the calling thread's namespace; OSError ENODEV if none."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface {name}") from None
