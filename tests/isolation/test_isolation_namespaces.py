"""The namespaces level on the host image: what a sandbox sees, and escapes that fail clearly."""

import os

import pytest

from sandpool import SandboxFailedError, SandboxFileError, Session
from sandpool._isolation import probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")


@pytest.fixture
def session():
    with Session(defaults={"isolation": "namespaces"}) as s:
        yield s


def sh(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def test_auto_picks_namespaces_as_root_and_repr_says_so():
    """isolation='auto' is the namespaces level here, and repr and the property report it."""
    with Session() as session:
        sb = session.sandbox()
        sb.wait()
        assert sb.isolation == "namespaces" and "isolation=namespaces" in repr(sb)


def test_agent_is_pid_1_and_host_processes_are_invisible(session):
    """A new pid namespace: the agent is PID 1, /proc lists only the sandbox's own processes."""
    out = sh(session.sandbox(), "cat /proc/1/comm; ls /proc | grep -c '^[0-9]'; echo $$").stdout.split()
    assert out[0].startswith("python")
    assert int(out[1]) <= 4 and int(out[2]) < 10  # the agent, sh, ls, grep


def test_signalling_a_host_process_fails(session):
    """kill of the test runner's pid reaches no host process: there is no such pid inside."""
    result = sh(session.sandbox(), f"kill -0 {os.getpid()} && echo reached || echo refused")
    assert result.stdout.strip() == "refused"


def test_hostname_is_the_sandbox_id_and_mount_is_refused(session):
    """uts namespace: hostname = sandbox id; no CAP_SYS_ADMIN: mount fails with 'permission denied'."""
    sb = session.sandbox()
    assert sh(sb, "hostname").stdout.strip() == sb.sandbox_id
    result = sh(sb, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x")
    assert result.returncode != 0 and "permission denied" in result.stderr.lower()


def test_no_new_privs_and_a_container_capability_set(session):
    """Exec'd processes run with no_new_privs and without CAP_SYS_ADMIN (bit 21)."""
    status = sh(session.sandbox(), "cat /proc/self/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert not int(fields["CapEff"], 16) & (1 << 21) and not int(fields["CapBnd"], 16) & (1 << 21)


def test_changes_stay_inside_and_vanish_with_the_sandbox(session):
    """Writes to / land in the sandbox's overlay: the host and other sandboxes never see them."""
    marker = f"/var/tmp/sandpool-escape-{os.getpid()}"
    a, b = session.sandbox(), session.sandbox()
    assert sh(a, f"echo inside > {marker} && echo x > /etc/sandpool-test && cat {marker}").stdout == "inside\n"
    a.write_file("/etc/written-by-file-op", b"1").result()
    assert not os.path.exists(marker) and not os.path.exists("/etc/sandpool-test")
    assert not os.path.exists("/etc/written-by-file-op")
    assert sh(b, "cat /etc/sandpool-test").returncode != 0
    a.stop().result()
    with Session(defaults={"isolation": "namespaces"}) as other:
        assert sh(other.sandbox(), "ls /etc/sandpool-test").returncode != 0


def test_file_ops_see_the_sandbox_filesystem(session):
    """read_file/write_file work on the sandbox's own root: exec'd programs and file ops agree."""
    sb = session.sandbox(working_dir="/work")
    sb.write_file("/work/data.txt", b"hello").result()
    assert sh(sb, "cat data.txt; echo; pwd").stdout == "hello\n/work\n"
    sh(sb, "echo from-exec > /var/tmp/out.txt")  # (the host image has no /srv: see test_fsview)
    assert sb.read_file("/var/tmp/out.txt").result() == b"from-exec\n"
    # '/..' is '/': the climb ends at the sandbox's own root, where the file exec wrote is
    assert sb.read_file("/../../var/tmp/out.txt").result() == b"from-exec\n"
    assert sb.read_file("/../../etc/hostname").result() == sh(sb, "cat /etc/hostname").stdout.encode()
    with pytest.raises(SandboxFileError) as info:
        sb.read_file("/nope").result()
    assert info.value.reason == "CWSANDBOX_FILE_NOT_FOUND"


def test_another_sandboxs_files_and_sandpool_state_are_hidden(session, state_dir):
    """Neither file ops nor programs reach another sandbox's files or the host's state directory."""
    a, b = session.sandbox(), session.sandbox()
    a.write_file("/secret", b"a's").result()
    with pytest.raises(SandboxFileError):
        b.read_file("/secret").result()
    listing = sh(b, f"ls -A {state_dir} 2>&1; ls -A /root /home").stdout
    assert "o-" not in listing and "sb-" not in listing and ".bashrc" not in listing
    assert b.exec(["ls", state_dir]).result().returncode != 0  # absent, not just empty


def test_network_none_is_loopback_only(session):
    """The default network is 'none': lo is up and works, any other address is unreachable."""
    script = (
        "import socket\n"
        "srv = socket.create_server(('127.0.0.1', 0)); port = srv.getsockname()[1]\n"
        "socket.create_connection(('127.0.0.1', port), timeout=2).close(); print('loopback ok')\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
        "except OSError as exc:\n"
        "    print('outside:', exc.strerror)\n"
    )
    sb = session.sandbox()
    out = sb.exec(["python3", "-c", script]).result().stdout
    assert out == "loopback ok\noutside: Network is unreachable\n"
    assert sh(sb, "ls /sys/class/net").stdout.split() == ["lo"]


def test_network_host_shares_the_host_stack(session):
    """network='host' (or cwsandbox NetworkOptions allowing egress) sees the host's interfaces."""
    host_ifaces = sorted(os.listdir("/sys/class/net"))
    for network in ("host", {"egress": [{"any": True}]}):
        sb = session.sandbox(network=network)
        assert sorted(sh(sb, "ls /sys/class/net").stdout.split()) == host_ifaces


def test_network_options_without_local_meaning_fail_clearly(session):
    """A selector egress rule cannot be honoured locally: the start fails and says so (CIDR rules
    make a bridge network: tests/isolation/test_network.py)."""
    sb = session.sandbox(network={"egress": [{"selector": {"pod_labels": {"app": "x"}}}]})
    with pytest.raises(SandboxFailedError, match="no local meaning"):
        sb.wait()


def test_tmp_is_a_size_limited_tmpfs(session):
    """Filling /tmp stops at its size (resources ephemeral-storage) with 'No space left on device'."""
    sb = session.sandbox(resources={"limits": {"ephemeral-storage": "8Mi"}})
    result = sh(sb, "dd if=/dev/zero of=/tmp/fill bs=1M count=64")
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert sh(sb, "echo still works").stdout == "still works\n"


def test_write_outside_the_root_through_dev_and_proc_fails(session):
    """Host-writing back doors are shut: /proc/sys is read-only, /sys is read-only, no block devices."""
    sb = session.sandbox()
    assert sh(sb, "echo 1 > /proc/sys/vm/drop_caches").returncode != 0
    assert sh(sb, "echo x > /sys/kernel/uevent_helper").returncode != 0
    assert sh(sb, "ls /dev").stdout.split() == sorted(
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    assert sh(sb, "mknod /tmp/disk b 254 0").returncode != 0


def test_unavailable_level_fails_with_the_reason(monkeypatch):
    """A level the machine lacks fails the start with the probe's reason and what to use instead."""
    monkeypatch.setattr(probe, "unavailable", lambda level: "it needs root (uid 1000)" if level == "oci" else None)
    with Session() as session:
        sb = session.sandbox(isolation="oci")
        with pytest.raises(SandboxFailedError, match=r"isolation='oci' is not available here: it needs root"):
            sb.wait()
        assert sb.status_reason and "isolation='auto'" in sb.status_reason
