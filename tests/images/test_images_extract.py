"""Unpacking one layer: whiteouts and opaque directories in overlayfs form, hard links inside the
layer, devices skipped, setuid dropped, later entries replacing earlier ones, gzip/plain/zstd; and
an overlay of unpacked layers shows what the image means."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess

import pytest

from _sandpool_agent.confine import storage
from images_helpers import tar_layer, walk_tree
from sandpool._images import extract
from sandpool._images.errors import ImageError

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and owners need root")


def unpack(tmp_path, entries, name="layer", gz=True, compression=None) -> str:
    blob = tmp_path / f"{name}.tar"
    blob.write_bytes(tar_layer(entries, gz=gz))
    dest = tmp_path / name
    dest.mkdir()
    extract.extract(str(blob), compression or ("gzip" if gz else "none"), str(dest))
    return str(dest)


@as_root
def test_whiteouts_and_opaque_directories_become_overlayfs_markers(tmp_path):
    """'.wh.NAME' is a 0/0 character device; '.wh..wh..opq' sets trusted.overlay.opaque; neither
    marker file itself is written."""
    root = unpack(tmp_path, [("etc", "dir", None), ("etc/.wh.gone", "file", b""), ("var", "dir", None),
                             ("var/.wh..wh..opq", "file", b""), ("var/kept", "file", b"k")])
    st = os.lstat(os.path.join(root, "etc", "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(os.path.join(root, "var"), "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(os.path.join(root, "etc"))) == ["gone"]
    assert sorted(os.listdir(os.path.join(root, "var"))) == ["kept"]


@as_root
def test_an_overlay_of_layers_means_what_the_image_says(tmp_path):
    """Mounted as overlay lower layers, a whiteout deletes a lower file and an opaque directory hides
    a lower directory's entries (what a sandbox of the image sees)."""
    bottom = unpack(tmp_path, [("a", "dir", None), ("a/old", "file", b"1"), ("b", "dir", None),
                               ("b/one", "file", b"1"), ("b/two", "file", b"2"), ("d", "file", b"file"),
                               ("e", "dir", None), ("e/in", "file", b"1"), ("own", "file", b"o", 0o640, (1000, 7)),
                               ("link", "symlink", "/etc/passwd")], "bottom")
    top = unpack(tmp_path, [("a", "dir", None), ("a/.wh.old", "file", b""), ("a/new", "file", b"n"),
                            ("b", "dir", None), ("b/.wh..wh..opq", "file", b""), ("b/three", "file", b"3"),
                            ("d", "dir", None, 0o711), ("d/x", "file", b"x"), ("e", "file", b"now a file"),
                            ("c", "symlink", "a/new")], "top")
    merged = tmp_path / "merged"
    merged.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={top}:{bottom}", str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "a")) == ["new"]
        assert sorted(os.listdir(merged / "b")) == ["three"]
        seen = _listing(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    copied = tmp_path / "copied"  # the rootless fallback where overlayfs is refused: the same tree
    copied.mkdir()
    storage.copy_layers(f"{top}:{bottom}", str(copied))
    assert _listing(copied) == seen


def _listing(root) -> dict:
    """Every entry under ``root`` (relative): its type, mode, owner and content (or link target)."""
    def describe(full, st):
        body = os.readlink(full) if stat.S_ISLNK(st.st_mode) else \
            open(full, "rb").read() if stat.S_ISREG(st.st_mode) else None
        return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, body

    return {os.path.relpath(k, root): v for k, v in walk_tree(root, describe).items()}


def test_hard_links_inside_the_layer_share_one_inode(tmp_path):
    """A hard link to a file the layer wrote before is a link, not a copy."""
    root = unpack(tmp_path, [("bin", "dir", None), ("bin/tool", "file", b"#!", 0o755),
                             ("bin/alias", "hardlink", "bin/tool")])
    a, b = os.stat(os.path.join(root, "bin", "tool")), os.stat(os.path.join(root, "bin", "alias"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2


def test_devices_are_skipped_and_setuid_dropped(tmp_path):
    """Device nodes are not created; setuid/setgid bits are cleared, the sticky bit and the rest kept."""
    root = unpack(tmp_path, [("dev", "dir", None), ("dev/sda", "char", None), ("bin", "dir", None),
                             ("bin/su", "file", b"x", 0o4755), ("bin/wall", "file", b"x", 0o2755),
                             ("tmp", "dir", None, 0o1777), ("fifo", "fifo", None)])
    assert os.listdir(os.path.join(root, "dev")) == []
    assert stat.S_IMODE(os.stat(os.path.join(root, "bin", "su")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(root, "bin", "wall")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(root, "tmp")).st_mode) == 0o1777
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)


def test_later_entries_replace_earlier_ones(tmp_path):
    """A file after a directory of the same name replaces it (and a link to a replaced file is refused)."""
    root = unpack(tmp_path, [("x", "dir", None), ("x/in", "file", b"1"), ("x", "file", b"now a file"),
                             ("y", "file", b"1"), ("y", "symlink", "x")])
    with open(os.path.join(root, "x")) as f:
        assert f.read() == "now a file"
    assert os.readlink(os.path.join(root, "y")) == "x"
    with pytest.raises(extract.Refused, match="not a file of this layer"):
        unpack(tmp_path, [("f", "file", b"1"), ("f", "symlink", "/etc/passwd"), ("g", "hardlink", "f")], "relink")


def test_plain_and_zstd_layers_unpack(tmp_path):
    """Uncompressed tar and zstd layers (through the zstd tool) unpack like gzip ones."""
    root = unpack(tmp_path, [("plain", "file", b"p")], "plain", gz=False)
    assert os.listdir(root) == ["plain"]
    if shutil.which("zstd") is None:
        pytest.skip("zstd is not installed")
    raw = tmp_path / "z.tar"
    raw.write_bytes(tar_layer([("z", "file", b"zz")], gz=False))
    subprocess.run(["zstd", "-q", str(raw), "-o", str(tmp_path / "z.tar.zst")], check=True)
    dest = tmp_path / "zdest"
    dest.mkdir()
    _, diff_id = extract.extract(str(tmp_path / "z.tar.zst"), "zstd", str(dest))
    assert (dest / "z").read_bytes() == b"zz"
    assert diff_id == "sha256:" + hashlib.sha256(raw.read_bytes()).hexdigest()


def test_the_diff_id_is_the_digest_of_the_whole_uncompressed_tar(tmp_path):
    """What ``extract`` returns as the diff_id is the sha256 of every byte of the uncompressed tar,
    its trailing blocks included (what an image config's rootfs.diff_ids names)."""
    layer = tar_layer([("a", "file", b"a" * 5000), ("d", "dir", None)])
    blob = tmp_path / "l.tar.gz"
    blob.write_bytes(layer)
    dest = tmp_path / "dest"
    dest.mkdir()
    size, diff_id = extract.extract(str(blob), "gzip", str(dest))
    assert size == 5000 and diff_id == "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()


def test_a_broken_archive_is_an_image_error(tmp_path):
    """Garbage where a layer should be: ImageError naming the problem, not a tarfile traceback."""
    blob = tmp_path / "bad"
    blob.write_bytes(b"\x1f\x8b not really gzip" * 10)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ImageError, match="not a valid tar archive"):
        extract.extract(str(blob), "gzip", str(dest))
