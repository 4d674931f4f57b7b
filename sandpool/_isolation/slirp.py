"""The bridge network of an ordinary user's sandbox: egress through slirp4netns, a user-mode network
stack (Debian package ``slirp4netns``).

An ordinary user can make neither a veth on the host nor nftables rules, so a rootless bridge
sandbox makes its network namespace as a ``none`` sandbox does (spares included), and once it is
running the client starts ``slirp4netns`` for it: it enters the sandbox's user and network
namespaces, makes ``tap0`` there (10.0.2.100/24, default route and DNS via 10.0.2.2/10.0.2.3) and
relays the sandbox's connections through sockets of its own on the host, as the user.
``--disable-host-loopback`` keeps the host's 127.0.0.1 out of reach. It exits when the client
closes its end of ``--exit-fd`` (the sandbox's end, or the client's death, SIGKILL included).
Its API socket lies in the sandbox's directory, so leak checks find a slirp4netns left running.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess

PACKAGES = "slirp4netns (Debian package slirp4netns)"
#: How long slirp4netns may take to say it is ready.
_READY_SECONDS = 10.0


TUN = "/dev/net/tun"


def tun_mode() -> str:
    try:
        return oct(os.stat(TUN).st_mode & 0o777)
    except OSError as exc:
        return f"missing ({exc.strerror})"


def find() -> str | None:
    return shutil.which("slirp4netns") or next(
        (p for p in ("/usr/bin/slirp4netns", "/usr/local/bin/slirp4netns") if os.path.exists(p)), None)


class Slirp:
    """slirp4netns for one sandbox (agent ``pid``); ``start`` blocks until it is ready."""

    def __init__(self, binary: str, pid: int, api_socket: str) -> None:
        self.binary, self.pid, self.api_socket = binary, pid, api_socket
        self.proc: subprocess.Popen[bytes] | None = None
        self._exit_w = -1

    def start(self) -> None:
        """Start it; OSError (with what it said) if it fails or is not ready in time."""
        exit_r, self._exit_w = os.pipe()
        ready_r, ready_w = os.pipe()
        argv = [self.binary, "--configure", "--mtu=65520", "--disable-host-loopback",
                f"--exit-fd={exit_r}", f"--ready-fd={ready_w}", f"--api-socket={self.api_socket}",
                f"--userns-path=/proc/{self.pid}/ns/user", "--netns-type=path", f"/proc/{self.pid}/ns/net", "tap0"]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(exit_r, ready_w), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            os.close(exit_r)
            os.close(ready_w)
        try:
            poller = select.poll()  # (not select(): a client with ~1,000 sandboxes has fds above 1,024)
            poller.register(ready_r, select.POLLIN)
            ready = os.read(ready_r, 1) if poller.poll(_READY_SECONDS * 1000) else b""
        finally:
            os.close(ready_r)
        if ready != b"1":
            err = self.close()
            raise OSError(1, f"slirp4netns did not start: {err or 'not ready in time'}")

    def close(self) -> str:
        """Let it exit (EOF on its exit fd), and reap it; returns what it wrote to stderr."""
        err = b""
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                err = self.proc.stderr.read()
                self.proc.stderr.close()
                self.proc.stderr = None
        return err.decode(errors="replace").strip()
