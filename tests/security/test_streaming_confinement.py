"""Attacks on the chunked file frames and the terminal frames: each is contained, and the sandbox
(and its neighbour) keep working afterwards."""

import pytest

from sandpool import SandboxFileError


def _link(sandbox, target: str, name: str) -> None:
    """A symlink at /<name> inside the sandbox pointing at ``target``."""
    sandbox.exec(["sh", "-c", f'cd "${{SANDPOOL_ROOT:-/}}" && ln -sf {target} {name}']).result()


def test_streamed_read_through_a_symlink_cannot_leave_the_sandbox(contained):
    """A symlink to a host file (/etc/hostname) read chunk by chunk is refused as outside the sandbox,
    or reads the sandbox's own file of that name, never the host's."""
    sb, neighbour = contained.sandbox(), contained.sandbox()
    _link(sb, "/etc/hostname", "escape")
    with open("/etc/hostname", "rb") as f:
        host_bytes = f.read()
    try:
        data = b"".join(sb.read_file_streaming("/escape"))
    except SandboxFileError as exc:
        assert exc.reason in ("CWSANDBOX_FILE_OUTSIDE_SANDBOX", "CWSANDBOX_FILE_NOT_FOUND")
    else:
        inside = sb.exec(["cat", "/etc/hostname"]).result().stdout_bytes
        assert data == inside  # the sandbox's own view, whatever the host holds
        assert sb.isolation != "process" or data != host_bytes
    assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"
    assert neighbour.exec(["echo", "ok"]).result().stdout == "ok\n"


def test_streamed_write_through_a_symlink_cannot_touch_the_host(contained, tmp_path):
    """A chunked write through a symlink to a host file leaves the host file unchanged."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    sb = contained.sandbox()
    _link(sb, str(victim), "out")
    try:
        sb.write_file_streaming("/out", [b"x" * 10, b"y" * 10]).result()
    except SandboxFileError as exc:
        assert exc.reason in ("CWSANDBOX_FILE_OUTSIDE_SANDBOX", "CWSANDBOX_FILE_NOT_FOUND",
                              "CWSANDBOX_FILE_PERMISSION_DENIED", "CWSANDBOX_FILE_IO_FAILED")
    assert victim.read_bytes() == b"original"
    assert sb.exec(["echo", "ok"]).result().stdout == "ok\n"


def test_forged_terminal_and_chunk_frames_are_refused_at_the_boundary(contained):
    """Frames a client cannot build through the API (a resize for a process that does not exist, a
    zero-sized terminal, a negative offset, a zero length) are refused or ignored; nothing else changes."""
    from sandpool import ProtocolError
    from _sandpool_agent import wire as _wire
    from sandpool._core.opref import OperationRef

    for frame in ({"t": "exec", "id": 1, "argv": ["true"], "tty": [0, 24]},
                  {"t": "read_file", "id": 1, "path": "/x", "offset": -1},
                  {"t": "read_file", "id": 1, "path": "/x", "offset": 0, "length": 0},
                  {"t": "resize", "id": 1, "cols": 80, "rows": 70000}):
        with pytest.raises(ProtocolError):
            _wire.validate(frame)
    sb = contained.sandbox()
    sb.wait()

    async def stray_resize():
        await sb._send({"t": "resize", "id": 999, "cols": 100, "rows": 40})

    OperationRef.spawn(sb._host, stray_resize).result()  # from the sandbox's own loop
    assert sb.exec(["echo", "still fine"]).result().stdout == "still fine\n"
