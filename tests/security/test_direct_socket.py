"""The client's direct connection to a call worker goes to a socket in the sandbox's own /tmp, a
directory the sandbox controls: a sandbox that swaps the socket or the directory for a link to one
of this host's sockets gets a refusal (calls then go through the agent), never a connection."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from sandpool._functions.direct import DirectChannel


@pytest.fixture
def host_socket(tmp_path):
    """A listening unix socket standing for one of the host's own services."""
    path = str(tmp_path / "host-service.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.setblocking(False)
    yield path, server
    server.close()


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def test_a_socket_swapped_for_a_link_to_a_host_socket_is_refused(tmp_path, host_socket):
    path, server = host_socket
    sandbox_tmp = tmp_path / "sandbox-tmp"
    sandbox_tmp.mkdir()
    os.symlink(path, sandbox_tmp / ".sandpool-worker-x")
    with pytest.raises(OSError, match="not a socket"):
        trio.run(DirectChannel.connect, str(sandbox_tmp), ".sandpool-worker-x")
    assert not _accepted(server)


def test_a_tmp_swapped_for_a_link_to_a_host_directory_is_refused(tmp_path, host_socket):
    path, server = host_socket
    os.symlink(os.path.dirname(path), tmp_path / "sandbox-tmp")
    with pytest.raises(OSError):
        trio.run(DirectChannel.connect, str(tmp_path / "sandbox-tmp"), os.path.basename(path))
    assert not _accepted(server)


def test_a_real_socket_in_the_sandbox_directory_connects(tmp_path, host_socket):
    """The check refuses links only: the worker's own socket still connects."""
    path, server = host_socket
    channel = trio.run(DirectChannel.connect, os.path.dirname(path), os.path.basename(path))
    assert _accepted(server)
    channel.sock.close()
