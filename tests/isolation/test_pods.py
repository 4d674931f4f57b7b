"""Several containers in one sandbox (a pod): one network namespace, everything else per container."""

import json
import os
import signal

import pytest
from network_helpers import NEEDS_BRIDGE, SERVE
from proc_helpers import sigkill_when_ready
from test_network import host_connect

from sandpool import Container, Sandbox, SandboxDiedError, SandboxNotRunningError, SandboxStatus, Session, testing
from sandpool.__main__ import main as cli
from _sandpool_agent.confine import cgroups
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")
LAYOUT = cgroups.detect()
#: The primary serves HTTP on localhost only; its log's first line says it listens (``listening``).
SERVER = Container(name="web", image="host", primary=True, command="python3",
                   args=["-c", "import http.server; s = http.server.HTTPServer(('127.0.0.1', 8123), "
                               "http.server.SimpleHTTPRequestHandler); print('web up', flush=True); s.serve_forever()"])
CLIENT = Container(name="cli", image="host", command="sh", args=["-c", "echo cli up; exec sleep 300"],
                   resources={"limits": {"memory": "96Mi"}})
FETCH = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8123/', timeout=5).status)"


def listening(sb) -> None:
    """Wait until SERVER in ``sb`` listens (its first log line)."""
    assert next(iter(sb.stream_logs(follow=True))) == "web up\n"


@pytest.fixture
def session():
    with Session(defaults={"isolation": "namespaces"}) as s:
        yield s


def sh(sb, script: str, container: str | None = None) -> str:
    return sb.exec(["sh", "-c", script], container=container).result(timeout=60).stdout


def test_containers_share_localhost_but_not_files_processes_or_logs(session):
    """The second container reaches the primary's server on 127.0.0.1; each has its own files,
    processes (pid namespace), hostname and main log; both are in one network namespace."""
    sb = session.sandbox(containers=[SERVER, CLIENT])
    listening(sb)
    assert sb.exec(["python3", "-c", FETCH], container="cli").result(timeout=60).stdout.strip() == "200"
    sb.write_file("/tmp/who", b"primary").result()
    sb.write_file("/tmp/who", b"cli", container="cli").result()
    sh(sb, "echo only-in-cli > /root/mark", container="cli")
    assert sb.read_file("/tmp/who").result() == b"primary"
    assert sb.read_file("/tmp/who", container="cli").result() == b"cli"
    assert sh(sb, "test -e /root/mark && echo yes || echo no") == "no\n"
    assert sh(sb, "readlink /proc/self/ns/net") == sh(sb, "readlink /proc/self/ns/net", container="cli")
    assert sh(sb, "readlink /proc/self/ns/mnt") != sh(sb, "readlink /proc/self/ns/mnt", container="cli")
    assert "python3" not in sh(sb, "cat /proc/[0-9]*/comm", container="cli")  # the server is not visible
    assert sh(sb, "hostname") != sh(sb, "hostname", container="cli")
    assert next(iter(sb.stream_logs())) == "web up\n"
    assert next(iter(sb.stream_logs(container="cli", follow=True))) == "cli up\n"
    assert [c.name for c in sb.container_statuses] == ["web", "cli"]
    assert [c.name for c in sb.containers] == ["web", "cli"] and sb.containers[0].primary


def test_each_container_has_its_own_limits_and_all_stop_with_the_pod(session):
    """The second container's memory limit is in its own cgroup, not the primary's; stopping the pod
    stops every container (the leak check then finds nothing)."""
    sb = session.sandbox(containers=[SERVER, CLIENT], resources=None)
    sb.wait()
    member = sb._in("cli")
    home = LAYOUT.home("memory")
    limit_file = "memory.max" if home == LAYOUT.v2 else "memory.limit_in_bytes"

    def limit(box) -> int | None:
        memory = [d for d in box._record.extra["cgroups"]["dirs"] if d.startswith(home + "/")]
        if not memory:
            return None  # no memory limit, no v1 memory cgroup of its own (cgroups.skips_memory)
        with open(os.path.join(memory[0], limit_file)) as f:
            return int(f.read().strip().replace("max", str(1 << 62)))

    assert limit(member) == 96 << 20 and limit(sb) != 96 << 20
    sb.stop().result(timeout=60)
    assert sb.status == SandboxStatus.TERMINATED and member.status == SandboxStatus.TERMINATED


def test_the_pod_ends_when_its_primary_command_ends(session):
    """The primary owns the pod's lifecycle: when its main command exits, the others are stopped."""
    waits = ("import socket; s = socket.create_server(('127.0.0.1', 8124)); print('up', flush=True); "
             "s.accept()")  # ends once 'side' connects
    sb = session.sandbox(containers=[Container(name="job", image="host", primary=True, command="python3",
                                               args=["-c", waits]),
                                     Container(name="side", image="host")])
    assert next(iter(sb.stream_logs(follow=True))) == "up\n"
    probe = sb.exec(["python3", "-c", "import socket; socket.create_connection(('127.0.0.1', 8124))"],
                    container="side")
    sb.wait_until_complete(timeout=60).result()
    try:  # the connection ends the primary, and the pod stops 'side' at once: its exec's own end
        assert probe.result(timeout=60).returncode == 0  # may or may not be reported before that
    except SandboxNotRunningError:
        pass
    member = sb._in("side")
    member.wait_until_complete(timeout=30, raise_on_termination=False).result()
    assert sb.status == SandboxStatus.COMPLETED and member.status == SandboxStatus.TERMINATED


KILLED_CLIENT = """
import sys, time, sandpool
from sandpool import Container
with sandpool.Session(defaults={"isolation": "namespaces"}) as s:
    sb = s.sandbox(containers=[Container(name="a", image="host", primary=True), Container(name="b", image="host")],
                   network=%r)
    sb.exec(["true"], container="b").result()
    print("ready", flush=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("network", [None, pytest.param(
    {"ingress": [{"cidr": "192.0.2.99/32", "ports": [{"port": 8000}]}]}, marks=NEEDS_BRIDGE, id="bridge")])
def test_a_sigkilled_client_leaves_nothing_of_a_pod(tmp_path, network):
    """SIGKILL a client with a running pod: no process, cgroup, mount or directory of any container
    is left, and with a bridge network no veth, network namespace or nftables chain either."""
    state_dir = str(tmp_path / "state")
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir}
    assert sigkill_when_ready(KILLED_CLIENT % (network,), env) == -signal.SIGKILL
    assert not testing.wait_for_no_leftovers(state_dir, timeout=10)


COMPOSE = {"services": {
    "app": {"image": "host", "command": "sleep 300", "environment": {"ROLE": "app"}},
    "db": {"image": "host", "command": ["sh", "-c", "exec sleep 300"], "environment": ["ROLE=db"],
           "deploy": {"resources": {"limits": {"memory": "64M"}}}},
}}


def test_run_from_file_and_templates_round_trip(session, tmp_path, monkeypatch):
    """A compose-style file (JSON, and TOML) runs as a pod; saved as a template with the CLI it
    starts again by template_id and run_from_template; ls and rm manage it."""
    monkeypatch.setenv("SANDPOOL_TEMPLATE_DIR", str(tmp_path / "templates"))
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(COMPOSE))
    with Sandbox.run_from_file(str(path), primary_service="app", isolation="namespaces") as sb:
        assert sh(sb, "echo $ROLE") == "app\n" and sh(sb, "echo $ROLE", container="db") == "db\n"
    toml = b'[services.app]\nimage = "host"\n[services.side]\nimage = "host"\nenvironment = {ROLE = "side"}\n'
    with Sandbox.run_from_file(toml, primary_service="app", isolation="namespaces") as sb:
        assert sh(sb, "echo $ROLE", container="side") == "side\n"
    assert cli(["templates", "save", "two", str(path), "--primary-service", "db"]) == 0
    listed = [t for t in _templates_listing() if t["name"] == "two"]
    assert listed and listed[0]["containers"] == ["app", "db"]
    sb = session.sandbox(template_id="two")
    assert sh(sb, "echo $ROLE") == "db\n" and sh(sb, "echo $ROLE", container="app") == "app\n"
    with Sandbox.run_from_template("two", isolation="namespaces") as again:
        assert [c.name for c in again.container_statuses] == ["db", "app"]
    assert cli(["templates", "rm", "two"]) == 0 and cli(["templates", "rm", "two"]) == 1
    options = tmp_path / "one.json"
    options.write_text(json.dumps({"environment_variables": {"ROLE": "stored", "KEEP": "k"}, "tags": ["tpl"]}))
    assert cli(["templates", "save", "one", str(options)]) == 0
    sb = session.sandbox(template_id="one", environment_variables={"ROLE": "given"})
    assert sh(sb, "echo $ROLE $KEEP") == "given\n" and sb.tags == ("tpl",)  # an option given replaces the template's


def test_one_named_container_is_a_plain_sandbox_under_its_name(session):
    """containers= with one container: the sandbox runs it, and its name (or None) targets it."""
    sb = session.sandbox(containers=[Container(name="solo", image="host", environment_variables={"X": "1"})])
    assert sh(sb, "echo $X", container="solo") == "1\n" == sh(sb, "echo $X")
    assert [c.name for c in sb.container_statuses] == ["solo"]


def _templates_listing() -> list[dict]:
    from sandpool import _templates

    return _templates.listing()


@pytest.mark.parametrize(("options", "match"), [
    ({"containers": [Container(name="a", image="host", primary=True), Container(name="a", image="host")]},
     "duplicate container name 'a'"),
    ({"containers": [Container(name="a", image="host"), Container(name="b", image="host")]},
     "exactly one primary=True"),
    ({"containers": [Container(name="a", image="host", primary=True), Container(image="host")]},
     r"containers\[1\] has no name"),
    ({"containers": [Container(name="a", image="host", primary=True)], "command": "true"},
     "command= cannot be combined with containers="),
    ({"containers": [{"name": "a", "image": "host", "imag": "x"}]}, "unknown key 'imag'"),
    ({"template_id": "no-such-template"}, "no such template"),
])
def test_bad_pod_specs_are_refused_naming_the_field(options, match, tmp_path, monkeypatch):
    """Bad containers or template options: ValueError/TypeError naming the field and the fix, at once."""
    monkeypatch.setenv("SANDPOOL_TEMPLATE_DIR", str(tmp_path))
    with Session() as s, pytest.raises((ValueError, TypeError), match=match):
        s.sandbox(**options)


def test_an_unknown_container_name_is_refused_naming_the_containers(session):
    """container= naming no container of the pod: ValueError listing the pod's containers."""
    sb = session.sandbox(containers=[SERVER, CLIENT])
    with pytest.raises(ValueError, match=r"no such container; its containers are 'web', 'cli'"):
        sb.exec(["true"], container="db")
    with pytest.raises(ValueError, match="no such container"):
        sb.read_file("/etc/hostname", container="db")


@pytest.mark.parametrize(("text", "primary", "match"), [
    (b'{"services": {"a": {"image": "host", "ports": ["80:80"]}}}', "a", "key 'ports' is not supported"),
    (b'{"services": {"a": {"build": "."}}}', "a", "set image: instead"),
    (b'{"services": {"a": {"image": "host"}}}', "b", "primary_service='b' is not a service"),
    (b'{"services": {"a": {"image": "host"}}, "networks": {}}', "a", "top-level key 'networks'"),
    (b'{"services": ', "a", "cannot be read as a compose file"),
    (b'{"services": {"a": {"image": "host"}}}', None, "primary_service is required"),
])
def test_bad_compose_files_are_refused_naming_the_key(text, primary, match):
    """A compose file with an unsupported key, no image, a wrong primary or bad syntax: ValueError
    naming it, before anything starts."""
    with pytest.raises(ValueError, match=match):
        Sandbox.run_from_file(text, primary_service=primary)


@NEEDS_BRIDGE
def test_a_bridge_pod_shares_its_address_and_exposed_ports(session):
    """With a bridge network the pod has one address: a server in the second container is reached
    from the host through the pod's exposed port, and both containers see the same eth0 address."""
    sb = session.sandbox(network={"ingress": [{"cidr": "192.0.2.99/32", "ports": [{"port": 8000}]}]},
                         containers=[Container(name="app", image="host", primary=True),
                                     Container(name="side", image="host")])
    proc = sb.exec(["python3", "-c", SERVE, "8000"], container="side")
    assert next(iter(proc.stdout)).strip() == "ready"
    [(_port, _name, url)] = sb.service_urls
    assert host_connect(url.removeprefix("tcp://")) == b"from-sandbox:host"
    mine = "ip -4 -o addr show eth0; echo $SANDPOOL_SANDBOX_ADDRESS"
    assert sh(sb, mine) == sh(sb, mine, container="side") and sh(sb, mine).strip()


def test_a_container_over_its_memory_limit_is_killed_alone(session, memory_limits_enforced):
    """The second container going over its own memory limit is OOM-killed; the primary (no limit)
    runs on and still reaches the pod's network."""
    sb = session.sandbox(containers=[SERVER, CLIENT])
    hog = sb.exec(["python3", "-c", "b = [bytearray(1 << 20) for _ in range(1000)]; print('survived')"],
                  container="cli")
    with pytest.raises(SandboxDiedError, match="OOMKilled"):
        hog.result(timeout=30)
    assert sb.status == SandboxStatus.RUNNING and sh(sb, "echo alive") == "alive\n"
    listening(sb)
    assert sb.exec(["python3", "-c", FETCH]).result(timeout=60).stdout.strip() == "200"
    assert dict((c.name, c.state) for c in sb.container_statuses)["cli"] == SandboxStatus.FAILED
