"""Attacks on the bridge network's boundary. Each asserts the attack was refused AND that the
sandbox, and its neighbours, still work. Traffic goes only to loopback and sandpool's own addresses.
"""

import socket
import subprocess
import textwrap
import threading

import pytest
from network_helpers import NEEDS_BRIDGE, connect

from sandpool import Session
from sandpool._isolation import network, nft, probe

pytestmark = [NEEDS_BRIDGE, pytest.mark.needs_root("the bridge network's veths and nftables rules need root; "
                                                "rootless sandboxes get plain egress only (slirp4netns)")]


@pytest.fixture(params=["namespaces", pytest.param("oci", marks=pytest.mark.skipif(
    probe.unavailable("oci") is not None, reason=f"oci level unavailable: {probe.unavailable('oci')}"))])
def session(request):
    """A session of bridge-capable sandboxes at each level that has the bridge (crun joins the
    namespace the client made, so the oci level must hold the same boundary)."""
    with Session(defaults={"isolation": request.param}) as s:
        yield s


def sh(sb, script: str):
    return sb.exec(["sh", "-c", script]).result()


def gateway(sb) -> str:
    return sh(sb, "ip route show default").stdout.split("via ")[1].split()[0]


class HostServer:
    """A TCP server of the host bound to ``address`` (a bounded number of connections)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((address, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(8):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"from-host:" + conn.recv(100))

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone would not)
        self.sock.close()
        self.thread.join(5)


def test_a_sandbox_cannot_change_nft_rules_or_its_own_address(session):
    """nft flush ruleset, deleting sandpool's table, adding an address or a route: all fail (no
    CAP_NET_ADMIN); sandpool's chains are unchanged and the sandbox's network still works."""
    sb = session.sandbox(network="bridge")
    sb.wait()
    before = subprocess.run(["nft", "list", "table", "inet", "sandpool"], capture_output=True, text=True).stdout
    for attack in ("nft flush ruleset", "nft delete table inet sandpool", "nft add table inet evil",
                   "ip addr add 10.213.0.2/30 dev eth0", "ip link set eth0 down", "ip route del default",
                   "ip link add evil type dummy"):
        result = sh(sb, attack)
        assert result.returncode != 0, attack
    after = subprocess.run(["nft", "list", "table", "inet", "sandpool"], capture_output=True, text=True).stdout
    assert after == before
    assert "inet evil" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "default via" in sh(sb, "ip route").stdout and sh(sb, "echo alive").stdout == "alive\n"


def test_the_hosts_services_are_refused_unless_a_rule_names_them(session):
    """A server of the host bound to a sandbox's gateway (the host's own address) and one on the
    host's loopback: a bridge sandbox reaches neither; one whose egress rule names sandpool's range
    and the port reaches the first, and the first sandbox still works afterwards."""
    sb = session.sandbox(network="bridge")
    gw = gateway(sb)
    on_gateway, on_loopback = HostServer(gw), HostServer("127.0.0.1")
    try:
        assert connect(sb, gw, on_gateway.port) == "refused"
        assert connect(sb, "127.0.0.1", on_loopback.port) == "refused"  # its own loopback, not the host's
        assert connect(sb, gw, on_loopback.port) == "refused"
        rule = {"egress": [{"cidr": str(network.sandbox_range()), "ports": [{"port": on_gateway.port}]}]}
        allowed = session.sandbox(network=rule)
        assert connect(allowed, gw, on_gateway.port) == "ok from-host:ping"
        assert sh(sb, "echo alive").stdout == "alive\n"
    finally:
        on_gateway.close()
        on_loopback.close()


def test_a_neighbour_cannot_reach_a_sandbox_server_nor_its_host_port(session):
    """A second sandbox scans the first's ports and the host port its server is mapped to: every
    connect is refused; the host still reaches the server through the mapped port."""
    server = session.sandbox(network={"ingress": [{"cidr": "192.0.2.99/32", "ports": [{"port": 8080}]}]})
    proc = server.exec(["python3", "-c", textwrap.dedent("""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8080)); s.listen(); print("ready", flush=True)
        while True:
            c, _ = s.accept(); c.sendall(b"served"); c.close()
    """)])
    assert next(iter(proc.stdout)).strip() == "ready"
    addr = sh(server, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
    host_port = int(server.service_urls[0][2].rsplit(":", 1)[1])
    attacker = session.sandbox(network="bridge")
    for host, port in ((addr, 8080), (addr, 22), (gateway(attacker), host_port), ("127.0.0.1", host_port)):
        assert connect(attacker, host, port) == "refused", (host, port)
    with socket.create_connection(("127.0.0.1", host_port), timeout=5) as c:
        c.settimeout(5)
        assert c.recv(100) == b"served"
    assert sh(attacker, "echo alive").stdout == "alive\n"


def test_a_sandbox_cannot_spoof_another_sandboxes_address(session):
    """Raw sockets are not allowed (no CAP_NET_RAW), so a sandbox cannot forge a neighbour's source
    address; its chains stay its own (three per sandbox, each keyed by its own interface)."""
    sb = session.sandbox(network="bridge")
    result = sb.exec(["python3", "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 6)"]).result()
    assert result.returncode != 0 and "PermissionError" in result.stderr
    assert len([c for c in nft.sandbox_chains() if c.endswith(sb.sandbox_id)]) == 3
    assert sh(sb, "echo alive").stdout == "alive\n"
