"""The bridge network at the oci level: crun joins the namespace the client made, so an oci sandbox
gets the same interface, exposed ports, refusals and cleanup as a namespaces one.

Traffic goes only to loopback and to sandboxes' addresses; every request is one bounded connect.
"""

import ipaddress

import pytest

from sandpool import Session
from sandpool._isolation import network, probe

from network_helpers import NEEDS_BRIDGE, address, assert_chains_and_veth_go_with, connect, host_connect, serve

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
    assert host_connect(url.removeprefix("tcp://")) == b"from-sandbox:host"
    other = oci.sandbox(network="bridge")
    assert connect(other, address(server), 8000) == "refused"


def test_an_oci_bridge_sandboxs_chains_and_veth_go_with_it(oci):
    assert_chains_and_veth_go_with(oci.sandbox(network="bridge"))
