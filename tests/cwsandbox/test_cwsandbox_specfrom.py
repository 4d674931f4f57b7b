"""CreateSandboxFromFile and CreateSandboxFromTemplate as a SandboxSpec (plain sync code, no sandbox)."""

from __future__ import annotations

import grpc
import pytest

from sandpool import _templates
from sandpool._config import resolve_spec
from sandpool._cwsandbox._errors import RpcFailure
from sandpool._cwsandbox._proto import pb
from sandpool._cwsandbox._specfrom import from_file, from_template

COMPOSE = b'{"services": {"a": {"image": "host", "command": "sleep 9", "deploy": {"resources": {"limits": ' \
          b'{"cpus": "0.5", "memory": "64M"}}}}, "b": {"image": "python:3.11"}}}'


def test_a_compose_file_becomes_one_container_per_service():
    """Services become containers (the primary marked, images overridden, limits carried); the
    request's tags, annotations and lifetime are the spec's."""
    request = pb.CreateSandboxFromFileRequest(contents=COMPOSE, primary_service="a", image_overrides={"b": "x:1"},
                                              tags=["t"], max_lifetime_seconds=60, request_id="r1")
    made = from_file(request)
    spec = made.sandbox.spec
    assert made.request_id == "r1" and list(spec.tags) == ["t"] and spec.max_lifetime_seconds == 60
    assert [(c.name, c.image, c.primary) for c in spec.containers] == [("a", "host", True), ("b", "x:1", False)]
    assert (spec.containers[0].command, list(spec.containers[0].args)) == ("sleep", ["9"])
    limits = spec.containers[0].resource_requirements.limits
    assert (limits.cpu, limits.memory) == ("0.5", "64M")


@pytest.mark.parametrize(("request_fields", "code", "text"), [
    ({"control": pb.Control.Value("CONTROL_CONTAINER_ENGINE")}, grpc.StatusCode.UNIMPLEMENTED, "CONTAINER_ENGINE"),
    ({"primary_service": ""}, grpc.StatusCode.INVALID_ARGUMENT, "primary_service is required"),
    ({"primary_service": "c"}, grpc.StatusCode.INVALID_ARGUMENT, "primary_service='c' is not a service"),
    ({"contents": b'{"services": {"a": {"image": "h", "deploy": {"resources": {"limits": {"pids": 5}}}}}}'},
     grpc.StatusCode.INVALID_ARGUMENT, "resources.limits.pids"),
    ({"contents": b'{"services": {"a": {"image": "h", "ports": ["1:1"]}}}'}, grpc.StatusCode.INVALID_ARGUMENT,
     "key 'ports' is not supported"),
])
def test_a_file_the_spec_cannot_carry_is_refused_naming_it(request_fields, code, text):
    """Nothing of a file is dropped: what cannot run, or cannot be said in the spec, is refused."""
    fields = {"contents": COMPOSE, "primary_service": "a", **request_fields}
    with pytest.raises(RpcFailure) as info:
        from_file(pb.CreateSandboxFromFileRequest(**fields))
    assert info.value.code == code and text in info.value.message, info.value.message


def test_a_template_with_overrides_replacing_its_fields(tmp_path, monkeypatch):
    """A stored template becomes the spec; each field the overrides set replaces the template's
    whole (tags, containers), the others stay; unknown templates and options the spec cannot carry
    are INVALID_ARGUMENT naming them."""
    monkeypatch.setenv(_templates.ENV_TEMPLATE_DIR, str(tmp_path))
    _templates.save("one", {"command": "sleep", "args": ["5"], "tags": ["a", "b"], "annotations": {"k": "v"},
                            "environment_variables": {"X": "1"}}, resolve_spec)
    spec = from_template(pb.CreateSandboxFromTemplateRequest(template_id="one")).sandbox.spec
    [row] = spec.containers
    assert (row.command, list(row.args), dict(row.environment_variables)) == ("sleep", ["5"], {"X": "1"})
    assert list(spec.tags) == ["a", "b"] and dict(spec.annotations) == {"k": "v"}
    overrides = pb.PartialSandboxSpec(tags=["c"], containers=[pb.PartialContainer(name="main", image="host")])
    spec = from_template(pb.CreateSandboxFromTemplateRequest(template_id="one", overrides=overrides)).sandbox.spec
    assert list(spec.tags) == ["c"] and [c.command for c in spec.containers] == [""]
    assert dict(spec.annotations) == {"k": "v"}
    _templates.save("iso", {"isolation": "process"}, resolve_spec)
    for name, text in (("iso", "sets 'isolation'"), ("none-such", "no such template"), ("../x", "not a template name")):
        with pytest.raises(RpcFailure) as info:
            from_template(pb.CreateSandboxFromTemplateRequest(template_id=name))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in info.value.message, info.value.message
