"""The oci level: the same sandbox, images and limits as the namespaces level, run by crun."""

import glob
import os

import pytest

from sandpool import SandboxDiedError, SandboxFailedError, SandboxStatus, Session
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("oci") is not None,
                                reason=f"oci level unavailable: {probe.unavailable('oci')}")


@pytest.fixture
def session():
    with Session(defaults={"isolation": "oci"}) as s:
        yield s


def sh(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def test_a_crun_container_with_the_namespaces_levels_view(session):
    """PID 1 is the agent, hostname is the sandbox id, only lo, no CAP_SYS_ADMIN, no_new_privs."""
    sb = session.sandbox()
    out = sh(sb, "cat /proc/1/comm; hostname; ls /sys/class/net; grep NoNewPrivs /proc/self/status").stdout.split()
    assert out[0].startswith("python") and out[1] == sb.sandbox_id and out[2] == "lo" and out[-1] == "1"
    assert sb.isolation == "oci" and "isolation=oci" in repr(sb)
    mount = sh(sb, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x")
    assert mount.returncode != 0 and "permission denied" in mount.stderr.lower()


def test_files_and_changes_stay_in_the_container(session):
    """File ops and commands share the container's root; nothing reaches the host."""
    sb = session.sandbox(working_dir="/work")
    sb.write_file("/etc/oci-test", b"inside").result()
    assert sh(sb, "cat /etc/oci-test; pwd").stdout == "inside/work\n"
    assert not os.path.exists("/etc/oci-test")


def test_memory_limit_kills_the_container_as_oomkilled(session):
    """The container stays in sandpool's cgroup: going over memory fails it with OOMKilled."""
    sb = session.sandbox(resources={"limits": {"memory": "96Mi"}})
    proc = sb.exec(["python3", "-c", "b = [bytearray(1 << 20) for _ in range(1000)]"])
    with pytest.raises(SandboxDiedError, match="OOMKilled"):
        proc.result(timeout=30)
    with pytest.raises(SandboxFailedError):
        sb.wait_until_complete(timeout=10).result()
    assert sb.status == SandboxStatus.FAILED


def test_crun_leaves_no_state_behind(session, state_dir):
    """crun's state lives in the sandbox dir (its own --root): there while the container runs, gone
    after stop, and never in /run/crun."""
    sb = session.sandbox()
    sb.wait()
    sandbox_id = sb.sandbox_id
    own_root = glob.glob(os.path.join(state_dir, "*", sandbox_id, "crun", sandbox_id))
    assert len(own_root) == 1 and os.listdir(own_root[0]), own_root  # crun keeps its state here
    assert not os.path.exists(f"/run/crun/{sandbox_id}")
    sb.stop(graceful_shutdown_seconds=0).result()
    assert not os.path.exists(own_root[0])
    assert not os.path.exists(f"/run/crun/{sandbox_id}")
