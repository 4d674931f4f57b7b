"""Several containers per sandbox through the local cwsandbox server, driven by the published client."""

from __future__ import annotations

from test_cwsandbox_client import cwsandbox_client, run, server  # noqa: F401  (the client's fixtures and runner)


def test_a_pod_through_the_published_client(server):  # noqa: F811
    """cwsandbox's containers=[...]: the containers share localhost, keep their own files and
    environment, answer exec and files by container=, report a status row each; all stop together."""
    out = run(server, """
        import cwsandbox
        from cwsandbox import Container, ResourceOptions, SandboxStatus

        res = ResourceOptions(limits={"cpu": "1", "memory": "256Mi"})
        serve = ("import socket\\ns = socket.create_server(('127.0.0.1', 8125))\\n"
                 "while True:\\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()\\n")
        with cwsandbox.Session() as session:
            sb = session.sandbox(containers=[
                Container(name="web", image="python:3.11", primary=True, command="python3", args=["-c", serve],
                          resources=res, environment_variables={"ROLE": "web"}),
                Container(name="cli", image="python:3.11", resources=res, environment_variables={"ROLE": "cli"}),
            ])
            fetch = ("import socket, time\\n"
                     "for _ in range(100):\\n"
                     "    try: print(socket.create_connection(('127.0.0.1', 8125)).recv(2).decode()); break\\n"
                     "    except OSError: time.sleep(0.05)\\n")
            got = sb.exec(["python3", "-c", fetch], container="cli").result()
            assert got.stdout == "hi\\n", (got.stdout, got.stderr)
            assert sb.exec(["sh", "-c", "echo $ROLE"], container="cli").result().stdout == "cli\\n"
            assert sb.exec(["sh", "-c", "echo $ROLE"]).result().stdout == "web\\n"
            sb.write_file("/tmp/f", b"cli's", container="cli").result()
            assert sb.read_file("/tmp/f", container="cli").result() == b"cli's"
            assert sb.exec(["sh", "-c", "cat /tmp/f || echo absent"]).result().stdout == "absent\\n"
            try:
                sb.exec(["true"], container="db").result()
            except Exception as exc:
                assert "'web', 'cli'" in str(exc), exc
            else:
                raise AssertionError("container='db' was accepted")
            names = sorted(row.name for row in sb.container_statuses)
            assert names == ["cli", "web"], sb.container_statuses
        assert sb.status == SandboxStatus.TERMINATED, sb.status
        print("OK")
    """)
    assert out == "OK\n"
