"""Networks and services through ``sandpool serve --cwsandbox``, driven by the published cwsandbox
client: ``services=[Service(...)]`` and ``network=NetworkOptions(...)`` reach sandpool's bridge
network, and the sandbox's ``service_urls``/``exposed_ports`` the client reads point where the host
reaches the service (the server host's loopback; here this host's). Traffic only to loopback and to
the sandboxes' own addresses."""

from __future__ import annotations

import pytest

from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)
from test_cwsandbox_state import listener, run_program  # noqa: F401 (listener: a fixture)
from network_helpers import CONNECT, NEEDS_BRIDGE, SERVE

pytestmark = NEEDS_BRIDGE


def test_public_and_private_services_and_an_ingress_rule(cwsandbox_client, listener, tmp_path):  # noqa: F811
    """A public service is reached from the host at its service_urls entry, a private one from a
    neighbour sandbox (and not its public port); an ingress rule's port is reached from the host and
    refused to a neighbour; a selector rule fails the create naming the rule."""
    out = run_program(listener, f"""
        import socket
        from cwsandbox import NetworkOptions, Sandbox, SandboxError, Service

        SERVE, CONNECT = {SERVE!r}, {CONNECT!r}

        def serve(sb, port):
            proc = sb.exec(["python3", "-c", SERVE, str(port)])
            assert next(iter(proc.stdout)).strip() == "ready"

        def address(sb):
            return sb.exec(["sh", "-c", "ip -4 -o addr show eth0"]).result().stdout.split()[3].split("/")[0]

        def connect(sb, host, port):
            return sb.exec(["python3", "-c", CONNECT, host, str(port)]).result().stdout.strip()

        def host_connect(hostport):
            host, port = hostport.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as c:
                c.sendall(b"host")
                return c.recv(100)

        services = [Service(port=8300, name="web", visibility="public", endpoint={{"kind": "https", "auth": "open"}}),
                    Service(port=8301, name="db", visibility="private")]
        with Sandbox.run(services=services) as sb, Sandbox.run(network=NetworkOptions(
                ingress=[{{"tenant": "same_user", "ports": [{{"port": 9999}}]}}])) as neighbour:
            serve(sb, 8300)
            serve(sb, 8301)
            sb.get_status()
            assert sb.exposed_ports == ((8300, "web"), (8301, "db")), sb.exposed_ports
            urls = {{name: url for _port, name, url in sb.service_urls}}
            assert urls["web"].startswith("http://127.0.0.1:"), urls
            assert [e.url for e in sb.service_endpoints] == [urls["web"]], sb.service_endpoints
            assert urls["db"] == f"tcp://{{address(sb)}}:8301", urls
            assert host_connect(urls["web"].removeprefix("http://")) == b"from-sandbox:host"
            assert connect(neighbour, address(sb), 8301) == "ok from-sandbox:ping"
            assert connect(neighbour, address(sb), 8300) == "refused"
        ruled = NetworkOptions(ingress=[{{"cidr": "192.0.2.99/32", "ports": [{{"port": 8302}}]}}])
        with Sandbox.run(network=ruled) as sb, Sandbox.run(network=NetworkOptions(
                ingress=[{{"tenant": "same_user", "ports": [{{"port": 9999}}]}}])) as neighbour:
            serve(sb, 8302)
            assert connect(neighbour, address(sb), 8302) == "refused"
            assert sb.exec(["echo", "still serving"]).result().stdout == "still serving\\n"
        try:
            Sandbox.run(network=NetworkOptions(egress=[{{"selector": {{"pod_labels": {{"app": "x"}}}}}}])).wait()
        except SandboxError as exc:
            assert "selector" in str(exc), exc
        else:
            raise AssertionError("a selector rule was accepted")
        print("OK")
    """, tmp_path)
    assert out.strip().endswith("OK")
