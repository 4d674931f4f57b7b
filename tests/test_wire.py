"""The wire protocol: framing, validation, limits and the handshake."""

import msgpack
import pytest

from sandpool import ProtocolError
from sandpool import _wire


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
