"""File operations that the kernel refuses inside a real sandbox come back as SandboxFileError with
cwsandbox's reason codes (PERMISSION_DENIED, NO_SPACE, IO_FAILED, TOO_LARGE), name the path, leave
nothing half-written behind, and the sandbox goes on working."""

from __future__ import annotations

import array
import contextlib
import fcntl
import os

import pytest

from sandpool import SandboxFileError, Session
from sandpool._isolation import probe

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10

needs_namespaces = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                      reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")


def sh(sandbox, script: str) -> str:
    result = sandbox.exec(["sh", "-c", script]).result()
    assert result.returncode == 0, result
    return result.stdout


def refused(op) -> SandboxFileError:
    with pytest.raises(SandboxFileError) as info:
        op().result()
    return info.value


@contextlib.contextmanager
def immutable(path: str):
    """The host's immutable attribute on ``path`` (as chattr +i), cleared again on leaving."""
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = array.array("i", [0])
        try:
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags[0] | FS_IMMUTABLE_FL]))
        except OSError as exc:
            pytest.skip(f"the state directory's file system has no immutable attribute: {exc}")
        try:
            yield
        finally:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags[0]]))
    finally:
        os.close(fd)


def test_permission_denied_on_a_file_the_kernel_will_not_replace():
    """An immutable file (EPERM even for root): write_file fails with PERMISSION_DENIED naming the
    path, the file keeps its contents, no temporary file is left; other writes still work."""
    with Session(defaults={"isolation": "process"}) as s:
        sb = s.sandbox()
        sb.write_file("/data/locked", b"v1").result()
        host_file = os.path.join(sb._record.root, "data", "locked")
        with immutable(host_file):
            error = refused(lambda: sb.write_file("/data/locked", b"v2"))
            assert error.reason == "CWSANDBOX_FILE_PERMISSION_DENIED" and "/data/locked" in str(error), error
            assert sb.read_file("/data/locked").result() == b"v1"
            assert sorted(os.listdir(os.path.dirname(host_file))) == ["locked"]  # no temporary file left
        sb.write_file("/data/locked", b"v3").result()
        assert sb.read_file("/data/locked").result() == b"v3"


@needs_namespaces
def test_no_space_in_a_full_tmp_and_the_partial_file_is_removed():
    """/tmp is a tmpfs of the sandbox's ephemeral-storage limit (1 MiB here): a 2 MiB write_file
    fails with NO_SPACE, leaves /tmp empty, and a small write afterwards succeeds."""
    with Session(defaults={"isolation": "namespaces"}) as s:
        sb = s.sandbox(resources={"limits": {"ephemeral-storage": "1Mi"}})
        error = refused(lambda: sb.write_file("/tmp/big", b"x" * (2 << 20)))
        assert error.reason == "CWSANDBOX_FILE_NO_SPACE" and "/tmp/big" in str(error), error
        assert "big" not in sh(sb, "ls -A /tmp")  # neither the file nor its temporary twin
        sb.write_file("/tmp/small", b"fits").result()
        assert sh(sb, "cat /tmp/small") == "fits"


def test_io_failed_when_a_parent_is_a_file():
    """A path through a regular file (ENOTDIR) is IO_FAILED, for reads and writes alike."""
    with Session() as s:
        sb = s.sandbox()
        sb.write_file("/work/plain", b"a file").result()
        for op in (lambda: sb.write_file("/work/plain/child", b"x"), lambda: sb.read_file("/work/plain/child")):
            error = refused(op)
            assert error.reason == "CWSANDBOX_FILE_IO_FAILED" and "/work/plain/child" in str(error), error
        assert sb.read_file("/work/plain").result() == b"a file"


@needs_namespaces
def test_io_failed_on_a_read_only_file_system():
    """/sys is mounted read-only in the sandbox: a write there is IO_FAILED (EROFS), not a crash."""
    with Session(defaults={"isolation": "namespaces"}) as s:
        sb = s.sandbox()
        error = refused(lambda: sb.write_file("/sys/sandpool-test", b"x"))
        assert error.reason == "CWSANDBOX_FILE_IO_FAILED" and "Read-only file system" in str(error), error
        assert sb.exec(["true"]).result().returncode == 0


def test_too_large_to_read_is_refused_before_reading():
    """A file larger than a read may return (an 8 GiB sparse file here) is refused with TOO_LARGE,
    saying its size and the limit, without reading it; smaller reads still work."""
    with Session() as s:
        sb = s.sandbox()
        sh(sb, "truncate -s 8G huge && echo small > small")
        error = refused(lambda: sb.read_file("huge"))
        assert error.reason == "CWSANDBOX_FILE_TOO_LARGE" and "8589934592 bytes exceeds" in str(error), error
        assert sb.read_file("small").result() == b"small\n"
