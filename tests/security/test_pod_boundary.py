"""Attacks from one container of a pod on another: the shared network namespace must be all they share."""

import pytest

from sandpool import Container, Session
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
