"""Disk fill from inside a sandbox at the namespaces and oci levels: ``ephemeral-storage`` bounds the
overlay's writable layer and /tmp, /run and /dev/shm together; writing past it fails with ENOSPC
(the file API with CWSANDBOX_FILE_NO_SPACE), nothing reaches the host's disk, and the sandbox and
its neighbours keep working. A sandbox that names no limit gets the default."""

from __future__ import annotations

import os

import pytest

from sandpool import SandboxFileError
from _sandpool_agent.confine import storage

LIMIT_MIB = 32


@pytest.fixture
def session(contained):
    return contained


def sh(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def host_bytes(path: str) -> int:
    """Disk blocks in use under ``path`` on the host (bytes), not following mounts or symlinks."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def df_bytes(sandbox, path: str) -> tuple[int, int]:
    """(size, available) of the filesystem holding ``path``, as the sandbox sees it."""
    size, avail = sh(sandbox, f"df -B1 --output=size,avail {path} | tail -1").stdout.split()
    return int(size), int(avail)


def limited(session, mib: int = LIMIT_MIB):
    return session.sandbox(resources={"limits": {"ephemeral-storage": f"{mib}Mi"}})


def test_writing_twice_the_limit_stops_at_enospc_off_the_host_disk(session, state_dir):
    """dd of 2x the limit into / fails with ENOSPC near the limit; the host's state dir holds none of
    it; after removing the file the sandbox writes and runs commands again."""
    sb, neighbour = limited(session), session.sandbox()
    result = sh(sb, f"dd if=/dev/zero of=/fill bs=1M count={2 * LIMIT_MIB} 2>&1; stat -c %s /fill")
    assert "No space left on device" in result.stdout
    written = int(result.stdout.split()[-1])
    assert (LIMIT_MIB - 2) << 20 <= written <= LIMIT_MIB << 20
    assert host_bytes(state_dir) < 4 << 20  # the upper layer is not on the host's disk
    assert df_bytes(sb, "/")[1] < 1 << 20
    assert sh(neighbour, "dd if=/dev/zero of=/n bs=1M count=8 2>&1 && echo ok").stdout.split()[-1] == "ok"
    assert sh(sb, "rm /fill && echo again > /tmp/x && cat /tmp/x").stdout == "again\n"


def test_upper_layer_and_tmpfs_mounts_share_one_budget(session):
    """Filling /tmp, /run and /dev/shm counts against the same limit as the root filesystem."""
    sb = limited(session)
    third = LIMIT_MIB // 3 + 1
    script = (f"dd if=/dev/zero of=/tmp/a bs=1M count={third} 2>/dev/null && "
              f"dd if=/dev/zero of=/dev/shm/b bs=1M count={third} 2>/dev/null && "
              f"dd if=/dev/zero of=/run/c bs=1M count={third} 2>/dev/null; echo rc=$?; "
              f"echo x > /etc/more || echo full")
    out = sh(sb, script).stdout
    assert "rc=1" in out and "full" in out
    assert sh(sb, "rm /tmp/a /dev/shm/b /run/c && echo x > /etc/more && cat /etc/more").stdout == "x\n"


def test_file_api_reports_no_space_and_the_sandbox_stays_usable(session):
    """write_file into a full sandbox raises SandboxFileError (CWSANDBOX_FILE_NO_SPACE) and leaves
    no partial file; once space is freed the same write succeeds."""
    sb = limited(session)
    sh(sb, f"dd if=/dev/zero of=/fill bs=1M count={LIMIT_MIB} 2>/dev/null")
    with pytest.raises(SandboxFileError) as info:
        sb.write_file("/data.bin", b"x" * (2 << 20)).result()
    assert info.value.reason == "CWSANDBOX_FILE_NO_SPACE"
    assert sh(sb, "ls -a / | grep -c sandpool; rm /fill").stdout.split() == ["0"]
    sb.write_file("/data.bin", b"x" * (2 << 20)).result()
    assert sb.read_file("/data.bin").result() == b"x" * (2 << 20)


def test_default_limit_applies_when_unset(session):
    """With no ephemeral-storage, the root and /tmp have the default size (min(1 GiB, RAM/10));
    a memory limit below it caps it."""
    sb = session.sandbox()
    assert df_bytes(sb, "/")[0] == df_bytes(sb, "/tmp")[0] == storage.default_bytes() <= 2**30
    capped = session.sandbox(resources={"limits": {"memory": "96Mi"}})
    assert df_bytes(capped, "/")[0] == 96 << 20


def test_a_zero_limit_is_not_unlimited(session):
    """ephemeral-storage "0" (which a tmpfs would read as no limit) gives the 1 MiB minimum."""
    sb = session.sandbox(resources={"limits": {"ephemeral-storage": "0"}})
    assert df_bytes(sb, "/")[0] == storage.MIN_BYTES
    assert "No space left" in sh(sb, "dd if=/dev/zero of=/f bs=1M count=4 2>&1").stdout
    assert sh(sb, "rm /f; echo ok").stdout == "ok\n"
