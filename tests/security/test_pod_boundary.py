"""Attacks from one container of a pod on another: the shared network namespace must be all they share."""

import grpc
import pytest
from service_helpers import ServerProcess

from sandpool import Container, Sandbox, Session
from sandpool._config import SandboxSpec
from sandpool._grpc import messages as m
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")
SECRET = "pod-secret-7f3a91"
#: Run in the attacking container: every way it might reach the primary's files or processes.
ATTACK = f"""
import glob, os, subprocess
found = []
for path in glob.glob('/proc/[0-9]*/root/root/secret') + glob.glob('/proc/[0-9]*/cwd/secret'):
    try: found.append(open(path).read())
    except OSError: pass
for top in ('/root', '/tmp', '/home', '/var/tmp', '/run'):  # (their files, not the interpreter bound under /root)
    for entry in os.scandir(top):
        if entry.is_file(follow_symlinks=False):
            try: found.append(open(entry.path, errors='replace').read())
            except OSError: pass
pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]
mount = subprocess.run(['mount', '-t', 'tmpfs', 'x', '/tmp'], capture_output=True).returncode
status = open('/proc/self/status').read()
seccomp = [l.split()[1] for l in status.splitlines() if l.startswith('Seccomp:')][0]
capeff = [l.split()[1] for l in status.splitlines() if l.startswith('CapEff:')][0]
print(any('{SECRET}' in text for text in found), max(pids) < 100 and 'python' not in str(pids), mount != 0,
      seccomp, capeff)
"""


def test_a_container_cannot_reach_another_containers_files_or_processes():
    """The second container of a pod looks for the primary's secret through /proc/*/root, its own
    filesystem and a mount, and for the primary's processes: none is there, mounting is refused,
    and it runs under the same syscall filter and capabilities as the primary. Both keep working."""
    with Session(defaults={"isolation": "namespaces"}) as s:
        sb = s.sandbox(containers=[Container(name="app", image="host", primary=True),
                                   Container(name="intruder", image="host")])
        sb.exec(["sh", "-c", f"echo {SECRET} > /root/secret; echo {SECRET} > /tmp/secret"]).result(timeout=60)
        leaked, _pids, refused, seccomp, capeff = sb.exec(
            ["python3", "-c", ATTACK], container="intruder").result(timeout=60).stdout.split()
        assert leaked == "False" and refused == "True"
        assert "python3" not in sb.exec(["sh", "-c", "cat /proc/[0-9]*/comm"], container="intruder").result().stdout
        own = sb.exec(["python3", "-c", ATTACK]).result(timeout=60).stdout.split()
        assert own[0] == "True"  # (the primary finds its own secret: the search works)
        assert (seccomp, capeff) == (own[3], own[4]) and seccomp == "2"
        assert sb.read_file("/root/secret").result() == f"{SECRET}\n".encode()
        assert sb.exec(["true"], container="intruder").result().returncode == 0


def test_a_client_cannot_join_another_clients_sandbox_as_a_pod_container(tmp_path):
    """On a sandpool server, a Create naming another client's sandbox (or none that exists) as its
    ``pod`` would put the new sandbox in that sandbox's network namespace: it is refused, nothing
    starts, and the target and the server keep working."""
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        victim = s.sandbox()
        victim.wait()
        channel = grpc.insecure_channel(srv.address)
        create = channel.unary_unary(m.path("Create"))
        spec = m.spec_to_dict(SandboxSpec(command="sleep", args=("300",)))
        for pod in (victim.sandbox_id, "sb-nope"):
            with pytest.raises(grpc.RpcError) as info:
                create(m.pack({"spec": spec, "pod": pod}), timeout=10, metadata=srv.metadata)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no running sandbox of this client" in \
                info.value.details(), info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            create(m.pack({"spec": spec, "pod": 7}), timeout=10, metadata=srv.metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pod" in info.value.details()
        channel.close()
        assert [found.sandbox_id for found in Sandbox.list(address=srv.address).result()] == [victim.sandbox_id]
        assert victim.exec(["echo", "still"]).result().stdout == "still\n"
