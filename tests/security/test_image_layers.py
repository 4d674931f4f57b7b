"""Attacks through image layers, pulled from a real registry: paths with '..', a symlink (absolute or
relative) written through, a hard link out of the layer, a whiteout of '..', a tampered blob, an
oversized layer, a layer whose content is not what the config's diff_ids say. Each pull is refused,
nothing is written outside the layer store, and the store (and a sandbox of a good image) keeps
working afterwards."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest

from images_helpers import LAYER_TAR, busybox_layer, config_blob, image_env, registries, tar_layer, walk_tree
from sandpool import Session
from sandpool._images import extract, pull
from sandpool._images.errors import ImageError
from sandpool._images.store import Store
from sandpool._isolation import probe

__all__ = ["image_env", "registries"]  # fixtures


@pytest.fixture
def outside(tmp_path):
    """A directory outside the store, with one file, that no layer may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("original")
    return path


def tree(path) -> dict:
    return walk_tree(path, lambda _full, st: (st.st_mode, st.st_size, st.st_nlink, st.st_mtime_ns))


def attack(registries, store, name, entries, match, outside):
    """Push a one-layer image of ``entries`` and pull it: refused with ``match``; nothing outside
    changed, no layer of it stored, no leftovers."""
    layer = tar_layer(entries)
    registries.push.image(name, "1", [layer], config_blob())
    before = tree(outside)
    passwd = os.stat("/etc/passwd")
    with pytest.raises(ImageError, match=match):
        pull.pull(f"test.local/{name}:1", store)
    assert tree(outside) == before
    assert (outside / "victim").read_text() == "original"
    after = os.stat("/etc/passwd")
    assert (after.st_nlink, after.st_mtime_ns) == (passwd.st_nlink, passwd.st_mtime_ns)
    s = Store(store)
    assert not s.has_layer("sha256:" + hashlib.sha256(layer).hexdigest()) and s.record(f"test.local/{name}:1") is None
    assert os.listdir(s.path("tmp")) == []


def still_works(registries, store):
    """After an attack: a good image pulls, and (where namespaces work, as root or rootless) a
    sandbox of it runs."""
    registries.push.image("good", "1", [busybox_layer()], config_blob(["PATH=/bin"]))
    pull.pull("test.local/good:1", store)
    assert Store(store).record("test.local/good:1") is not None
    if probe.unavailable("namespaces") is None:
        with Session(defaults={"isolation": "namespaces"}) as session:
            assert session.sandbox(container_image="test.local/good:1").exec(["echo", "ok"]).result().stdout == "ok\n"


def test_dot_dot_paths_are_refused(registries, image_env, outside):
    """'../' in an entry name (however deep) refuses the layer."""
    up = "../" * 12 + str(outside).lstrip("/") + "/pwned"
    attack(registries, image_env, "dotdot", [("ok", "file", b"1"), (up, "file", b"x")], r"'\.\.' component", outside)
    attack(registries, image_env, "dotdot2", [("a/../../victim", "file", b"x")], r"'\.\.' component", outside)
    still_works(registries, image_env)


def test_writing_through_an_absolute_symlink_is_refused(registries, image_env, outside):
    """A symlink to a host directory, then a file under it: refused, the host directory untouched."""
    attack(registries, image_env, "abslink", [("evil", "symlink", str(outside)), ("evil/victim", "file", b"pwned")],
           "is a symlink", outside)
    attack(registries, image_env, "abslink2", [("d", "dir", None), ("d", "symlink", str(outside)),
                                               ("d/new", "file", b"pwned")], "is a symlink", outside)
    still_works(registries, image_env)


def test_writing_through_a_relative_symlink_is_refused(registries, image_env, outside):
    """A symlink climbing out with '..' targets (legal as a link), then a write through it: refused."""
    attack(registries, image_env, "rellink", [("up", "symlink", "../" * 20), ("up/" + str(outside).lstrip("/")
                                                                              + "/victim", "file", b"pwned")],
           "is a symlink", outside)
    still_works(registries, image_env)


def test_a_hard_link_out_of_the_layer_is_refused(registries, image_env, outside):
    """Hard links to host files (absolute, or climbing) are refused: the host file keeps one link."""
    attack(registries, image_env, "hardout", [("passwd", "hardlink", "/etc/passwd")], "not a file of this layer",
           outside)
    attack(registries, image_env, "hardout2", [("v", "hardlink", str(outside / "victim"))], "not a file of this layer",
           outside)
    attack(registries, image_env, "hardout3", [("v", "hardlink", "../../../etc/passwd")], r"'\.\.' component", outside)
    assert os.stat(outside / "victim").st_nlink == 1
    still_works(registries, image_env)


def test_a_whiteout_of_dot_dot_is_refused(registries, image_env, outside):
    """'.wh...' would white out the layer's parent: refused."""
    attack(registries, image_env, "whdotdot", [("x", "dir", None), ("x/.wh...", "file", b"")], "whiteout of nothing",
           outside)
    still_works(registries, image_env)


def test_a_tampered_blob_is_refused(registries, image_env, outside):
    """The registry's stored layer changed after the push: the digest check refuses it, nothing unpacked."""
    layer = tar_layer([("file", "file", b"genuine")], gz=False)
    registries.push.image("tampered", "1", [layer], config_blob(), layer_type=LAYER_TAR)
    hexdigest = hashlib.sha256(layer).hexdigest()
    [data] = glob.glob(os.path.join(os.path.dirname(registries.plain.log_path), "storage", "**", hexdigest, "data"),
                       recursive=True)
    evil = tar_layer([("file", "file", b"evil!!")], gz=False)  # a tar: the same size
    assert len(evil) == len(layer)
    with open(data, "wb") as f:
        f.write(evil)
    with pytest.raises(ImageError, match="does not match its digest"):
        pull.pull("test.local/tampered:1", image_env)
    assert not Store(image_env).has_layer("sha256:" + hexdigest)
    still_works(registries, image_env)


def test_an_oversized_layer_is_refused(registries, image_env, outside, monkeypatch):
    """A layer unpacking past the bound (a decompression bomb) is refused and removed."""
    bound = extract.MAX_LAYER_BYTES
    monkeypatch.setattr(extract, "MAX_LAYER_BYTES", 1 << 20)
    attack(registries, image_env, "bomb", [("zeros", "file", bytes(2 << 20))], "more than", outside)
    monkeypatch.setattr(extract, "MAX_LAYER_BYTES", bound)
    still_works(registries, image_env)


def test_a_layer_that_is_not_its_diff_id_is_refused(registries, image_env, outside):
    """A layer whose uncompressed content differs from what the image config's rootfs.diff_ids says
    (a forged config, or a layer swapped under a consistent manifest): the pull fails naming the
    layer, the half-unpacked layer is removed, no record is written; and an image that names a
    stored layer with a wrong diff_id is refused too, leaving the good image that stored it intact."""
    layer = tar_layer([("bin", "dir", None), ("bin/tool", "file", b"what the registry serves", 0o755)])
    claimed = "sha256:" + hashlib.sha256(b"some other tar").hexdigest()
    registries.push.image("forged", "1", [layer], config_blob(diff_ids=[claimed]), keep_diff_ids=True)
    before = tree(outside)
    s = Store(image_env)
    with pytest.raises(ImageError, match=rf"layer sha256:{hashlib.sha256(layer).hexdigest()} unpacks to sha256:"
                                         rf"[0-9a-f]{{64}}, but the image config's rootfs.diff_ids says {claimed}"):
        pull.pull("test.local/forged:1", image_env)
    assert not s.has_layer("sha256:" + hashlib.sha256(layer).hexdigest())
    assert s.record("test.local/forged:1") is None and os.listdir(s.path("tmp")) == []
    assert tree(outside) == before
    registries.push.image("honest", "1", [layer], config_blob())  # the same layer, its true diff_id
    honest = pull.pull("test.local/honest:1", image_env)
    with pytest.raises(ImageError, match="rootfs.diff_ids says"):
        pull.pull("test.local/forged:1", image_env)
    assert s.record("test.local/forged:1") is None and s.record("test.local/honest:1") == honest
    assert s.has_layer(honest.layers[0])
    still_works(registries, image_env)
