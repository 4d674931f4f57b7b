"""The template's hold on each sandbox's writable storage, for snapshots (see ``storage.hold``).

Each child forked for a sandbox (an agent, or a spare) gets one end of a socket pair (``holder``)
over which it sends, before its pivot_root, an O_PATH descriptor of its tmpfs; the template keeps
that descriptor while the sandbox runs and closes it when the sandbox is reaped. Nothing is held
where no selector hears the socket, or rootless (see ``storage.hold``).

Stdlib only: this runs in the template (``python -I -S``).
"""

from __future__ import annotations

import os
import selectors
import socket


class Held:
    """Per-template: the storage descriptor of each agent or spare, and the sockets still waiting
    for one; in a child of the template, its own end (``holder``) until it hands its storage over."""

    def __init__(self, rootless: bool) -> None:
        self.rootless = rootless
        self.sel: selectors.BaseSelector | None = None  # the template's selector, where sockets wait
        self.fds: dict[int, int] = {}  # agent or spare pid -> its writable storage (O_PATH)
        self.socks: dict[int, socket.socket] = {}  # pid -> our end of its holder, until that arrives
        self.holder: socket.socket | None = None  # in a child: its end, until it hands over its storage

    def pair(self) -> tuple[socket.socket, socket.socket] | None:
        """A socket pair over which a child hands over its storage; None where none is held
        (rootless, or no selector to hear it on)."""
        if self.rootless or self.sel is None:
            return None
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def keep(self, pid: int, pair: tuple[socket.socket, socket.socket] | None) -> None:
        """After the fork of ``pair``'s child ``pid`` (0 in the child): each side keeps its end."""
        if pair is None:
            return
        ours, theirs = pair
        if pid == 0:
            ours.close()
            self.holder = theirs
            return
        theirs.close()
        self.socks[pid] = ours
        assert self.sel is not None
        self.sel.register(ours, selectors.EVENT_READ, ("hold", pid))

    def take_holder(self) -> socket.socket | None:
        """In a child: its end, handed to ``storage.hold`` (which closes it); None from then on."""
        holder, self.holder = self.holder, None
        return holder

    def drop_holder(self) -> None:
        """In a child that hands nothing over: nothing of the socket stays with the agent."""
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def take(self, pid: int) -> None:
        """The child ``pid`` sent its storage's descriptor (or closed its end): keep the one, close
        the socket."""
        sock = self.socks.pop(pid)
        if self.sel is not None:
            self.sel.unregister(sock)
        try:
            _data, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        except OSError:
            fds = []
        sock.close()
        for fd in fds[1:]:
            os.close(fd)
        if fds:
            self.fds[pid] = fds[0]

    def release(self, pid: int) -> None:
        """``pid`` is gone: close its socket (a descriptor still on its way with it) and its storage."""
        sock = self.socks.pop(pid, None)
        if sock is not None:
            if self.sel is not None:
                self.sel.unregister(sock)
            sock.close()
        fd = self.fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for pid in set(self.fds) | set(self.socks):
            self.release(pid)
