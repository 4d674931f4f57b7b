"""File paths inside a sandbox are confined to its root."""

import os

import pytest

from _sandpool_agent.files import FileOpError, confine, read_file, write_file


def test_absolute_and_relative_paths_map_into_root(tmp_path):
    """'/a/b' starts at the root, 'a/b' at the working directory."""
    root, cwd = str(tmp_path), str(tmp_path / "work")
    assert confine(root, cwd, "/a/b") == os.path.join(root, "a", "b")
    assert confine(root, cwd, "a/b") == os.path.join(cwd, "a", "b")


@pytest.mark.parametrize("path", ["../../etc/passwd", "/../../etc/passwd", "link/passwd", "up/up/etc/passwd",
                                  "/d/../up/etc/passwd"])
def test_escapes_are_refused(tmp_path, path):
    """'..' and symlinks (absolute, or relative ones climbing out) that leave the root are refused
    with a clear reason."""
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "up").symlink_to("..")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileOpError) as info:
        confine(str(tmp_path), str(tmp_path), path)
    assert info.value.reason == "CWSANDBOX_FILE_OUTSIDE_SANDBOX"


def test_write_then_read_and_errors(tmp_path):
    """Writes create parents atomically; reads report missing files and directories by reason."""
    root = str(tmp_path)
    write_file(root, root, "/d/e/f.bin", b"\x00\x01")
    assert read_file(root, root, "/d/e/f.bin", 100) == b"\x00\x01"
    assert not [n for n in os.listdir(tmp_path / "d" / "e") if n.endswith(".tmp")]
    for path, reason in [("/missing", "CWSANDBOX_FILE_NOT_FOUND"), ("/d", "CWSANDBOX_FILE_IS_DIRECTORY")]:
        with pytest.raises(FileOpError) as info:
            read_file(root, root, path, 100)
        assert info.value.reason == reason
    with pytest.raises(FileOpError) as info:
        read_file(root, root, "/d/e/f.bin", 1)
    assert info.value.reason == "CWSANDBOX_FILE_TOO_LARGE"
