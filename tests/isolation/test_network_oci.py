"""The bridge network at the oci level: crun joins the namespace the client made, so an oci sandbox
gets the same interface, exposed ports, refusals and cleanup as a namespaces one.

Traffic goes only to loopback and to sandboxes' addresses; every request is one bounded connect.
"""

import ipaddress
import os
import socket

import pytest

from sandpool import Session, testing
from sandpool._isolation import network, nft, probe

from network_helpers import NEEDS_BRIDGE, address, connect, serve

pytestmark = [NEEDS_BRIDGE, pytest.mark.skipif(probe.unavailable("oci") is not None,
                                               reason=f"oci level unavailable: {probe.unavailable('oci')}")]


@pytest.fixture
def oci():
    with Session(defaults={"isolation": "oci"}) as s:
        yield s


def test_an_oci_bridge_sandbox_has_its_own_interface_and_route(oci):
    sb = oci.sandbox(network="bridge")
    out = sb.exec(["sh", "-c", "ls /sys/class/net; ip route show default"]).result().stdout
    assert out.split()[:2] == ["eth0", "lo"]
    mine = ipaddress.IPv4Address(address(sb))
    assert mine in network.sandbox_range()
    assert ipaddress.IPv4Address(out.split("default via ")[1].split()[0]) == mine - 1
    assert sb.isolation == "oci"


def test_an_oci_sandboxs_exposed_port_serves_the_host_and_refuses_another_sandbox(oci):
    server = oci.sandbox(network={"ingress": [{"cidr": "192.0.2.99/32", "ports": [{"port": 8000}]}]})
    serve(server, 8000)
    [(_, _, url)] = server.service_urls
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.settimeout(5)
        c.sendall(b"host")
        assert c.recv(100) == b"from-sandbox:host"
    other = oci.sandbox(network="bridge")
    assert connect(other, address(server), 8000) == "refused"


def test_an_oci_bridge_sandboxs_chains_and_veth_go_with_it(oci):
    sb = oci.sandbox(network="bridge")
    sb.wait()
    tag = f"-{sb.sandbox_id}"
    assert len([c for c in nft.sandbox_chains() if c.endswith(tag)]) == 3
    sb.stop().result()
    assert not [c for c in nft.sandbox_chains() if c.endswith(tag)]
    assert not testing.wait_for_no_leftovers(os.environ["SANDPOOL_STATE_DIR"], timeout=5).links
