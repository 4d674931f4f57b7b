"""Helpers of the bridge network's tests (tests/isolation/test_network.py and
tests/security/test_network_boundary.py): one bounded connect or a tiny server inside a sandbox."""

from __future__ import annotations

import os
import socket
import textwrap

import pytest

from sandpool import Session, testing
from sandpool._isolation import nft, probe

#: The module mark of the bridge network's tests.
NEEDS_BRIDGE = pytest.mark.skipif(probe.unavailable("namespaces") is not None or os.geteuid() != 0,
                                  reason="the bridge network needs the namespaces level as root")

#: Inside a sandbox: connect to argv[1]:argv[2] once (3 s at most), print ok / refused / the error.
CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        c.sendall(b"ping"); print("ok", c.recv(100).decode())
    except ConnectionRefusedError:
        print("refused")
    except OSError as exc:
        print("error", type(exc).__name__, exc.strerror)
""")
#: Inside a sandbox: serve one echo-with-prefix per connection on port argv[1], forever.
SERVE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("ready", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"from-sandbox:" + c.recv(100)); c.close()
""")


def connect(sb, host: str, port: int) -> str:
    """"ok <reply>", "refused" or "error ..." of one connect from sandbox ``sb``."""
    return sb.exec(["python3", "-c", CONNECT, host, str(port)]).result().stdout.strip()


def serve(sb, port: int):
    """Start ``SERVE`` in ``sb`` on ``port``; returns its process once it listens."""
    proc = sb.exec(["python3", "-c", SERVE, str(port)])
    assert next(iter(proc.stdout)).strip() == "ready"
    return proc


def host_connect(hostport: str) -> bytes:
    """What a server in a sandbox answers the host's "host" at ``hostport`` (an exposed port)."""
    host, port = hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.settimeout(5)
        c.sendall(b"host")
        return c.recv(100)


def assert_chains_and_veth_go_with(sb) -> None:
    """Stop bridge sandbox ``sb``: its three nft chains go, and its veth (the kernel destroys a
    namespace, and the veth with it, in a work queue: shortly after)."""
    sb.wait()
    tag = f"-{sb.sandbox_id}"
    assert len([c for c in nft.sandbox_chains() if c.endswith(tag)]) == 3
    sb.stop().result()
    assert not [c for c in nft.sandbox_chains() if c.endswith(tag)]
    assert not testing.wait_for_no_leftovers(os.environ["SANDPOOL_STATE_DIR"], timeout=5).links


def address(sb) -> str:
    """The sandbox's eth0 address."""
    return sb.exec(["sh", "-c", "ip -4 -o addr show eth0"]).result().stdout.split()[3].split("/")[0]


@pytest.fixture
def session():
    """A session of namespaces sandboxes."""
    with Session(defaults={"isolation": "namespaces"}) as s:
        yield s
