"""A pod (several containers per sandbox) on a sandpool server: the client asks, the server joins
each further container to the primary's network namespace (Create's ``pod``)."""

from __future__ import annotations

import pytest
from service_helpers import ServerProcess

from sandpool import Container, Sandbox, SandboxStatus, Session
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")
WEB = Container(name="web", image="host", primary=True, command="python3",
                args=["-c", "import socket; s = socket.create_server(('127.0.0.1', 8126)); print('web up', flush=True); "
                            "c, _ = s.accept(); c.sendall(b'hi'); c.close(); s.accept()"])
CLI = Container(name="cli", image="host", command="sh", args=["-c", "echo cli up; exec sleep 300"])


def test_a_pod_on_a_sandpool_server(tmp_path):
    """Through Session(address=): the containers share localhost but not files; exec, files and logs
    take container=; the server lists the pod once; stopping it ends both containers."""
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        sb = s.sandbox(containers=[WEB, CLI])
        assert next(iter(sb.stream_logs(follow=True))) == "web up\n"
        assert next(iter(sb.stream_logs(container="cli", follow=True))) == "cli up\n"
        fetch = "import socket; print(socket.create_connection(('127.0.0.1', 8126)).recv(2).decode())"
        assert sb.exec(["python3", "-c", fetch], container="cli").result(timeout=60).stdout == "hi\n"
        sb.write_file("/tmp/who", b"cli", container="cli").result()
        sb.write_file("/tmp/who", b"web").result()
        assert sb.read_file("/tmp/who", container="cli").result() == b"cli"
        assert sb.read_file("/tmp/who").result() == b"web"
        assert [found.sandbox_id for found in Sandbox.list(address=srv.address).result()] == [sb.sandbox_id]
        assert [c.name for c in sb.container_statuses] == ["web", "cli"]
        sb.stop().result(timeout=60)
        assert [c.state for c in sb.container_statuses] == [SandboxStatus.TERMINATED] * 2
