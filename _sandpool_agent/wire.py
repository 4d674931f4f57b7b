"""The wire protocol: length-prefixed msgpack frames between a client and a sandbox agent.

A frame on the wire is a 4-byte big-endian length followed by that many bytes of msgpack encoding
one map. Every map has a ``"t"`` key naming its kind (see :data:`FRAMES`) and the fields that
kind requires. Anything else (a short read, bad msgpack, an unknown kind, a missing or mistyped
field, a length above the limit) is a :class:`ProtocolError` naming the offending frame.

This module is imported by the agent inside every sandbox, so it uses only the stdlib and msgpack.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1
#: Largest frame accepted by default (a 100 MB function argument must fit).
MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size

#: Largest file a ``read_file``/``write_file`` moves (one frame, less room for the frame's other fields).
MAX_FILE_BYTES = MAX_FRAME_BYTES - 1024
#: Output bytes the agent sends for one exec'd process before it waits for the client's credit, and
#: the most it reads from a pipe at once: a client fails a sandbox whose agent sends more unacknowledged.
OUTPUT_WINDOW_BYTES = 4 * 1024 * 1024
OUTPUT_CHUNK_BYTES = 65536
#: Stdin bytes a client sends for one process before the agent reports them taken (``stdin_taken``),
#: in frames of at most ``STDIN_CHUNK_BYTES``: the agent holds no more for a process that does not read.
STDIN_WINDOW_BYTES = 4 * 1024 * 1024
STDIN_CHUNK_BYTES = 1024 * 1024
#: Bounds on the parts of an ``exec`` (far above what a real command needs; the kernel refuses a
#: command line and environment above ~2 MiB in total, which the agent reports as the exec failing).
MAX_ARGS = 131072
MAX_ENV_ENTRIES = 65536
MAX_PATH_CHARS = 4096
MAX_SIGNAL = 64
_MAX_ID = 2**63 - 1
_MAX_CODE = 2**31 - 1
_MAX_GRACE_SECONDS = 7 * 24 * 3600.0

Check = Callable[[object, str], "str | None"]


class Field:
    """One field of a frame kind: accepted types, whether it must be there, and a check of its value.

    ``check(value, label)`` returns None when the value is fine, else a sentence naming ``label``,
    the value and the fix. Fields a kind does not list are ignored (and never used).
    """

    __slots__ = ("types", "required", "check", "exact")

    def __init__(self, types: tuple[type, ...], required: bool = True, check: Check | None = None) -> None:
        self.types, self.required, self.check = types, required, check
        self.exact = frozenset(types)  # what msgpack decodes is of these very types: the fast path


def _short(value: object, limit: int = 60) -> str:
    """A bounded repr: a huge value costs only its first ``limit`` items or characters to describe."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit])
        return text + (f"... ({len(value)} long)" if len(value) > limit else "")
    if isinstance(value, dict):
        inner = ", ".join(f"{_short(k, 20)}: {_short(v, 20)}" for k, v in list(value.items())[:4])
        return "{" + inner + (f", ... ({len(value)} items)" if len(value) > 4 else "") + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_short(item, 20) for item in value[:4])
        return "[" + inner + (f", ... ({len(value)} items)" if len(value) > 4 else "") + "]"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _between(low: float, high: float) -> Check:
    def check(value: object, label: str) -> str | None:
        if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
            return f"{label} must be between {low:g} and {high:g}, got {_short(value)}"
        return None

    return check


def _winsize(value: list, label: str) -> str | None:
    """A terminal's ``[cols, rows]``: an exec on a pseudo-terminal of that size."""
    if len(value) != 2 or not all(type(v) is int and 1 <= v <= 65535 for v in value):
        return f"{label} must be [cols, rows], two ints from 1 to 65535, got {_short(value)}"
    return None


def _word(value: str, label: str) -> str | None:
    if not 0 < len(value) <= 64:
        return f"{label} must be a word of 1 to 64 characters, got {_short(value)}"
    return None


def _token(value: bytes, label: str) -> str | None:
    if len(value) != 16:
        return f"{label} must be 16 bytes (an actor handle's token), got {len(value)}"
    return None


def _text(value: str, label: str) -> str | None:
    if "\x00" in value:
        return (f"{label} contains a NUL byte ({_short(value)}); remove it: the operating system ends "
                "every argument, variable and path at a NUL byte")
    return None


def _path(value: str, label: str) -> str | None:
    if not value:
        return f"{label} is empty; pass a path such as '/tmp/data.txt'"
    if len(value) > MAX_PATH_CHARS:
        return f"{label} is {len(value)} characters long, above the {MAX_PATH_CHARS}-character limit of a path"
    return _text(value, label)


def _argv(value: list, label: str) -> str | None:
    if not value:
        return f"{label} is empty; pass a non-empty list of strings such as ['echo', 'hi']"
    if len(value) > MAX_ARGS:
        return f"{label} has {len(value)} arguments, above the limit of {MAX_ARGS}; pass fewer (or a file of them)"
    for index, arg in enumerate(value):
        where = f"argument {index} of {label}"
        if not isinstance(arg, str):
            return f"{where} must be str, got {type(arg).__name__} {_short(arg)}"
        problem = _text(arg, where)
        if problem:
            return problem
    return None


def _env(value: dict, label: str) -> str | None:
    if len(value) > MAX_ENV_ENTRIES:
        return f"{label} has {len(value)} entries, above the limit of {MAX_ENV_ENTRIES}"
    for name, text in value.items():
        if not isinstance(name, str) or not isinstance(text, str):
            return f"{label} must map str to str, got {_short(name)}: {_short(text)}"
        if not name:
            return f"{label} has an empty variable name (value {_short(text)}); give every variable a name"
        if "=" in name:
            return (f"{label} name {_short(name)} contains '='; a variable's name cannot hold '=' "
                    "(put everything after the first '=' in its value)")
        problem = _text(name, f"{label} name") or _text(text, f"{label} value of {_short(name)}")
        if problem:
            return problem
    return None


_INT = (int,)
_STR = (str,)
_BYTES = (bytes,)
_BOOL = (bool,)
_LIST = (list,)
_MAP = (dict,)
_NUM = (int, float)
_NONE = (type(None),)

_ID = Field(_INT, check=_between(0, _MAX_ID))
_CODE = _between(-_MAX_CODE - 1, _MAX_CODE)
_SIGNAL = Field(_INT + _NONE, False, _between(0, MAX_SIGNAL))
_PATH = Field(_STR, check=_path)


def _opt(types: tuple[type, ...], check: Check | None = None) -> Field:
    return Field(types, False, check)


#: kind -> {field: Field}; the schema of every frame, for both sides. Validation is table-driven.
FRAMES: dict[str, dict[str, Field]] = {
    # handshake: each side sends one first; the versions must match
    "hello": {"version": Field(_INT), "pid": _opt(_INT), "sandbox_id": _opt(_STR)},
    # client -> agent
    "exec": {"id": _ID, "argv": Field(_LIST, check=_argv), "cwd": _opt(_STR + _NONE, _path),
             "env": _opt(_MAP + _NONE, _env), "stdin": _opt(_BOOL), "tty": _opt(_LIST, _winsize)},
    "resize": {"id": _ID, "cols": Field(_INT, check=_between(1, 65535)),  # a tty exec's window
               "rows": Field(_INT, check=_between(1, 65535))},
    "stdin": {"id": _ID, "data": Field(_BYTES), "eof": _opt(_BOOL)},
    "credit": {"id": _ID, "n": Field(_INT, check=_between(0, _MAX_ID))},
    "signal": {"id": _ID, "sig": Field(_INT, check=_between(1, MAX_SIGNAL))},  # id 0 = the main command
    # offset (+ length for reads): one chunk of a streamed file (see _agent/_files.read_range, write_at)
    "read_file": {"id": _ID, "path": _PATH, "special": _opt(_BOOL), "offset": _opt(_INT, _between(0, _MAX_ID)),
                  "length": _opt(_INT, _between(1, MAX_FILE_BYTES))},  # special: FIFOs, devices (see _files)
    "write_file": {"id": _ID, "path": _PATH, "data": Field(_BYTES), "mode": _opt(_INT, _between(0, 0o7777)),
                   "special": _opt(_BOOL), "offset": _opt(_INT, _between(0, _MAX_ID))},
    # fn is b"" once the sandbox has fn_key; timeout in seconds; args_path/bulk: see _bulk
    "call": {"id": _ID, "fn": Field(_BYTES), "args": Field(_BYTES), "fn_key": _opt(_BYTES),
             "timeout": _opt(_NUM + _NONE, _between(0, _MAX_GRACE_SECONDS)), "args_path": _opt(_STR, _path),
             "bulk": _opt(_STR, _path), "pickle": _opt(_BOOL)},
    # call (True: a call sent straight to the worker), steal (True: give it back only if it has not
    # started, answered "lost"); see _agent/_calls.py
    "cancel": {"id": _ID, "call": _opt(_BOOL), "steal": _opt(_BOOL)},
    "worker": {"id": _ID, "listen": _PATH},  # start the call worker, listening at this sandbox path
    "ping": {"id": _ID},
    # the answer to a worker's ``ask`` (an actor call made inside the sandbox, see _agent/actors.py):
    # data (plain data, the result) or type_name and message (the error)
    "told": {"id": _ID, "seq": Field(_INT, check=_between(1, _MAX_ID)), "data": _opt(_BYTES), "type_name": _opt(_STR),
             "message": _opt(_STR)},
    "stop": {"grace": Field(_NUM, check=_between(0, _MAX_GRACE_SECONDS))},
    # agent -> client
    "started": {"id": _ID, "pid": Field(_INT, check=_between(0, _MAX_CODE))},
    "output": {"id": _ID, "fd": Field(_INT, check=_between(1, 2)), "data": Field(_BYTES)},
    # stdin bytes of process ``id`` written to its pipe (or dropped: it closed its stdin) since the last
    "stdin_taken": {"id": _ID, "n": Field(_INT, check=_between(0, _MAX_ID))},
    "exit": {"id": _ID, "code": Field(_INT, check=_CODE), "signal": _SIGNAL, "killed": _opt(_BOOL)},
    "result": {"id": _ID, "data": _opt(_BYTES), "us": _opt(_INT, _between(0, _MAX_ID)), "path": _opt(_STR, _path)},
    # code, signal: kind worker_died. Call error kinds: user, serialization, timeout, cancelled, lost,
    # worker_died, protocol (see _agent/_calls.py); file operations: a CWSANDBOX_FILE_* reason
    "error": {"id": _ID, "kind": Field(_STR, check=_word), "message": Field(_STR),
              "path": _opt(_STR), "data": _opt(_BYTES), "exc": _opt(_BYTES), "traceback": _opt(_STR),
              "type_name": _opt(_STR),
              "code": _opt(_INT + _NONE, _CODE), "signal": _SIGNAL},
    "pong": {"id": _ID},
    # worker -> agent -> client: call a method of the actor whose handle has this token; args is
    # plain data, (args tuple, kwargs dict); answered with ``told`` under the same seq. id: a
    # request of the client's in that sandbox (the running call, or its direct worker), for routing
    "ask": {"id": _ID, "seq": Field(_INT, check=_between(1, _MAX_ID)), "token": Field(_BYTES, check=_token),
            "method": Field(_STR, check=_word), "args": Field(_BYTES)},
    "ack": {"id": _ID},  # worker -> agent: a cancelled call sent straight to the worker is answered
    "main_exit": {"code": Field(_INT, check=_CODE), "signal": _SIGNAL, "message": _opt(_STR)},
    "bye": {"reason": Field(_STR + _NONE), "code": _opt(_INT + _NONE, _CODE)},  # code: the main command's
    # runtime <-> template (local runtime only)
    "spawn": {"id": _ID, "config": Field(_MAP)},  # the agent's socket travels as SCM_RIGHTS
    "spawned": {"id": _ID, "pid": Field(_INT)},
    "reaped": {"pid": Field(_INT), "code": Field(_INT), "signal": _SIGNAL},
}
#: What a client accepts from an agent (and its call worker); anything else fails the sandbox.
FROM_AGENT = frozenset({"hello", "started", "output", "stdin_taken", "exit", "result", "error", "pong", "main_exit",
                        "bye", "ask"})
#: What an agent serves from its owner.
TO_AGENT = frozenset({"hello", "exec", "stdin", "credit", "signal", "resize", "read_file", "write_file", "call",
                      "cancel", "worker", "ping", "stop", "told"})


def _describe(frame: object) -> str:
    if isinstance(frame, dict):
        inner = ", ".join(f"{_short(k)}: {_short(v)}" for k, v in list(frame.items())[:8])
        return "{" + inner + (", ..." if len(frame) > 8 else "") + "}"
    return _short(frame)


def summary(frame: object) -> object:
    """What a ProtocolError keeps of a bad frame: its kind and id, never its (maybe huge) payload."""
    if isinstance(frame, dict):
        kind, req_id = frame.get("t"), frame.get("id")
        return {"t": kind if isinstance(kind, str) and len(kind) <= 64 else _short(kind),
                "id": req_id if req_id is None or isinstance(req_id, int) else _short(req_id)}
    return _short(frame)


def problem(kind: str, name: str, value: object, label: str) -> tuple[type[Exception], str] | None:
    """What is wrong with ``value`` as field ``name`` of a ``kind`` frame, as (exception type, message)."""
    spec = FRAMES[kind][name]
    if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
        want = " or ".join("None" if t is type(None) else t.__name__ for t in spec.types)
        return TypeError, f"{label} must be {want}, got {type(value).__name__} {_short(value)}"
    if spec.check is not None and value is not None:
        message = spec.check(value, label)
        if message:
            return ValueError, message
    return None


def check_field(kind: str, name: str, value: object, label: str) -> None:
    """Raise ValueError/TypeError naming ``label`` if ``value`` may not be field ``name`` of a ``kind``
    frame: the client's arguments are checked with the same rules the agent applies to frames."""
    found = problem(kind, name, value, label)
    if found is not None:
        raise found[0](found[1])


def validate(frame: object) -> dict:
    """Check ``frame`` against its kind's schema (types, bounds, NUL bytes, env names); return it, or
    raise ProtocolError naming the kind, the field and the value."""
    if not isinstance(frame, dict):
        raise ProtocolError(f"frame is not a map: {_short(frame)}", frame=summary(frame))
    kind = frame.get("t")
    fields = FRAMES.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ProtocolError(f"unknown frame kind {_short(kind)} in {_describe(frame)}", frame=summary(frame))
    get = frame.get
    for name, spec, label in _PLANS[kind]:  # every frame crosses here: the common case stays cheap
        value = get(name, _MISSING)
        if value is _MISSING:
            if spec.required:
                want = " or ".join("None" if t is type(None) else t.__name__ for t in spec.types)
                raise ProtocolError(f"{label} must be {want}, but it is missing: {_describe(frame)}",
                                    frame=summary(frame))
            continue
        if type(value) in spec.exact and (spec.check is None or value is None or spec.check(value, label) is None):
            continue
        found = problem(kind, name, value, label)
        if found is not None:
            raise ProtocolError(f"{found[1]}: {_describe(frame)}", frame=summary(frame))
    return frame


_MISSING = object()
_PLANS = {kind: tuple((name, spec, f"{kind!r} frame field {name!r}") for name, spec in fields.items())
          for kind, fields in FRAMES.items()}


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
        raise ProtocolError(f"undecodable frame of {len(body)} bytes: {type(exc).__name__} {_short(str(exc))}",
                            frame=_short(body[:64])) from exc
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
    """Incremental decoder: feed bytes as they arrive, take out whole frames.

    Strict (the default), a bad frame raises ProtocolError. ``lenient`` (the agent's side): a bad
    frame becomes a ProtocolError in the returned list, in its place, and decoding goes on with the
    next frame; an oversized frame's body is skipped as it arrives, never held.
    """

    def __init__(self, *, max_bytes: int = MAX_FRAME_BYTES, lenient: bool = False) -> None:
        self._buf = bytearray()
        self._max = max_bytes
        self._lenient = lenient
        self._skip = 0  # bytes of an oversized frame still to discard

    def feed(self, data: bytes | bytearray) -> list:
        """Append ``data`` and return every frame now complete, in order (dicts; in lenient mode
        also ProtocolErrors standing for bad frames)."""
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        buf = self._buf
        buf += data
        frames: list = []
        pos, end = 0, len(buf)  # consumed frames are cut off once per feed, not per frame
        while end - pos >= HEADER_SIZE:
            header = bytes(buf[pos : pos + HEADER_SIZE])
            (length,) = _HEADER.unpack(header)
            start = pos + HEADER_SIZE
            if length > self._max:
                error = ProtocolError(f"frame header announces {length} bytes, above the {self._max}-byte limit",
                                      frame=header)
                if not self._lenient:
                    raise error
                frames.append(error)
                taken = min(length, end - start)
                pos, self._skip = start + taken, length - taken
                if self._skip:
                    break
                continue
            if end - start < length:
                break
            try:
                frames.append(decode_body(bytes(buf[start : start + length])))
            except ProtocolError as error:
                if not self._lenient:
                    raise
                frames.append(error)
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
