"""Snapshots and forks on real sandboxes: what a restore sees, that copies never share changes, and
that the store keeps one copy however many sandboxes run on it (docs/snapshots.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import sandpool
from sandpool import (
    FileSystemSnapshotTrigger,
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    Session,
    SnapshotNotFoundError,
    SnapshotNotSupportedError,
)
from sandpool._isolation import probe
from sandpool._isolation.snapshots import store

#: How long a test waits for a condition it polls inside a sandbox (a real clock: the writer runs freely).
POLL_SECONDS = 30.0


@pytest.fixture
def image_dir(tmp_path, monkeypatch):
    """An image store of this test's own, so its snapshots are its own."""
    why = probe.unavailable("namespaces")
    if why or probe.rootless():
        pytest.skip(f"snapshots need the namespaces level as root: {why or 'rootless here'}")
    path = tmp_path / "images"
    monkeypatch.setenv("SANDPOOL_IMAGE_DIR", str(path))
    return path


@pytest.fixture
def session(image_dir):
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as s:
        yield s


def sh(sandbox, script: str) -> str:
    result = sandbox.exec(["sh", "-c", script]).result()
    assert result.returncode == 0, result.stderr
    return result.stdout


def poll(sandbox, script: str, until) -> str:
    """Run ``script`` until ``until(stdout)`` holds (bounded by POLL_SECONDS); its last output."""
    deadline = time.monotonic() + POLL_SECONDS
    while True:
        out = sandbox.exec(["sh", "-c", script]).result().stdout
        if until(out) or time.monotonic() > deadline:
            return out


def test_restored_copies_are_isolated_both_ways(session):
    """Two restores see the snapshot (new files, changed and deleted ones); a change in either, or
    in the source after the snapshot, reaches none of the others."""
    src = session.sandbox()
    sh(src, "echo v1 > /root/state; mkdir -p /opt/app; echo code > /opt/app/main; echo extra >> /etc/issue;"
            "echo gone > /var/tmp/gone; rm /var/tmp/gone; rm -f /etc/motd")
    snapshot_id = src.snapshot().result()
    sh(src, "echo source-after > /root/state")
    a, b = session.sandbox(restore_from_snapshot_id=snapshot_id), session.sandbox(file_system_snapshot_id=snapshot_id)
    for copy in (a, b):
        assert sh(copy, "cat /root/state /opt/app/main; tail -1 /etc/issue") == "v1\ncode\nextra\n"
        assert sh(copy, "test ! -e /etc/motd && test ! -e /var/tmp/gone && echo absent") == "absent\n"
    sh(a, "echo from-a > /root/state; echo a > /opt/app/only-a")
    assert sh(b, "cat /root/state; ls /opt/app") == "v1\nmain\n"
    assert sh(src, "cat /root/state; ls /opt/app") == "source-after\nmain\n"
    assert sh(a, "cat /root/state") == "from-a\n"


def test_snapshot_while_a_process_writes(session):
    """A snapshot taken while a process appends numbered lines holds a clean prefix of them (the
    sandbox stands still during the copy), and the writer goes on afterwards."""
    src = session.sandbox()
    src.exec(["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i >> /root/log; done"])
    poll(src, "wc -l < /root/log", lambda out: int(out or 0) >= 2000)
    snapshot_id = src.snapshot().result()
    lines = sh(session.sandbox(restore_from_snapshot_id=snapshot_id), "cat /root/log").splitlines()
    assert len(lines) >= 2000
    assert lines == [str(i) for i in range(1, len(lines) + 1)]
    after = poll(src, "wc -l < /root/log", lambda out: int(out or 0) > len(lines))
    assert int(after) > len(lines)


def test_restore_after_the_source_is_gone(image_dir):
    """A snapshot outlives its sandbox and its session: a later session restores it."""
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as first:
        src = first.sandbox()
        sh(src, "echo kept > /root/kept")
        snapshot_id = src.snapshot().result()
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as second:
        assert sh(second.sandbox(restore_from_snapshot_id=snapshot_id), "cat /root/kept") == "kept\n"


def test_twenty_concurrent_restores_share_one_stored_layer(session):
    """20 sandboxes start at once from one snapshot of 10 MiB; each sees it and writes alone; the
    store holds the layer once."""
    src = session.sandbox()
    sh(src, "head -c 10485760 /dev/urandom > /root/blob; md5sum /root/blob > /root/blob.md5")
    snapshot_id = src.snapshot().result()
    copies = [session.sandbox(restore_from_snapshot_id=snapshot_id) for _ in range(20)]
    sandpool.wait(copies)
    refs = [c.exec(["sh", "-c", f"md5sum -c /root/blob.md5 >/dev/null && echo {i} > /root/mine && cat /root/mine"])
            for i, c in enumerate(copies)]
    assert [r.result().stdout for r in refs] == [f"{i}\n" for i in range(20)]
    layers = os.listdir(os.path.join(store().base, "layers"))
    assert len(layers) == 1
    assert sh(src, "test ! -e /root/mine && echo clean") == "clean\n"


def test_stop_with_snapshot_on_stop_fills_the_id(session):
    """stop(snapshot_on_stop=True) snapshots, then stops; the id is on the sandbox and in the store."""
    sb = session.sandbox(tags=["stopped"])
    sh(sb, "echo last > /root/last")
    assert sb.file_system_snapshot_id is None
    sb.stop(snapshot_on_stop=True).result()
    assert sb.status == sandpool.SandboxStatus.TERMINATED
    snapshot_id = sb.file_system_snapshot_id
    described = Sandbox.get_snapshot(snapshot_id).result()
    assert described.trigger == FileSystemSnapshotTrigger.ON_DELETE and described.source_sandbox_id == sb.sandbox_id
    assert sh(session.sandbox(restore_from_snapshot_id=snapshot_id), "cat /root/last") == "last\n"


def test_fork_gives_running_copies_with_spec_and_tags(session):
    """fork(3) returns three running sandboxes with the source's files, spec and tags, each on its own."""
    src = session.sandbox(tags=["parent"], environment_variables={"WHO": "fork"})
    sh(src, "echo base > /root/f")
    forks = src.fork(3).result()
    assert len(forks) == 3 and all(f.status == sandpool.SandboxStatus.RUNNING for f in forks)
    assert all(f.tags == ("parent",) for f in forks)
    assert [sh(f, "cat /root/f; echo $WHO") for f in forks] == ["base\nfork\n"] * 3
    sh(forks[0], "echo changed > /root/f")
    assert sh(forks[1], "cat /root/f") == "base\n" and sh(src, "cat /root/f") == "base\n"
    with pytest.raises(ValueError, match="fork"):
        src.fork(0)


def test_a_snapshot_of_a_restored_sandbox_stacks_its_layers(session):
    """A restore's snapshot holds both generations: changes and deletions of each."""
    first = session.sandbox()
    sh(first, "echo one > /root/one; echo two > /root/two")
    gen1 = first.snapshot().result()
    second = session.sandbox(restore_from_snapshot_id=gen1)
    sh(second, "rm /root/two; echo three > /root/three")
    gen2 = second.snapshot().result()
    assert len(store().get(gen2).layers) == 2
    assert sh(session.sandbox(restore_from_snapshot_id=gen2), "ls /root | grep -v '^[.]'") == "one\nthree\n"


def test_snapshot_of_an_imported_image(session, image_dir, tmp_path):
    """An image's sandbox: the snapshot layer goes over the image's own layer; the image matters."""
    from sandpool._isolation import images
    from images_helpers import busybox_layer

    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(busybox_layer())
    images.import_tarball("tiny:snap", str(tarball), str(image_dir))
    src = session.sandbox(container_image="tiny:snap")
    sh(src, "echo img > /etc/marker; rm /etc/passwd")
    snapshot_id = src.snapshot().result()
    copy = session.sandbox(container_image="tiny:snap", restore_from_snapshot_id=snapshot_id)
    assert sh(copy, "cat /etc/marker; test ! -e /etc/passwd && echo no-passwd") == "img\nno-passwd\n"
    with pytest.raises(SandboxFailedError, match="container_image='tiny:snap'"):
        session.sandbox(restore_from_snapshot_id=snapshot_id).wait()


def test_get_list_and_delete_snapshots(session):
    """The store's methods: list (by source), get, delete; a deleted snapshot cannot be restored."""
    sb = session.sandbox()
    first, second = sb.snapshot().result(), sb.snapshot().result()
    listed = Sandbox.list_snapshots(source_sandbox_id=sb.sandbox_id).result()
    assert [s.file_system_snapshot_id for s in listed] == [first, second]
    assert Sandbox.list_snapshots(source_sandbox_id="sb-00000000").result() == []
    Sandbox.delete_snapshot(first).result()
    with pytest.raises(SnapshotNotFoundError):
        Sandbox.get_snapshot(first).result()
    with pytest.raises(SnapshotNotFoundError):
        Sandbox.delete_snapshot(first).result()
    assert Sandbox.delete_snapshot(first, missing_ok=True).result() is None
    with pytest.raises(SandboxFailedError, match="does not exist"):
        session.sandbox(restore_from_snapshot_id=first).wait()
    assert Sandbox.get_snapshot(second).result().file_system_snapshot_id == second


def test_delete_keeps_a_layer_a_sandbox_runs_on(session):
    """Deleting a snapshot removes its layer at once when nothing runs on it; a layer a running
    sandbox was restored from stays (that sandbox keeps its files) until nothing has it mounted."""
    sb = session.sandbox()
    sh(sb, "echo x > /root/x")
    unused, used = sb.snapshot().result(), sb.snapshot().result()  # the same content: one layer
    layers = os.path.join(store().base, "layers")
    Sandbox.delete_snapshot(unused).result()
    assert len(os.listdir(layers)) == 1  # still named by the other record
    user = session.sandbox(restore_from_snapshot_id=used)
    sh(user, "true")
    Sandbox.delete_snapshot(used).result()
    assert sh(user, "cat /root/x") == "x\n" and len(os.listdir(layers)) == 1
    sh(sb, "echo y > /root/y")
    solo = sb.snapshot().result()
    assert len(os.listdir(layers)) == 2
    Sandbox.delete_snapshot(solo).result()  # nothing ran on it: gone at once
    assert len(os.listdir(layers)) == 1


def test_process_level_refuses_snapshots_clearly(image_dir):
    """At the process level a snapshot, and a restore, are refused, naming the level to use."""
    with Session(defaults=SandboxDefaults(isolation="process")) as s:
        sb = s.sandbox()
        with pytest.raises(SnapshotNotSupportedError, match="isolation='namespaces'"):
            sb.snapshot().result()
        assert sh(sb, "echo alive") == "alive\n"
        with pytest.raises(SandboxFailedError, match="isolation='namespaces'"):
            s.sandbox(restore_from_snapshot_id="snap-0123456789abcdef").wait()


def test_cli_lists_and_removes_snapshots(session, image_dir):
    """'sandpool snapshots ls -o json' shows a snapshot; 'rm' removes it; a bad id fails clearly."""
    snapshot_id = session.sandbox().snapshot().result()
    env = {**os.environ, "SANDPOOL_IMAGE_DIR": str(image_dir)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sandpool", "snapshots", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    listed = json.loads(cli("ls", "-o", "json").stdout)
    assert [r["snapshot_id"] for r in listed] == [snapshot_id]
    assert cli("rm", snapshot_id).returncode == 0
    assert json.loads(cli("ls", "-o", "json").stdout) == []
    bad = cli("rm", "../../etc")
    assert bad.returncode == 1 and "snap-" in bad.stderr


@pytest.mark.needs_root("the oci level runs only as root")
def test_oci_level_snapshots_and_restores(image_dir):
    """At the oci level a snapshot is read through crun's mount namespace; its restores are isolated."""
    why = probe.unavailable("oci")
    if why:
        pytest.skip(f"oci level unavailable: {why}")
    with Session(defaults=SandboxDefaults(isolation="oci")) as s:
        src = s.sandbox()
        sh(src, "echo oci > /root/o; rm -f /etc/motd")
        snapshot_id = src.snapshot().result()
        a, b = s.sandbox(restore_from_snapshot_id=snapshot_id), s.sandbox(restore_from_snapshot_id=snapshot_id)
        assert sh(a, "cat /root/o; test ! -e /etc/motd && echo gone") == "oci\ngone\n"
        sh(a, "echo a > /root/o")
        assert sh(b, "cat /root/o") == "oci\n" and sh(src, "cat /root/o") == "oci\n"


KILLED_CLIENT = """
import sys, time, sandpool
from sandpool import ScratchVolumeOptions
with sandpool.Session(defaults={"isolation": "namespaces"}) as s:
    src = s.sandbox(volumes=[ScratchVolumeOptions(name="s", mount_path="/scratch", size="4Mi")])
    src.exec(["sh", "-c", "echo x > /root/x; echo y > /scratch/y"]).result()
    copy = s.sandbox(restore_from_snapshot_id=src.snapshot().result(),
                     volumes=[ScratchVolumeOptions(name="s", mount_path="/scratch", size="4Mi")])
    copy.exec(["true"]).result()
    print("ready", flush=True)
    time.sleep(300)
"""


def test_a_sigkilled_client_leaves_nothing_of_snapshots_or_volumes(image_dir, tmp_path):
    """SIGKILL a client running a restored sandbox with a scratch volume: nothing of either is left
    (processes, mounts, directories), the layer's lock is free again (prune can remove it once its
    snapshot is deleted), and a copy a killed client left in the store goes when a runtime opens."""
    import signal

    from sandpool import testing

    state_dir = str(tmp_path / "state")
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir, "SANDPOOL_IMAGE_DIR": str(image_dir)}
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert client.stdout.readline().strip() == "ready"
    finally:
        client.kill()
        client.wait()
    assert client.returncode == -signal.SIGKILL
    report = testing.wait_for_no_leftovers(state_dir, timeout=10)
    assert not report, report
    (snapshot,) = store().records()
    stale = os.path.join(store().base, "tmp", f"{client.pid}-abandoned")
    os.makedirs(os.path.join(stale, "upper"))
    Sandbox.delete_snapshot(snapshot.snapshot_id).result()
    assert os.listdir(os.path.join(store().base, "layers")) == []
    opened = subprocess.run([sys.executable, "-c", "import sandpool\nwith sandpool.Session() as s:\n"
                             "    s.sandbox().exec(['true']).result()"], env=env, timeout=60)
    assert opened.returncode == 0 and not os.path.exists(stale)
    assert not testing.wait_for_no_leftovers(state_dir, timeout=10)
