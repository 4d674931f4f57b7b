"""The unix-socket gate: only allowed users' connections reach the gRPC server.

gRPC's Python server tells a handler nothing about a unix-socket peer (its peer is ``"unix:"``),
so the check happens at accept time, here: the gate owns the public socket (mode 0600, or 0666
when other users are allowed, in a directory of the server's user), reads each connection's
``SO_PEERCRED`` (the kernel's word for the connecting process's uid), and relays the connection's
bytes to the gRPC server's private socket if that uid is allowed (the server's own, root's, and
those of ``--allow-uid``), else to a small gRPC server that answers every call PERMISSION_DENIED
with the reason. Nothing of a refused peer reaches a handler.

Each connection is relayed by two threads (one per direction), which spend their time in
``recv``/``send`` with the GIL released; gRPC keeps one connection per client channel, so there
are few. At most ``MAX_CONNECTIONS`` at once, of which at most ``MAX_REFUSED`` refused ones (so
users who may not connect cannot crowd out those who may); more are closed at accept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading

log = logging.getLogger("sandpool.serve")

MAX_CONNECTIONS = 1024
MAX_REFUSED = 16
_CHUNK = 256 * 1024
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    uid: int
    _pid, uid, _gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


class PeerGate:
    """Accepts on ``public_path``; relays allowed peers to ``inner_path``, others to ``deny_path``."""

    def __init__(self, public_path: str, inner_path: str, deny_path: str, allowed_uids: frozenset[int]) -> None:
        self.public_path = public_path
        self.inner_path = inner_path
        self.deny_path = deny_path
        self.allowed = allowed_uids
        self._logged: set[int] = set()  # uids whose refusal was logged (once each: no log flooding)
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._refused_open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<PeerGate {self.public_path} uids={sorted(self.allowed)} open={len(self._conns)}>"

    def start(self) -> None:
        """Bind the public socket (replacing a stale one; the caller holds the listener's lock)."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.public_path).st_mode):
                os.unlink(self.public_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Born without write permission for others (umask 022), so unusable to them until the chmod;
        # the uid check at accept holds whatever the mode.
        sock.bind(self.public_path)
        others = any(uid not in (0, os.geteuid()) for uid in self.allowed)
        os.chmod(self.public_path, 0o666 if others else 0o600)
        sock.listen(128)
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True, name="sandpool-gate").start()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                uid = peer_uid(conn)
                allowed = uid in self.allowed
                with self._lock:
                    full = len(self._conns) >= 2 * MAX_CONNECTIONS
                    full = full or (not allowed and len(self._refused_open) >= MAX_REFUSED)
                if full or self._closed:
                    conn.close()
                    continue
                if not allowed and uid not in self._logged:
                    self._logged.add(uid)
                    log.info("refused a connection from uid %d (allowed: %s)", uid, sorted(self.allowed))
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                upstream.connect(self.inner_path if allowed else self.deny_path)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns.update((conn, upstream))
                if not allowed:
                    self._refused_open.add(conn)
            ends = [2]  # directions still running; the last one to end closes both sockets
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._relay, args=(src, dst, ends), daemon=True,
                                 name="sandpool-relay").start()

    def _relay(self, src: socket.socket, dst: socket.socket, ends: list[int]) -> None:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)  # the other side sees EOF, as it would without the relay
        with self._lock:
            ends[0] -= 1
            last = ends[0] == 0
            if last:
                for sock in (src, dst):
                    self._conns.discard(sock)
                    self._refused_open.discard(sock)
        if last:
            src.close()
            dst.close()

    def close(self) -> None:
        """Stop accepting, cut every relayed connection, remove the public socket."""
        self._closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # their relay threads see the end, and close them
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            os.unlink(self.public_path)
