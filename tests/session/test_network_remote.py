"""The bridge network of a sandpool server's sandboxes (the remote runtime): ``network=NetworkOptions``
and ``services=`` travel to ``sandpool serve``, and what the server's sandbox reports of its network
(``exposed_ports``, ``service_urls``, ``service_endpoints``) comes back to the client's handle. The
mapped ports are on the server host's loopback (here: this host's)."""

from __future__ import annotations

import socket

import pytest

from sandpool import NetworkOptions, Service, Session

from network_helpers import NEEDS_BRIDGE, address, connect, serve
from service_helpers import ServerProcess

pytestmark = NEEDS_BRIDGE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(str(tmp_path_factory.mktemp("serve-net"))) as srv:
        yield srv


def _host_connect(hostport: str) -> bytes:
    host, port = hostport.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.sendall(b"host")
        return c.recv(100)


def test_services_and_exposed_ports_of_a_server_sandbox(server):
    """A public service of a server's sandbox is reached from the host through its mapped port, as the
    client's handle reports it; a private one is reachable from the server's other sandboxes only at
    the sandbox's address; an ingress rule's port is mapped too."""
    with Session(address=server.address) as s:
        sb = s.sandbox(services=[Service(port=8200, name="web", visibility="public", endpoint={"kind": "https"}),
                                 Service(port=8201, name="db", visibility="private")])
        serve(sb, 8200)
        serve(sb, 8201)
        assert sb.exposed_ports == ((8200, "web"), (8201, "db"))
        urls = {name: url for _port, name, url in sb.service_urls}
        assert urls["web"].startswith("http://127.0.0.1:") and sb.service_endpoints[0].url == urls["web"]
        assert sb.service_endpoints[0].kind.value == "https"
        assert urls["db"] == f"tcp://{address(sb)}:8201"
        assert _host_connect(urls["web"].removeprefix("http://")) == b"from-sandbox:host"
        neighbour = s.sandbox(network="bridge")
        assert connect(neighbour, address(sb), 8201) == "ok from-sandbox:ping"
        assert connect(neighbour, address(sb), 8200) == "refused"
        ruled = s.sandbox(network=NetworkOptions(ingress=[{"cidr": "192.0.2.99/32", "ports": [{"port": 8202}]}]))
        serve(ruled, 8202)
        [(port, name, url)] = ruled.service_urls
        assert (port, name) == (8202, "") and ruled.exposed_ports == ((8202, ""),)
        assert _host_connect(url.removeprefix("tcp://")) == b"from-sandbox:host"
        assert connect(neighbour, address(ruled), 8202) == "refused"
        plain = s.sandbox()
        assert plain.exposed_ports == () and plain.service_urls == ()
        assert plain.exec(["echo", "still serving"]).result().stdout == "still serving\n"


def test_a_network_report_that_is_not_one_is_a_protocol_error():
    """The client checks the server's network report: round trip, and a malformed one is refused."""
    from sandpool import ProtocolError
    from sandpool._grpc import messages as m
    from sandpool._isolation.network import policy
    from sandpool._services import surfaces

    report = surfaces(policy(None, [{"port": 80, "name": "w", "visibility": "public",
                                      "endpoint": {"kind": "https"}}]).services, {80: "127.0.0.1:4000"}, "10.0.0.2")
    assert m.network_report_from(m.network_report(report)) == {**report, "dns_egress_names": ()}
    assert m.network_report({}) is None and m.network_report_from(None) == {}
    for bad in ([], {"exposed_ports": [[80]]}):
        with pytest.raises(ProtocolError, match="network"):
            m.network_report_from(bad)
