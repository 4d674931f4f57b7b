"""Volumes of a sandpool server's sandboxes (the remote runtime): ``volumes=`` travels to ``sandpool
serve``, whose own volume store backs named volumes (``sandpool volume create`` on the server's host);
scratch volumes are per sandbox there; a client never gets a host directory of the server bound."""

from __future__ import annotations

import os

import pytest

from sandpool import CWSandboxAuthenticationError, RegisteredVolumeOptions, ScratchVolumeOptions, Session
from sandpool._isolation import probe, volumes

from service_helpers import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    why = probe.unavailable("namespaces")
    if why:
        pytest.skip(f"volumes need the namespaces level: {why}")
    work = tmp_path_factory.mktemp("serve-vol")
    saved = os.environ.get("SANDPOOL_VOLUME_DIR")
    os.environ["SANDPOOL_VOLUME_DIR"] = str(work / "volumes")  # the server's (inherited) and this process's
    try:
        with ServerProcess(str(work)) as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("SANDPOOL_VOLUME_DIR", None)
        else:
            os.environ["SANDPOOL_VOLUME_DIR"] = saved


def _sh(sb, script: str):
    return sb.exec(["sh", "-c", script]).result()


def test_named_and_scratch_volumes_of_server_sandboxes(server):
    """Two server sandboxes share a named volume, which outlives them; read-only refuses writes; a
    scratch volume is private to its sandbox; a host bind is refused by the server."""
    volumes.create("remote-shared")
    try:
        with Session(address=server.address) as s:
            mount = [RegisteredVolumeOptions(name="d", volume_id="remote-shared", mount_path="/data")]
            a, b = s.sandbox(volumes=mount), s.sandbox(volumes=mount)
            assert _sh(a, "echo from-a > /data/note").returncode == 0
            assert _sh(b, "cat /data/note").stdout == "from-a\n"
            a.stop().result()
            b.stop().result()
            ro = s.sandbox(volumes=[RegisteredVolumeOptions(name="d", volume_id="remote-shared", mount_path="/data",
                                                            read_only=True)])
            refused = _sh(ro, "echo x > /data/other")
            assert refused.returncode != 0 and "Read-only file system" in refused.stderr
            assert _sh(ro, "cat /data/note").stdout == "from-a\n"
            scratch = [ScratchVolumeOptions(name="s", mount_path="/scratch", size="4Mi")]
            x, y = s.sandbox(volumes=scratch), s.sandbox(volumes=scratch)
            assert _sh(x, "echo x > /scratch/x && ls /scratch").stdout == "x\n"
            assert _sh(y, "ls -A /scratch").stdout == ""
            with pytest.raises(CWSandboxAuthenticationError, match="never does for a client"):
                s.sandbox(volumes=[{"host_path": "/etc", "mount_path": "/hostetc"}]).start().result()
            assert _sh(s.sandbox(), "echo still serving").stdout == "still serving\n"
        with open(os.path.join(volumes.data_dir("remote-shared"), "note")) as f:
            assert f.read() == "from-a\n"
    finally:
        volumes.remove("remote-shared")
