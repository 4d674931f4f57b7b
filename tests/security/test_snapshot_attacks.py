"""Attacks through snapshots and volumes: ids and names that are paths, binds and sub-paths that lead
elsewhere, snapshot contents made to mislead the host (symlinks, setuid bits, sparse files), and the
descriptor through which the client reads a sandbox's writable layer. Each is refused or contained,
and the sandbox (and its neighbours) keep working."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from sandpool import (
    RegisteredVolumeOptions,
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    SandboxSnapshotError,
    Session,
)
from sandpool._images.snapshots import SnapshotStore
from sandpool._isolation import probe, volumes
from sandpool._isolation.snapshots import store

pytestmark = pytest.mark.needs_root("snapshots and volumes need the namespaces level as root (rootless sandboxes refuse "
                                    "snapshots: their template holds no descriptor of their writable layer)")


@pytest.fixture
def session(tmp_path, monkeypatch):
    why = probe.unavailable("namespaces")
    if why or probe.rootless():
        pytest.skip(f"snapshots need the namespaces level as root: {why or 'rootless here'}")
    monkeypatch.setenv("SANDPOOL_IMAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("SANDPOOL_VOLUME_DIR", str(tmp_path / "volumes"))
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as s:
        yield s


def run(sandbox, script: str):
    return sandbox.exec(["sh", "-c", script]).result()


def alive(session) -> None:
    assert run(session.sandbox(), "echo alive").stdout == "alive\n"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "snap-../../x", "snap-0123456789abcdef/..", ""])
def test_snapshot_ids_that_are_paths_are_refused(session, bad):
    """A snapshot id with '..' or a path is refused before anything is read, by every entry point."""
    with pytest.raises(ValueError, match="snap-"):
        session.sandbox(restore_from_snapshot_id=bad)
    with pytest.raises(ValueError, match="snap-"):
        Sandbox.get_snapshot(bad)
    with pytest.raises(ValueError, match="snap-"):
        Sandbox.delete_snapshot(bad)
    done = subprocess.run([sys.executable, "-m", "sandpool", "snapshots", "rm", bad or "''"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 1 and "snap-" in done.stderr
    assert os.path.exists("/etc/passwd")
    alive(session)


@pytest.mark.parametrize("bad", ["a/b", "../x", "..", "/etc"])
def test_volume_names_with_slashes_are_refused(session, tmp_path, bad):
    """A volume name with '/' or '..' is refused by the option, the store and the CLI; nothing is
    made outside the volume store."""
    with pytest.raises(ValueError, match="no '/'"):
        session.sandbox(volumes=[RegisteredVolumeOptions(name="v", volume_id=bad, mount_path="/v")])
    with pytest.raises(ValueError, match="no '/'"):
        volumes.create(bad)
    done = subprocess.run([sys.executable, "-m", "sandpool", "volume", "create", bad], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ))
    assert done.returncode == 1 and "no '/'" in done.stderr
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "a")
    alive(session)


def test_binds_of_anything_but_the_named_directory_are_refused(session, tmp_path):
    """host_path through a symlink (to /etc), with '..', or holding sandpool's state is refused
    with the reason; a sub_path that another sandbox turned into a symlink to / fails the start
    instead of showing the host's root."""
    (tmp_path / "real").mkdir()
    os.symlink("/etc", tmp_path / "link")
    with pytest.raises(SandboxFailedError, match="symlink"):
        session.sandbox(volumes=[{"host_path": str(tmp_path / "link"), "mount_path": "/x"}]).wait()
    with pytest.raises(ValueError, match="'..'"):
        session.sandbox(volumes=[{"host_path": f"{tmp_path}/real/../link", "mount_path": "/x"}])
    with pytest.raises(SandboxFailedError, match="sandpool's own state"):
        session.sandbox(volumes=[{"host_path": "/", "mount_path": "/x"}]).wait()
    with pytest.raises(ValueError, match="sub_path"):
        session.sandbox(volumes=[RegisteredVolumeOptions(name="v", volume_id="v", mount_path="/v", sub_path="../..")])

    volumes.create("shared")
    writer = session.sandbox(volumes=[RegisteredVolumeOptions(name="v", volume_id="shared", mount_path="/v")])
    assert run(writer, "ln -s / /v/escape && mkdir /v/sub && ln -s /etc /v/sub/deeper").returncode == 0
    for sub in ("escape", "sub/deeper"):
        victim = session.sandbox(volumes=[RegisteredVolumeOptions(name="v", volume_id="shared", mount_path="/v",
                                                                  sub_path=sub)])
        with pytest.raises(SandboxFailedError, match="symlink"):
            victim.wait()
    assert run(writer, "ls /v").stdout == "escape\nsub\n"
    alive(session)


def test_a_snapshot_cannot_redirect_the_next_roots_mounts(session):
    """A sandbox replaces /var/tmp (a directory its root is built with) by a symlink to /etc and
    snapshots: the restore is refused (the host's /etc is never chmod'ed or mounted on), and a
    symlink to a host secret in a snapshot stays a symlink that resolves inside the sandbox."""
    host_mode = os.stat("/etc").st_mode
    src = session.sandbox()
    assert run(src, "ln -s /etc/shadow /root/secret && rm -rf /var/tmp && ln -s /etc /var/tmp").returncode == 0
    snapshot_id = src.snapshot().result()
    with pytest.raises(SandboxFailedError, match="symlink at /var/tmp"):
        session.sandbox(restore_from_snapshot_id=snapshot_id).wait()
    assert os.stat("/etc").st_mode == host_mode

    clean = session.sandbox()
    assert run(clean, "ln -s /etc/shadow /root/secret").returncode == 0
    copy = session.sandbox(restore_from_snapshot_id=clean.snapshot().result())
    result = run(copy, "cat /root/secret")
    assert result.returncode != 0 and result.stdout == ""
    layer = store().get(copy.spec.restore_from_snapshot_id).layers[0]
    assert os.readlink(os.path.join(store().layer_part(layer, "root"), "root", "secret")) == "/etc/shadow"
    alive(session)


def test_snapshot_contents_cannot_harm_the_hosts_disk(session):
    """In the stored layer a setuid file the sandbox made has no setuid bit, and a 1 TiB sparse
    file takes its few written blocks, not a terabyte of the host's disk."""
    src = session.sandbox()
    script = ("cp /bin/true /root/suid && chmod 4755 /root/suid && truncate -s 1T /root/sparse && "
              "echo end | dd of=/root/sparse bs=1 seek=1000000 conv=notrunc 2>/dev/null")
    assert run(src, script).returncode == 0
    snap = store().get(src.snapshot().result())
    root = os.path.join(store().layer_part(snap.layers[0], "root"), "root")
    assert not os.stat(os.path.join(root, "suid")).st_mode & (stat.S_ISUID | stat.S_ISGID)
    sparse = os.stat(os.path.join(root, "sparse"))
    assert sparse.st_size == 2**40 and sparse.st_blocks * 512 < 2**20
    assert stat.S_IMODE(os.stat(store().base).st_mode) == 0o700
    copy = session.sandbox(restore_from_snapshot_id=snap.snapshot_id)
    assert run(copy, "dd if=/root/sparse bs=1 skip=1000000 count=3 2>/dev/null").stdout == "end"
    alive(session)


#: Every descriptor of every process of the sandbox that leads to a directory holding ``upper`` or
#: ``tmp``: the root of a sandbox's writable tmpfs (its own or another's).
STORAGE_FDS = "for f in /proc/[0-9]*/fd/*; do { [ -d \"$f/upper\" ] || [ -d \"$f/tmp\" ]; } && echo $f; done; true"


def test_the_writable_layer_is_held_outside_every_sandbox(session):
    """The descriptor of a sandbox's writable tmpfs (for snapshots) is held by its template, outside
    the sandbox: no process of any sandbox, this one's or a neighbour's (handed a spare or forked,
    started before or after), has a descriptor of one, nor does the agent hold any host file (a
    restored sandbox's layer locks are the client's). Killing everything it can from inside leaves
    snapshots working."""
    src = session.sandbox()
    assert run(src, "echo mine > /root/marker").returncode == 0
    sb = session.sandbox(restore_from_snapshot_id=src.snapshot().result())
    later = [session.sandbox() for _ in range(3)]
    for box in [src, sb, *later]:
        result = run(box, STORAGE_FDS)
        assert result.returncode == 0 and result.stdout == "", result
        links = run(box, "for f in /proc/1/fd/*; do readlink $f; done").stdout.split()
        assert not [link for link in links if link.startswith("/") and "null" not in link], links
    assert run(sb, "kill -9 -1; true").returncode in (0, -9, 137)
    again = session.sandbox(restore_from_snapshot_id=sb.snapshot().result())
    assert run(again, "cat /root/marker").stdout == "mine\n"
    assert run(sb, "echo still").stdout == "still\n"
    alive(session)


def test_the_store_refuses_forged_records(tmp_path):
    """A record file naming a layer outside the store (a path, '..') is not a snapshot."""
    snaps = SnapshotStore(str(tmp_path))
    snaps.ensure()
    forged = {"snapshot_id": "snap-0123456789abcdef", "layers": ["../../../etc"], "image": "host", "base_lower": "/",
              "view": True, "source_sandbox_id": "sb-1", "trigger": "manual", "created": 0, "size_bytes": 0,
              "seconds": 0}
    import json

    with open(snaps.path("records", "snap-0123456789abcdef.json"), "w") as f:
        json.dump(forged, f)
    assert snaps.records() == []
    with pytest.raises(Exception, match="does not exist"):
        snaps.get("snap-0123456789abcdef")
    with pytest.raises(ValueError, match="64 hex"):
        snaps.layer_part("../../etc", "upper")


@pytest.mark.needs_root("the server runs as root, as deployed")
def test_a_server_binds_no_host_directory_for_a_client(tmp_path):
    """A client of 'sandpool serve' asking for a host bind (here of /etc, read-write) is refused with
    permission denied; the server's scratch volumes still work for it."""
    from service_helpers import ServerProcess

    from sandpool import ScratchVolumeOptions

    if probe.unavailable("namespaces"):
        pytest.skip("the server's sandboxes need the namespaces level")
    with ServerProcess(str(tmp_path)) as srv, Session(address=srv.address) as s:
        attack = s.sandbox(volumes=[{"host_path": "/etc", "mount_path": "/hostetc", "read_only": False}])
        with pytest.raises(Exception, match="permission denied.*host_path"):
            attack.wait()
        ok = s.sandbox(volumes=[ScratchVolumeOptions(name="s", mount_path="/scratch", size="1Mi")])
        assert run(ok, "echo fine > /scratch/f && cat /scratch/f").stdout == "fine\n"
        snap = ok.snapshot().result()  # the server snapshots its sandbox; the volume is not part of it
        assert run(s.sandbox(restore_from_snapshot_id=snap), "ls -A /scratch").stdout == ""  # the mount point only
        Sandbox.delete_snapshot(snap).result()
        assert run(ok, "cat /scratch/f").stdout == "fine\n"
