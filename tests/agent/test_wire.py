"""The wire protocol: framing, validation, limits and the handshake."""

import msgpack
import pytest

from sandpool import ProtocolError
from _sandpool_agent import wire as _wire


def test_round_trip_through_incremental_buffer_byte_by_byte():
    """Frames fed one byte at a time come out whole and in order."""
    frames = [{"t": "exec", "id": 1, "argv": ["echo", "hi"]}, {"t": "output", "id": 1, "fd": 1, "data": b"x" * 70000}]
    data = b"".join(_wire.encode(f) for f in frames)
    buf = _wire.FrameBuffer()
    out = []
    for i in range(len(data)):
        out.extend(buf.feed(data[i:i + 1]))
    assert out == frames
    assert buf.pending == 0


def test_many_frames_in_one_read():
    """A single read carrying thousands of small frames decodes them all."""
    data = b"".join(_wire.encode({"t": "ping", "id": i}) for i in range(5000))
    assert [f["id"] for f in _wire.FrameBuffer().feed(data)] == list(range(5000))


@pytest.mark.parametrize("frame, words", [
    ({"t": "nope", "id": 1}, "unknown frame kind 'nope'"),
    ({"id": 1}, "unknown frame kind None"),
    ({"t": "exec", "id": "1", "argv": []}, "'exec' frame field 'id' must be int"),
    ({"t": "exec", "id": True, "argv": []}, "'exec' frame field 'id' must be int"),
    ({"t": "output", "id": 1, "fd": 1}, "'output' frame field 'data' must be bytes"),
    ([1, 2, 3], "frame is not a map"),
])
def test_malformed_frames_raise_protocol_error_naming_the_frame(frame, words):
    """An unknown kind, a missing or mistyped field, or a non-map is a ProtocolError that names it."""
    body = msgpack.packb(frame, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        _wire.decode_body(body)
    assert words in str(info.value)
    assert info.value.frame is not None


def test_garbage_bytes_are_a_protocol_error():
    """Bytes that are not msgpack raise ProtocolError, not a msgpack exception."""
    with pytest.raises(ProtocolError, match="undecodable frame"):
        _wire.decode_body(b"\xc1\xc1\xc1")


def test_oversized_frame_refused_on_both_sides():
    """The size limit applies when encoding and to an announced length when decoding."""
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        _wire.encode({"t": "stdin", "id": 1, "data": b"x" * 200}, max_bytes=100)
    header = (10_000).to_bytes(4, "big")
    with pytest.raises(ProtocolError, match="above the 100-byte limit"):
        _wire.FrameBuffer(max_bytes=100).feed(header)


def test_handshake_checks_kind_and_version():
    """check_hello accepts our version and names the fix for another one."""
    assert _wire.check_hello(_wire.hello(pid=1))["pid"] == 1
    with pytest.raises(ProtocolError, match="same sandpool version"):
        _wire.check_hello({"t": "hello", "version": _wire.PROTOCOL_VERSION + 1})
    with pytest.raises(ProtocolError, match="expected a 'hello' frame first"):
        _wire.check_hello({"t": "ping", "id": 1})


def test_every_frame_kind_has_one_schema_and_a_direction():
    """Every kind a client may send to an agent, or an agent to a client, is in the one schema table."""
    assert _wire.TO_AGENT <= set(_wire.FRAMES) and _wire.FROM_AGENT <= set(_wire.FRAMES)
    assert not (_wire.TO_AGENT & _wire.FROM_AGENT) - {"hello"}


@pytest.mark.parametrize("frame, words", [
    ({"t": "exec", "id": 1, "argv": ["a", "b\x00"]}, "argument 1 of 'exec' frame field 'argv' contains a NUL byte"),
    ({"t": "exec", "id": 1, "argv": ["a"], "env": {"A=B": "1"}}, "name 'A=B' contains '='"),
    ({"t": "exec", "id": 1, "argv": ["a"], "env": {"": "1"}}, "empty variable name"),
    ({"t": "exec", "id": 1, "argv": ["a"], "cwd": "/\x00"}, "'cwd' contains a NUL byte"),
    ({"t": "exec", "id": 1, "argv": ["a"], "stdin": 1}, "'stdin' must be bool"),
    ({"t": "exec", "id": -1, "argv": ["a"]}, "'id' must be between 0 and"),
    ({"t": "read_file", "id": 1, "path": "x" * 5000}, "above the 4096-character limit"),
    ({"t": "signal", "id": 1, "sig": 0}, "'sig' must be between 1 and 64"),
    ({"t": "stop", "grace": float("nan")}, "'grace' must be between"),
    ({"t": "output", "id": 1, "fd": 3, "data": b""}, "'fd' must be between 1 and 2"),
    ({"t": "exit", "id": 1, "code": 0, "signal": "KILL"}, "'signal' must be int or None"),
    ({"t": "error", "id": 1, "kind": "", "message": "m"}, "'kind' must be a word"),
    ({"t": "result", "id": 1, "us": -5}, "'us' must be between 0"),
])
def test_schema_checks_values_not_only_types(frame, words):
    """The table checks NUL bytes, env names, ranges and optional fields, naming kind, field and value."""
    with pytest.raises(ProtocolError) as info:
        _wire.decode_body(msgpack.packb(frame, use_bin_type=True))
    assert words in str(info.value)
    assert info.value.frame == {"t": frame["t"], "id": frame.get("id")}  # a summary, never the payload


def test_client_side_checks_raise_value_error_naming_the_fix():
    """check_field gives the caller's own label: the message a user of exec() sees."""
    with pytest.raises(ValueError, match=r"argument 1 of command contains a NUL byte \('a\\x00b'\); remove it"):
        _wire.check_field("exec", "argv", ["echo", "a\x00b"], "command")
    with pytest.raises(ValueError, match=r"env name 'A=B' contains '='.*put everything after the first '='"):
        _wire.check_field("exec", "env", {"A=B": "x"}, "env")
    with pytest.raises(TypeError, match="cwd must be str or None, got int 5"):
        _wire.check_field("exec", "cwd", 5, "cwd")
    _wire.check_field("exec", "env", {"A": "x=y"}, "env")  # '=' in a value is fine


def test_lenient_buffer_reports_bad_frames_in_place_and_goes_on():
    """The agent's decoder turns each bad frame into a ProtocolError where it stood, and decodes on."""
    data = b"".join([
        _wire.encode({"t": "ping", "id": 1}),
        b"\x00\x00\x00\x02\xc1\xc1",
        _wire.encode({"t": "exec", "id": 2, "argv": ["a\x00"]}),
        _wire.encode({"t": "ping", "id": 3}),
    ])
    out = _wire.FrameBuffer(lenient=True).feed(data)
    assert out[0] == {"t": "ping", "id": 1} and out[3] == {"t": "ping", "id": 3}
    assert isinstance(out[1], ProtocolError) and isinstance(out[2], ProtocolError)
    assert out[2].frame == {"t": "exec", "id": 2}


def test_lenient_buffer_skips_an_oversized_frame_without_holding_it():
    """An oversized frame's body is discarded as it arrives (never buffered); the next frame decodes."""
    buf = _wire.FrameBuffer(max_bytes=100, lenient=True)
    out = buf.feed((1000).to_bytes(4, "big") + b"x" * 400)
    assert len(out) == 1 and "above the 100-byte limit" in str(out[0]) and buf.pending == 0
    assert buf.feed(b"x" * 599) == [] and buf.pending == 0
    assert buf.feed(b"x" + _wire.encode({"t": "ping", "id": 7})) == [{"t": "ping", "id": 7}]


def test_describing_a_huge_bad_frame_costs_little():
    """Error messages about a frame of huge strings stay short (no repr of the whole payload)."""
    frame = {"t": "exec", "id": 1, "argv": ["x" * 50_000_000, "\x00"]}
    with pytest.raises(ProtocolError) as info:
        _wire.validate(frame)
    assert len(str(info.value)) < 1000
