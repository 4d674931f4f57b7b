"""The cwsandbox service's parts without a server: wire types, spec and status mapping, list decisions,
error translation, main-log reading."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import time
import types
import zlib

import grpc
import pytest
import trio

from sandpool import _errors as sp
from sandpool._cwsandbox import _descriptors, _pods, _regen
from sandpool._cwsandbox._errors import RpcFailure, status_for, translate
from sandpool._cwsandbox._logs import MainLog
from sandpool._cwsandbox._proto import SERVICE_DESCRIPTOR, pb, rpc
from sandpool._cwsandbox._registry import Entry, Registry
from sandpool._cwsandbox._spec import local_image, sandbox_options
from sandpool._cwsandbox._status import sandbox_message, state, status_of
from sandpool._status import SandboxStatus


def _installed_client() -> str | None:
    try:
        return importlib.metadata.version("cwsandbox")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_vendored_descriptors_match_the_published_client():
    """The vendored wire types are byte for byte those of the installed cwsandbox 1.22 client."""
    version = _installed_client()
    if version is None or not version.startswith("1.22."):
        pytest.skip(f"needs cwsandbox 1.22.* installed (found {version}); test_cwsandbox_client installs it")
    data, _, _ = _regen.descriptor_set_from_installed()
    assert zlib.decompress(base64.b64decode(_descriptors.DESCRIPTOR_SET)) == data
    assert hashlib.sha256(data).hexdigest() == _descriptors.SHA256


def test_every_service_method_is_served_or_refused():
    """All 18 SandboxService methods have a handler; the client's messages parse as ours."""
    from sandpool._cwsandbox._servicer import _UNARY, _UNSUPPORTED

    names = {m.name for m in SERVICE_DESCRIPTOR.methods}
    assert names == set(_UNARY) | set(_UNSUPPORTED) | {"StreamExec", "StreamLogs"}
    assert pb.State.Name(pb.State.Value("STATE_COMPLETED")) == "STATE_COMPLETED"


def _container(**fields):
    return pb.SandboxSpec(tags=["a", "b"], annotations={"k": "v"}, max_lifetime_seconds=30,
                          containers=[pb.Container(name="main", **fields)])


def test_spec_maps_onto_sandpool_options():
    """Image, command, args, env, working dir, resources, tags, annotations and lifetime map over."""
    spec = _container(image="python:3.11", command="sleep", args=["infinity"], working_dir="/app",
                      environment_variables={"A": "1"}, resource_requirements=pb.ResourceRequirements(
                          requests=pb.Resources(cpu="500m", memory="256Mi"),
                          limits=pb.Resources(cpu="1", memory="512Mi", gpu=pb.Gpu(count=1, type="A100"))))
    options = sandbox_options(spec)
    assert options["container_image"] == "python:3.11"
    assert (options["command"], options["args"]) == ("sleep", ["infinity"])
    assert options["environment_variables"] == {"A": "1"} and options["working_dir"] == "/app"
    assert options["tags"] == ["a", "b"] and options["annotations"] == {"k": "v"}
    assert options["max_lifetime_seconds"] == 30
    assert options["resources"] == {"requests": {"cpu": "500m", "memory": "256Mi"},
                                    "limits": {"cpu": "1", "memory": "512Mi"}, "gpu": {"count": 1, "type": "A100"}}
    flat = sandbox_options(_container(resources=pb.Resources(cpu="2")))["resources"]
    assert flat == {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}, "gpu": None}
    assert sandbox_options(_container(args=["python", "-V"]))["command"] == "python"  # args alone: argv


def test_images_are_pulled_like_any_other_never_mapped_to_the_host():
    """A cwsandbox image name stays that name (the runtime pulls it); only an empty name is the host."""
    assert local_image("python:3.11") == "python:3.11" and local_image("ghcr.io/x/y:1") == "ghcr.io/x/y:1"
    assert local_image("") == "host"


def test_multiple_containers_become_a_pod():
    """Several containers map to sandpool's containers= (a pod); two primaries are INVALID_ARGUMENT."""
    spec = pb.SandboxSpec(containers=[pb.Container(name="a", image="host", primary=True, args=["sleep", "9"]),
                                      pb.Container(name="b", image="", files=[pb.FileMount(path="/x", content=b"y")])])
    rows = _pods.sandbox_options(spec)["containers"]
    assert [(r["name"], r["primary"], r["image"]) for r in rows] == [("a", True, "host"), ("b", False, "host")]
    assert (rows[0]["command"], rows[0]["args"]) == ("sleep", ["9"]) and rows[1]["mounted_files"] == {"/x": b"y"}
    spec = pb.SandboxSpec(containers=[pb.Container(name="a", primary=True), pb.Container(name="b", primary=True)])
    with pytest.raises(RpcFailure) as info:
        _pods.sandbox_options(spec)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "exactly one must be primary" in info.value.message
    spec = pb.SandboxSpec(containers=[pb.Container(name="a", primary=True),
                                      pb.Container(name="b", volume_mounts=[pb.VolumeMount(volume="v")])])
    with pytest.raises(RpcFailure, match="mounted in its primary container only"):
        _pods.sandbox_options(spec)


class _FakeSandbox:
    container_statuses = ()  # one container: its row comes from the spec

    def __init__(self, sandbox_id, status=None, *, returncode=None, reason=None, started_at=None):
        self.sandbox_id, self.status, self.returncode = sandbox_id, status, returncode
        self.status_reason, self.started_at = reason, started_at


def _entry(sandbox_id, status, *tags, created=0.0, **kw):
    spec = pb.SandboxSpec(tags=list(tags), containers=[pb.Container(name="main", image="python:3.11")])
    return Entry(_FakeSandbox(sandbox_id, status, **kw), spec, "", b"", created_at=created)


def test_status_maps_every_sandpool_state():
    """Each sandpool status is the proto state of the same name; terminal ones carry the exit code."""
    for status in SandboxStatus:
        assert status_of(state(status)) == status
    assert state(None) == pb.State.Value("STATE_CREATING")
    failed = sandbox_message(_entry("sb-1", SandboxStatus.FAILED, "t", returncode=3,
                                    reason="the main command exited with code 3", started_at=1.5))
    assert failed.status.state == pb.State.Value("STATE_FAILED") and failed.status.exit_code == 3
    assert failed.status.state_reason.endswith("code 3") and failed.status.start_time.seconds == 1
    assert failed.spec.containers[0].image == "python:3.11" and failed.status.container_statuses[0].exit_code == 3
    running = sandbox_message(_entry("sb-2", SandboxStatus.RUNNING))
    assert not running.status.HasField("exit_code") and running.status.runner_id.startswith("sandpool@")


def test_preparing_reports_creating_and_a_failed_preparation_reports_failed():
    entry = _entry("sb-1", SandboxStatus.RUNNING)
    entry.preparing = True
    assert entry.status == SandboxStatus.CREATING
    entry.preparing, entry.failure_reason = False, "could not mount '/x'"
    entry.sandbox.status = SandboxStatus.TERMINATING
    assert entry.status == SandboxStatus.CREATING
    entry.sandbox.status = SandboxStatus.TERMINATED
    assert (entry.status, entry.reason) == (SandboxStatus.FAILED, "could not mount '/x'")


def _registry_with(*entries):
    registry = Registry()
    for entry in entries:
        registry.add(entry)
    return registry


def test_list_filters_by_tags_state_and_termination():
    registry = _registry_with(_entry("sb-1", SandboxStatus.RUNNING, "a", "b", created=1),
                         _entry("sb-2", SandboxStatus.RUNNING, "a", created=2),
                         _entry("sb-3", SandboxStatus.COMPLETED, "a", created=3))

    def ids(**request):
        return [e.sandbox_id for e in registry.select(pb.ListSandboxesRequest(**request))[0]]

    assert ids() == ["sb-2", "sb-1"]  # newest first, terminal ones left out
    assert ids(show_terminated=True, sort_direction=pb.SortDirection.Value("SORT_DIRECTION_ASCENDING")) == \
        ["sb-1", "sb-2", "sb-3"]
    assert ids(tags=["a", "b"]) == ["sb-1"]
    assert ids(state=pb.State.Value("STATE_COMPLETED")) == ["sb-3"]
    assert ids(runner_ids=["elsewhere"]) == [] and ids(volume_ids=["v"]) == []


def test_list_pages_walk_each_match_once():
    registry = _registry_with(*[_entry(f"sb-{i}", SandboxStatus.RUNNING, created=i) for i in range(7)])
    seen, token = [], ""
    while True:
        page, token = registry.select(pb.ListSandboxesRequest(page_size=3, page_token=token))
        seen += [e.sandbox_id for e in page]
        if not token:
            break
    assert seen == [f"sb-{i}" for i in reversed(range(7))]
    with pytest.raises(RpcFailure):
        registry.select(pb.ListSandboxesRequest(page_token="bogus"))


def test_ended_sandboxes_are_forgotten_after_their_retention(monkeypatch):
    from sandpool._cwsandbox import _registry

    monkeypatch.setattr(_registry, "KEEP_ENDED_COUNT", 1)
    old, recent, newest = (_entry(f"sb-{i}", SandboxStatus.COMPLETED) for i in range(3))
    old.ended_at, recent.ended_at, newest.ended_at = 0.0, 9000.0, 9001.0
    assert _registry_with(old, recent, newest).expired(now=9002.0) == [old, recent]


def test_request_id_replays_or_conflicts():
    registry = Registry()
    entry = Entry(_FakeSandbox("sb-1"), pb.SandboxSpec(), "req", b"spec-1")
    registry.reserve(entry)
    assert registry.replay("req", b"spec-1") is entry and registry.replay("other", b"x") is None
    with pytest.raises(RpcFailure) as info:
        registry.replay("req", b"spec-2")
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS and info.value.reason == "CWSANDBOX_REQUEST_ID_CONFLICT"


@pytest.mark.parametrize("error, code, reason", [
    (sp.SandboxNotFoundError("x", sandbox_id="sb-1"), grpc.StatusCode.NOT_FOUND, "CWSANDBOX_SANDBOX_NOT_FOUND"),
    (sp.SandboxFileError("m", filepath="/x", reason="CWSANDBOX_FILE_NOT_FOUND"), grpc.StatusCode.NOT_FOUND,
     "CWSANDBOX_FILE_NOT_FOUND"),
    (sp.SandboxFileError("m", filepath="/x", reason="CWSANDBOX_FILE_OUTSIDE_SANDBOX"),
     grpc.StatusCode.FAILED_PRECONDITION, "CWSANDBOX_FILE_PERMISSION_DENIED"),
    (sp.SandboxTimeoutError("t"), grpc.StatusCode.DEADLINE_EXCEEDED, None),
    (sp.SandboxUnavailableError("u"), grpc.StatusCode.UNAVAILABLE, "CWSANDBOX_BACKEND_UNAVAILABLE"),
    (sp.SandboxNotRunningError("stopped"), grpc.StatusCode.CANCELLED, None),
    (sp.SandboxResourceExhaustedError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT, None),
    (ExceptionGroup("g", [sp.SandboxTimeoutError("inner")]), grpc.StatusCode.DEADLINE_EXCEEDED, None),
])
def test_errors_translate_to_the_codes_the_client_maps(error, code, reason):
    """Each sandpool error leaves with the code (and ErrorInfo reason) cwsandbox turns into its match."""
    failure = translate(error)
    assert (failure.code, failure.reason) == (code, reason)


def test_status_details_parse_as_aip_193():
    """The trailer holds a google.rpc.Status with ErrorInfo (domain cwsandbox.com) and field violations."""
    failure = RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "bad", "R", {"filepath": "/x"}, (("f", "why"),))
    status = status_for(failure)
    key, value = status.trailing_metadata[0]
    parsed = rpc.Status.FromString(value)
    info, bad = rpc.ErrorInfo(), rpc.BadRequest()
    assert key == "grpc-status-details-bin" and parsed.details[0].Unpack(info) and parsed.details[1].Unpack(bad)
    assert (info.reason, info.domain, dict(info.metadata)) == ("R", "cwsandbox.com", {"filepath": "/x"})
    assert (bad.field_violations[0].field, status.code, status.details) == ("f", grpc.StatusCode.INVALID_ARGUMENT, "bad")


def test_main_log_tail_since_and_partial_lines(tmp_path):
    """Lines are stamped when first read, tail and since pick from them, a partial last line is kept
    until the log closes."""
    path = tmp_path / "main.log"
    path.write_bytes(b"one\ntwo\n")
    log = MainLog(open(path, "rb", buffering=0))
    log.catch_up()
    middle = time.time()
    with open(path, "ab") as f:
        f.write(b"three\nfour")
    log.catch_up()
    assert [line for _, line in log.lines] == [b"one\n", b"two\n", b"three\n"] and log.partial == b"four"
    assert log.start(tail_lines=2, since=None) == 1 and log.start(tail_lines=None, since=middle) == 2
    log.close()
    assert log.lines[-1][1] == b"four" and log.start(tail_lines=0, since=None) == 4


def test_main_log_keeps_only_its_newest_bytes(tmp_path, monkeypatch):
    """A log larger than KEEP_BYTES is read from its tail, at a line start, with older lines dropped."""
    from sandpool._cwsandbox import _logs

    monkeypatch.setattr(_logs, "KEEP_BYTES", 100)
    path = tmp_path / "main.log"
    path.write_bytes(b"".join(b"line %03d\n" % i for i in range(50)))  # 9 bytes a line
    log = MainLog(open(path, "rb", buffering=0))
    log.catch_up()
    assert [line for _, line in log.lines] == [b"line %03d\n" % i for i in range(39, 50)]
    assert log.first >= 1 and log.start(tail_lines=None, since=None) == log.first


def test_logs_of_a_sandbox_with_none_are_empty():
    """A sandbox whose runtime has no main log streams nothing, and ends."""
    from sandpool._cwsandbox._logs import LogSessions, stream_logs

    async def main():
        send, receive = trio.open_memory_channel(10)
        entry = types.SimpleNamespace(log=None, ended=trio.Event())
        entry.ended.set()
        async with send:
            await stream_logs(entry, pb.StreamLogsRequest(follow=True), send, LogSessions())
        return [item async for item in receive]

    assert trio.run(main) == []


def test_handshake_hears_a_peer_that_already_ended():
    """An agent whose main command ended within milliseconds may be gone before our hello reaches it;
    its hello and its exit report are still read (the cwsandbox server saw ``Sandbox.run("echo", ...)``
    fail to start under load without this)."""
    import socket

    from _sandpool_agent import wire as _wire
    from sandpool._core.channel import FrameChannel

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.sendall(_wire.encode(_wire.hello(pid=1)) + _wire.encode({"t": "main_exit", "code": 0}))
        theirs.close()
        channel = FrameChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        hello = await channel.handshake()
        after = await channel.receive()
        await channel.aclose()
        return hello["pid"], after, await channel.receive()

    assert trio.run(main) == (1, {"t": "main_exit", "code": 0}, None)


def test_network_and_services_of_a_spec_as_sandpool_options():
    """A spec's NetworkOptions become sandpool's network dict (https_hostname as dns_name, tenant
    scopes by name, CIDR excepts, port ranges) and its services sandpool's service dicts; an egress
    rule's https_hostname_except, which needs an HTTPS proxy, is refused naming the fix."""
    from sandpool._cwsandbox._netspec import network_options
    from sandpool._cwsandbox._proto import pb

    spec = pb.SandboxSpec(
        network=pb.NetworkOptions(
            egress=[pb.EgressRule(cidr=pb.CidrBlock(cidr="10.0.0.0/8", **{"except": ["10.1.0.0/16"]})),
                    pb.EgressRule(https_hostname="example.org"),
                    pb.EgressRule(tenant=pb.TenantScope.Value("TENANT_SCOPE_SAME_ORG"),
                                  ports=[pb.PortRange(protocol="udp", port=53, end_port=54)])],
            ingress=[pb.IngressRule(any=True, ports=[pb.PortRange(port=8080)])]),
        services=[pb.Service(port=80, name="web", visibility=pb.Visibility.Value("VISIBILITY_PUBLIC"),
                             endpoint=pb.EndpointSpec(kind=pb.EndpointKind.Value("ENDPOINT_KIND_HTTPS"),
                                                      auth=pb.EndpointAuth.Value("ENDPOINT_AUTH_OPEN")))])
    options = network_options(spec)
    assert options["network"]["egress"] == [
        {"cidr": {"cidr": "10.0.0.0/8", "except_cidrs": ["10.1.0.0/16"]}}, {"dns_name": "example.org"},
        {"tenant": "same_org", "ports": [{"protocol": "udp", "port": 53, "end_port": 54}]}]
    assert options["network"]["ingress"] == [{"any": True, "ports": [{"protocol": "tcp", "port": 8080,
                                                                      "end_port": None}]}]
    assert options["services"] == [{"port": 80, "name": "web", "protocol": "tcp", "visibility": "public",
                                    "endpoint": {"kind": "https", "auth": "open", "request_timeout_seconds": None}}]
    assert network_options(pb.SandboxSpec()) == {}
    with pytest.raises(ValueError, match="https_hostname_except"):
        network_options(pb.SandboxSpec(network=pb.NetworkOptions(
            egress=[pb.EgressRule(https_hostname="example.org", https_hostname_except=["a.example.org"])])))
