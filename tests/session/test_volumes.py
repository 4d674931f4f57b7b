"""Volumes on real sandboxes: named ones shared and outliving sandboxes, scratch ones private and
bounded, host binds only where named and read-only by default (sandpool._options_volumes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandpool import RegisteredVolumeOptions, SandboxDefaults, SandboxFailedError, ScratchVolumeOptions, Session
from sandpool._isolation import probe, volumes


@pytest.fixture
def volume_dir(tmp_path, monkeypatch):
    why = probe.unavailable("namespaces")
    if why:
        pytest.skip(f"volumes need the namespaces level: {why}")
    path = tmp_path / "volumes"
    monkeypatch.setenv("SANDPOOL_VOLUME_DIR", str(path))
    return path


@pytest.fixture
def session(volume_dir):
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as s:
        yield s


def run(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def cli(volume_dir, *args):
    return subprocess.run([sys.executable, "-m", "sandpool", "volume", *args], capture_output=True, text=True,
                          env={**os.environ, "SANDPOOL_VOLUME_DIR": str(volume_dir)}, timeout=60)


def test_a_named_volume_is_shared_and_outlives_its_sandboxes(session, volume_dir):
    """Made with 'sandpool volume create', mounted by two sandboxes at once: a write of one is read by
    the other; after both stop the files are still there for a third; 'rm' removes it."""
    assert cli(volume_dir, "create", "shared").returncode == 0
    mount = [RegisteredVolumeOptions(name="data", volume_id="shared", mount_path="/data")]
    a, b = session.sandbox(volumes=mount), session.sandbox(volumes=mount)
    assert run(a, "echo from-a > /data/note").returncode == 0
    assert run(b, "cat /data/note; echo from-b >> /data/note").stdout == "from-a\n"
    a.stop().result()
    b.stop().result()
    with open(os.path.join(volumes.data_dir("shared"), "note")) as f:
        assert f.read() == "from-a\nfrom-b\n"
    assert run(session.sandbox(volumes=mount), "cat /data/note").stdout == "from-a\nfrom-b\n"
    assert "shared" in cli(volume_dir, "ls").stdout
    assert cli(volume_dir, "rm", "shared").returncode == 0
    assert not os.path.exists(volumes.data_dir("shared"))


def test_read_only_mounts_refuse_writes(session, volume_dir, tmp_path):
    """A read-only named volume and a host bind (read-only unless asked) refuse writes inside; the
    host's files stay as they were; read_only=False on a bind lets writes through."""
    volumes.create("ro")
    host = tmp_path / "host-data"
    host.mkdir()
    (host / "f").write_text("host\n")
    sb = session.sandbox(volumes=[RegisteredVolumeOptions(name="r", volume_id="ro", mount_path="/ro", read_only=True),
                                  {"host_path": str(host), "mount_path": "/host"}])
    for path in ("/ro/x", "/host/f"):
        result = run(sb, f"echo attack > {path}")
        assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert run(sb, "cat /host/f").stdout == "host\n"
    assert (host / "f").read_text() == "host\n" and os.listdir(volumes.data_dir("ro")) == []
    writable = session.sandbox(volumes=[{"host_path": str(host), "mount_path": "/host", "read_only": False}])
    assert run(writable, "echo back > /host/new").returncode == 0
    assert (host / "new").read_text() == "back\n"


def test_a_scratch_volume_is_private_bounded_and_gone_with_its_sandbox(session):
    """A scratch volume starts empty in every sandbox, holds at most its size, and goes with it."""
    scratch = [ScratchVolumeOptions(name="s", mount_path="/scratch", size="4Mi")]
    a = session.sandbox(volumes=scratch)
    assert run(a, "echo a > /scratch/a && ls /scratch").stdout == "a\n"
    full = run(a, "dd if=/dev/zero of=/scratch/big bs=1M count=8")
    assert full.returncode != 0 and "No space left" in full.stderr
    assert run(a, "echo still > /root/ok && cat /root/ok").stdout == "still\n"
    b = session.sandbox(volumes=scratch)
    assert run(b, "ls -A /scratch").stdout == ""


def test_bad_volumes_fail_clearly(session, volume_dir):
    """A volume that does not exist, nested or reserved mount paths, and the process level, are
    refused naming the volume and the fix; other sandboxes keep working."""
    with pytest.raises(SandboxFailedError, match="sandpool volume create nope"):
        session.sandbox(volumes=[RegisteredVolumeOptions(name="n", volume_id="nope", mount_path="/n")]).wait()
    with pytest.raises(ValueError, match="inside another volume"):
        session.sandbox(volumes=[ScratchVolumeOptions(name="a", mount_path="/a"),
                                 ScratchVolumeOptions(name="b", mount_path="/a/b")])
    with pytest.raises(ValueError, match="/proc"):
        session.sandbox(volumes=[ScratchVolumeOptions(name="p", mount_path="/proc/x")])
    with pytest.raises(ValueError, match="mount_path"):
        session.sandbox(volumes=[ScratchVolumeOptions(name="p")])
    with Session(defaults=SandboxDefaults(isolation="process")) as plain:
        with pytest.raises(SandboxFailedError, match="isolation='namespaces'"):
            plain.sandbox(volumes=[ScratchVolumeOptions(name="s", mount_path="/s")]).wait()
    assert run(session.sandbox(), "echo ok").stdout == "ok\n"
