"""Templates holding ``network``, ``services`` and ``volumes``, started through the cwsandbox listener:
the spec a template becomes (plain code), and the sandboxes the published client gets from it
through ``sandpool serve --cwsandbox`` (their own network, a service the host reaches, named and
scratch volumes, a read-only mount refusing writes). Traffic only to loopback and the sandboxes' own
addresses."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from sandpool import _templates
from sandpool._config import resolve_spec
from sandpool._cwsandbox._errors import RpcFailure
from sandpool._cwsandbox._proto import pb
from sandpool._cwsandbox._spec import sandbox_options, scratch_dirs
from sandpool._cwsandbox._specfrom import from_template
from sandpool._isolation import network, volumes

from network_helpers import NEEDS_BRIDGE, SERVE
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)
from test_cwsandbox_state import listener, run_program  # noqa: F401 (listener: a fixture)

RULES = {"deny_ingress": False, "egress": [{"cidr": {"cidr": "10.9.0.0/16", "except_cidrs": ["10.9.1.0/24"]},
                                            "ports": [{"port": 80, "end_port": 90, "protocol": "tcp"}]},
                                           {"dns_name": "example.test"}],
         "ingress": [{"tenant": "same_user", "ports": [8000]}]}


def _options(name: str) -> dict:
    return sandbox_options(from_template(pb.CreateSandboxFromTemplateRequest(template_id=name)).sandbox.spec)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(_templates.ENV_TEMPLATE_DIR, str(tmp_path / "templates"))


@pytest.mark.parametrize("mode", ["none", "host", "bridge", False, True])
def test_a_templates_network_mode_comes_back_as_the_same_mode(store, mode):
    """A mode has no field of its own in cwsandbox's spec: the rules it becomes mean that mode again."""
    _templates.save("net", {"network": mode}, resolve_spec)
    back = _options("net")["network"]
    assert network.resolve(back, "namespaces") == network.resolve(mode, "namespaces")
    assert network.policy(back).ingress == network.policy(mode).ingress == ()


def test_a_templates_rules_services_and_volumes_become_the_spec(store):
    """NetworkOptions rules, services and named and scratch volumes go through the spec to the same
    sandbox options (the listener's own meaning of scratch volumes: directories of the sandbox)."""
    service = {"port": 8200, "name": "web", "visibility": "public", "endpoint": {"kind": "https"}}
    vols = [{"name": "data", "volume_id": "data", "mount_path": "/data", "read_only": True, "sub_path": "train"},
            {"name": "tmp", "mount_path": "/scratch", "size": "64Mi"}]
    _templates.save("full", {"network": RULES, "services": [service], "volumes": vols, "command": "sleep",
                             "args": ["9"]}, resolve_spec)
    spec = from_template(pb.CreateSandboxFromTemplateRequest(template_id="full")).sandbox.spec
    options = sandbox_options(spec)
    assert network.policy(options["network"], options["services"]) == network.policy(RULES, [service])
    assert [(s["port"], s["name"], s["visibility"]) for s in options["services"]] == [(8200, "web", "public")]
    assert options["volumes"] == [{"name": "data", "volume_id": "data", "mount_path": "/data",
                                   "sub_path": "train", "read_only": True}]
    assert scratch_dirs(spec) == ["/scratch"] and options["command"] == "sleep"


@pytest.mark.parametrize(("options", "text"), [
    ({"volumes": [{"host_path": "/etc", "mount_path": "/host-etc"}]}, "binds the host directory '/etc'"),
    ({"network": "wide"}, "network='wide'"),
    ({"network": {"egress": [{"selector": {"pod_labels": {"a": "b"}}}]}}, "'selector'"),
    ({"services": [{"port": 80, "visibility": "everyone"}]}, "services[0].visibility='everyone'"),
])
def test_what_a_template_cannot_say_in_the_spec_is_refused_naming_it(store, options, text):
    """A bind of a host directory, an unknown mode, a selector rule, a bad visibility: INVALID_ARGUMENT
    naming the template and the entry, nothing dropped."""
    os.makedirs(_templates.store_dir())
    with open(os.path.join(_templates.store_dir(), "bad.json"), "w") as f:  # as stored (save() checks some)
        json.dump({"name": "bad", "created": 0.0, "options": options}, f)
    with pytest.raises(RpcFailure) as info:
        from_template(pb.CreateSandboxFromTemplateRequest(template_id="bad"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "template 'bad'" in info.value.message and text in info.value.message, info.value.message


@pytest.fixture(scope="module")
def shared_templates(tmp_path_factory: pytest.TempPathFactory):
    """The template store of this module's listener (set before it starts: it reads the store there)."""
    saved = os.environ.get(_templates.ENV_TEMPLATE_DIR)
    os.environ[_templates.ENV_TEMPLATE_DIR] = str(tmp_path_factory.mktemp("cwtemplates"))
    yield
    if saved is None:
        os.environ.pop(_templates.ENV_TEMPLATE_DIR, None)
    else:
        os.environ[_templates.ENV_TEMPLATE_DIR] = saved


@NEEDS_BRIDGE
def test_templates_with_networks_services_and_volumes_through_the_published_client(
        cwsandbox_client, shared_templates, listener, tmp_path):  # noqa: F811
    """run_from_template of templates stored on the server's machine: a bridge network (its own
    address), a public service the host reaches at its reported url, a named volume shared by two
    sandboxes and outliving them, its read-only mount refusing writes, a scratch volume; a template
    binding a host directory is refused naming it."""
    volumes.create("tplshared")
    _templates.save("tpl-net", {"network": "bridge", "services": [{"port": 8320, "name": "web",
                                                                     "visibility": "public"}]}, resolve_spec)
    _templates.save("tpl-vol", {"volumes": [{"name": "rw", "volume_id": "tplshared", "mount_path": "/data"},
                                            {"name": "ro", "volume_id": "tplshared", "mount_path": "/ro",
                                             "read_only": True},
                                            {"name": "tmp", "mount_path": "/scratch"}]}, resolve_spec)
    _templates.save("tpl-bind", {"volumes": [{"host_path": "/etc", "mount_path": "/host-etc"}]}, resolve_spec)
    try:
        out = run_program(listener, f"""
            import socket
            from cwsandbox import Sandbox

            SERVE = {SERVE!r}
            with Sandbox.run_from_template("tpl-net") as sb:
                addr = sb.exec(["sh", "-c", "ip -4 -o addr show eth0"]).result().stdout.split()[3]
                assert addr.startswith("10."), addr
                proc = sb.exec(["python3", "-c", SERVE, "8320"])
                assert next(iter(proc.stdout)).strip() == "ready"
                sb.get_status()
                assert sb.exposed_ports == ((8320, "web"),), sb.exposed_ports
                [(port, name, url)] = sb.service_urls
                host, port = url.split("://", 1)[1].rsplit(":", 1)
                assert host == "127.0.0.1", url
                with socket.create_connection((host, int(port)), timeout=5) as c:
                    c.sendall(b"host")
                    assert c.recv(100) == b"from-sandbox:host"
            with Sandbox.run_from_template("tpl-vol") as sb:
                sb.exec(["sh", "-c", "echo kept > /data/f && echo mine > /scratch/g"], check=True).result()
                assert sb.exec(["cat", "/ro/f", "/scratch/g"]).result().stdout == "kept\\nmine\\n"
                denied = sb.exec(["sh", "-c", "echo no > /ro/h"]).result()
                assert denied.returncode != 0 and "Read-only" in denied.stderr, denied
            with Sandbox.run_from_template("tpl-vol") as sb:
                assert sb.exec(["cat", "/data/f"]).result().stdout == "kept\\n"
            try:
                Sandbox.run_from_template("tpl-bind").wait()
            except Exception as exc:
                assert "binds the host directory '/etc'" in str(exc), exc
            else:
                raise AssertionError("a template binding a host directory was started")
            print("OK")
        """, tmp_path)
    finally:
        volumes.remove("tplshared")
    assert out.strip().endswith("OK")
