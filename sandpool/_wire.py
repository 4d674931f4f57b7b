"""The wire protocol: length-prefixed msgpack frames between a client and a sandbox agent.

A frame on the wire is a 4-byte big-endian length followed by that many bytes of msgpack encoding
one map. Every map has a ``"t"`` key naming its kind (see :data:`FRAME_FIELDS`) and the fields that
kind requires. Anything else (a short read, bad msgpack, an unknown kind, a missing or mistyped
field, a length above the limit) is a :class:`ProtocolError` naming the offending frame.

This module is imported by the agent inside every sandbox, so it uses only the stdlib and msgpack.
"""

from __future__ import annotations

import struct

import msgpack

from ._errors import ProtocolError

PROTOCOL_VERSION = 1
#: Largest frame accepted by default (a 100 MB function argument must fit).
MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

_INT = (int,)
_STR = (str,)
_BYTES = (bytes,)
_BOOL = (bool,)
_LIST = (list,)
_MAP = (dict,)
_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))

#: kind -> {required field: accepted types}. Optional fields are not listed; readers use .get().
FRAME_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    # handshake: each side sends one first; the versions must match
    "hello": {"version": _INT},
    # client -> agent
    "exec": {"id": _INT, "argv": _LIST},  # opt: cwd, env, stdin(bool)
    "stdin": {"id": _INT, "data": _BYTES},  # opt: eof(bool)
    "credit": {"id": _INT, "n": _INT},
    "signal": {"id": _INT, "sig": _INT},  # id 0 = the main command
    "read_file": {"id": _INT, "path": _STR},
    "write_file": {"id": _INT, "path": _STR, "data": _BYTES},  # opt: mode
    # opt: fn_key (bytes; fn is b"" once the sandbox has the key), timeout (s)
    "call": {"id": _INT, "fn": _BYTES, "args": _BYTES},
    # opt: call (True: a call sent straight to the worker), steal (True: give it back only if it has
    # not started, answered "lost"); see _agent/_calls.py
    "cancel": {"id": _INT},
    "worker": {"id": _INT, "listen": _STR},  # start the call worker, listening at this sandbox path
    "ping": {"id": _INT},
    "stop": {"grace": _NUM},
    # agent -> client
    "started": {"id": _INT, "pid": _INT},
    "output": {"id": _INT, "fd": _INT, "data": _BYTES},
    "exit": {"id": _INT, "code": _INT},  # opt: signal
    "result": {"id": _INT},  # opt: data(bytes), us (a call's run time, microseconds)
    # opt: path, data(bytes), traceback, type_name; code, signal (kind worker_died). Call error kinds:
    # user, serialization, timeout, cancelled, lost, worker_died, protocol (see _agent/_calls.py)
    "error": {"id": _INT, "kind": _STR, "message": _STR},
    "pong": {"id": _INT},
    "ack": {"id": _INT},  # worker -> agent: a cancelled call sent straight to the worker is answered
    "main_exit": {"code": _INT},  # opt: signal
    "bye": {"reason": _OPT_STR},  # opt: code (the main command's exit code)
    # runtime <-> template (local runtime only)
    "spawn": {"id": _INT, "config": _MAP},  # the agent's socket travels as SCM_RIGHTS
    "spawned": {"id": _INT, "pid": _INT},
    "reaped": {"pid": _INT, "code": _INT},  # opt: signal
}


def _describe(frame: object, limit: int = 120) -> str:
    text = repr(frame)
    return text if len(text) <= limit else text[:limit] + "..."


def validate(frame: object) -> dict:
    """Check that ``frame`` is a known kind with its required fields; return it or raise ProtocolError."""
    if not isinstance(frame, dict):
        raise ProtocolError(f"frame is not a map: {_describe(frame)}", frame=frame)
    kind = frame.get("t")
    fields = FRAME_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown frame kind {kind!r} in {_describe(frame)}", frame=frame)
    for name, types in fields.items():
        value = frame.get(name)
        if not isinstance(value, types) or (types is _INT and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise ProtocolError(
                f"{kind!r} frame field {name!r} must be {want}, got {value!r}: {_describe(frame)}",
                frame=frame,
            )
    return frame


def encode(frame: dict, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Serialize one frame, header included. Raises ProtocolError if it exceeds ``max_bytes``."""
    body = msgpack.packb(frame, use_bin_type=True)
    if len(body) > max_bytes:
        raise ProtocolError(
            f"{frame.get('t')!r} frame of {len(body)} bytes exceeds the {max_bytes}-byte limit",
            frame={"t": frame.get("t"), "id": frame.get("id")},
        )
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    """Parse and validate one frame body (without its header)."""
    try:
        frame = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types; translate them here once
        raise ProtocolError(f"undecodable frame of {len(body)} bytes: {exc}", frame=body[:64]) from exc
    return validate(frame)


def body_length(header: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """Length announced by a 4-byte header; ProtocolError if above ``max_bytes``."""
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(
            f"frame header announces {length} bytes, above the {max_bytes}-byte limit",
            frame=header,
        )
    return length


class FrameBuffer:
    """Incremental decoder: feed bytes as they arrive, take out whole frames."""

    def __init__(self, *, max_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[dict]:
        """Append ``data`` and return every frame now complete, in order."""
        buf = self._buf
        buf += data
        frames = []
        pos, end = 0, len(buf)  # consumed frames are cut off once per feed, not per frame
        while end - pos >= HEADER_SIZE:
            length = body_length(bytes(buf[pos : pos + HEADER_SIZE]), max_bytes=self._max)
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(decode_body(bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a whole frame."""
        return len(self._buf)


def hello(**extra: object) -> dict:
    """The handshake frame this side sends first."""
    return {"t": "hello", "version": PROTOCOL_VERSION, **extra}


def check_hello(frame: dict) -> dict:
    """Validate the peer's handshake; ProtocolError on a wrong kind or version."""
    if frame.get("t") != "hello":
        raise ProtocolError(f"expected a 'hello' frame first, got {_describe(frame)}", frame=frame)
    if frame["version"] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer speaks protocol version {frame['version']}, this side {PROTOCOL_VERSION}; "
            "install the same sandpool version on both sides",
            frame=frame,
        )
    return frame
