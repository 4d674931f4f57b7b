"""Several containers per sandbox (a pod) through cwsandbox's API, driven by the published client:
the standalone server (``python -m sandpool._cwsandbox``) and ``sandpool serve --cwsandbox``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import leaks
from service_helpers import REPO, ServerProcess, wait_until
from test_cwsandbox_client import Server, cwsandbox_client, run, server  # noqa: F401  (the client's fixtures and runner)
from test_cwsandbox_serve import _free_port

from sandpool import Sandbox, _templates
from sandpool._config import resolve_spec
from sandpool._grpc import endpoint

#: A pod of two containers: "web" serves on 127.0.0.1:8125 and says so in its log, "cli" only logs.
#: Checks, with the published client: they share localhost, keep their own files and environment,
#: answer exec, files and logs by container=, report a status row each, and stop together; an
#: unknown container is refused naming the pod's containers.
POD_PROGRAM = """
import cwsandbox
from cwsandbox import Container, ResourceOptions, SandboxStatus

res = ResourceOptions(limits={"cpu": "1", "memory": "256Mi"})
serve = ("import socket\\ns = socket.create_server(('127.0.0.1', 8125))\\nprint('web up', flush=True)\\n"
         "while True:\\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()\\n")
with cwsandbox.Session() as session:
    sb = session.sandbox(containers=[
        Container(name="web", image="python:3.11", primary=True, command="python3", args=["-c", serve],
                  resources=res, environment_variables={"ROLE": "web"}),
        Container(name="cli", image="python:3.11", command="sh", args=["-c", "echo cli up; exec sleep 300"],
                  resources=res, environment_variables={"ROLE": "cli"}),
    ])
    assert next(iter(sb.stream_logs(follow=True))) == "web up\\n"  # listening now
    assert next(iter(sb.stream_logs(container="cli", follow=True))) == "cli up\\n"
    fetch = "import socket; print(socket.create_connection(('127.0.0.1', 8125)).recv(2).decode())"
    got = sb.exec(["python3", "-c", fetch], container="cli").result()
    assert got.stdout == "hi\\n", (got.stdout, got.stderr)
    assert sb.exec(["sh", "-c", "echo $ROLE"], container="cli").result().stdout == "cli\\n"
    assert sb.exec(["sh", "-c", "echo $ROLE"]).result().stdout == "web\\n"
    net = "readlink /proc/self/ns/net"
    assert sb.exec(["sh", "-c", net]).result().stdout == sb.exec(["sh", "-c", net], container="cli").result().stdout
    sb.write_file("/tmp/f", b"cli's", container="cli").result()
    assert sb.read_file("/tmp/f", container="cli").result() == b"cli's"
    assert sb.exec(["sh", "-c", "cat /tmp/f || echo absent"]).result().stdout == "absent\\n"
    for bad in (lambda: sb.exec(["true"], container="db").result(),
                lambda: list(sb.stream_logs(container="db"))):
        try:
            bad()
        except Exception as exc:
            assert "'web', 'cli'" in str(exc), exc
        else:
            raise AssertionError("container='db' was accepted")
    names = sorted(row.name for row in sb.container_statuses)
    assert names == ["cli", "web"], sb.container_statuses
    print(sb.sandbox_id)
assert sb.status == SandboxStatus.TERMINATED, sb.status
print("OK")
"""


def test_a_pod_through_the_published_client(server):  # noqa: F811
    """The standalone server runs cwsandbox's containers=[...] as a pod (see POD_PROGRAM)."""
    assert run(server, POD_PROGRAM).splitlines()[-1] == "OK"


def test_a_pod_through_sandpool_serve(cwsandbox_client, tmp_path, monkeypatch):  # noqa: F811
    """``sandpool serve --cwsandbox`` runs the pod on the server's own fleet (its further container
    joined to the primary's network by the server); sandpool's List shows the pod once, not its containers."""
    port = _free_port()
    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")  # python:3.11: no registry here
    with ServerProcess(str(tmp_path), "--cwsandbox", f"127.0.0.1:{port}") as served:
        api_key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        assert api_key, "the cwsandbox listener wrote no token"
        program = POD_PROGRAM.replace('    print(sb.sandbox_id)\n', LISTED.format(address=served.address))
        path = tmp_path / "program.py"
        path.write_text(program)
        env = {"CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": api_key, "GRPC_VERBOSITY": "ERROR"}
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=90, cwd=REPO,
                              env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "OK"


#: In POD_PROGRAM, run against ``sandpool serve``: sandpool's own client lists the pod, once.
LISTED = """    import sandpool
    listed = [s.sandbox_id for s in sandpool.Sandbox.list(address={address!r}).result()]
    assert listed == [sb.sandbox_id], (listed, sb.sandbox_id)
"""


COMPOSE = b"""{"services": {
  "app": {"image": "python:3.11", "command": "sleep 300", "environment": {"ROLE": "app"}},
  "db": {"image": "python:3.11", "command": ["sh", "-c", "exec sleep 300"], "environment": ["ROLE=db"],
         "deploy": {"resources": {"limits": {"memory": "64M"}}}}}}"""


def test_compose_files_and_templates_through_the_published_client(cwsandbox_client, tmp_path, monkeypatch):  # noqa: F811
    """The client's run_from_file (CreateSandboxFromFile) runs the file's services as a pod and
    GetSandbox reports the translated spec; run_from_template and session.sandbox(template_id=)
    (CreateSandboxFromTemplate) start a template stored on the server's machine, the request's
    overrides replacing its fields; a template that does not exist, and a file key the spec cannot
    carry, are refused naming them."""
    monkeypatch.setenv(_templates.ENV_TEMPLATE_DIR, str(tmp_path / "templates"))  # the server's store, and ours
    _templates.save("pair", {"containers": [
        {"name": "one", "image": "host", "primary": True, "command": "sleep", "args": ["300"],
         "environment_variables": {"WHO": "one"}},
        {"name": "two", "image": "host", "environment_variables": {"WHO": "two"}}], "tags": ["tpl"]}, resolve_spec)
    server = Server(tmp_path)
    try:
        out = run(server, PROGRAM_FROM_FILES)
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.stderr_path.read_text()
    assert out.splitlines()[-1] == "OK"


PROGRAM_FROM_FILES = f"""
        import cwsandbox
        compose = {COMPOSE!r}
        with cwsandbox.Sandbox.run_from_file(compose, primary_service="app", tags=["from-file"]) as sb:
            assert sb.exec(["sh", "-c", "echo $ROLE"]).result().stdout == "app\\n"
            assert sb.exec(["sh", "-c", "echo $ROLE"], container="db").result().stdout == "db\\n"
            again = cwsandbox.Sandbox.from_id(sb.sandbox_id).result()
            assert sorted(c.name for c in again.container_statuses) == ["app", "db"], again.container_statuses
        with cwsandbox.Sandbox.run_from_template("pair", tags=["given"]) as sb:
            assert sb.exec(["sh", "-c", "echo $WHO"], container="two").result().stdout == "two\\n"
            assert sb.exec(["sh", "-c", "echo $WHO"]).result().stdout == "one\\n"
        with cwsandbox.Session() as session:
            sb = session.sandbox(template_id="pair")
            assert sb.exec(["sh", "-c", "echo $WHO"], container="two").result().stdout == "two\\n"
        for bad, text in ((lambda: cwsandbox.Sandbox.run_from_template("no-such").wait(), "no such template"),
                          (lambda: cwsandbox.Sandbox.run_from_file(compose.replace(b'"64M"', b'"64M", "pids": 9'),
                                                                   primary_service="app").wait(), "pids")):
            try:
                bad()
            except Exception as exc:
                assert text in str(exc), exc
            else:
                raise AssertionError(text)
        print("OK")
    """


KILLED_CLIENT = """
import cwsandbox
from cwsandbox import Container, ResourceOptions
res = ResourceOptions(limits={"cpu": "1", "memory": "128Mi"})
sb = cwsandbox.Sandbox.run(containers=[Container(name="a", image="python:3.11", primary=True, resources=res),
                                       Container(name="b", image="python:3.11", resources=res)])
assert sb.exec(["true"], container="b").result().returncode == 0
print(sb.sandbox_id, flush=True)
print("ready", flush=True)
import time; time.sleep(300)
"""


def test_sigkills_of_the_client_then_the_server_leave_nothing_of_a_pod(cwsandbox_client, tmp_path, monkeypatch):  # noqa: F811
    """SIGKILL a published-client program with a running pod: the pod lives on in ``sandpool serve
    --cwsandbox`` (cwsandbox's sandboxes outlive their client) and is listed once; SIGKILL that
    server too: no process, cgroup, mount, network namespace or directory of either container is
    left."""
    port = _free_port()
    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")
    served = ServerProcess(str(tmp_path), "--cwsandbox", f"127.0.0.1:{port}").start()
    try:
        api_key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT], stdout=subprocess.PIPE, text=True, cwd=REPO,
                                  env={**os.environ, "CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}",
                                       "CWSANDBOX_API_KEY": api_key, "GRPC_VERBOSITY": "ERROR"})
        try:
            sandbox_id = client.stdout.readline().strip()
            assert client.stdout.readline().strip() == "ready", sandbox_id
        finally:
            client.kill()
            client.wait()
            client.stdout.close()
        assert client.returncode == -signal.SIGKILL
        listed = [s.sandbox_id for s in Sandbox.list(address=served.address).result()]
        assert listed == [sandbox_id]
    finally:
        served.kill()
    assert served.proc.returncode == -signal.SIGKILL
    leaks.check("a SIGKILLed sandpool serve with a pod")
