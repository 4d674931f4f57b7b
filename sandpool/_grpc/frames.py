"""The server's check of each data-plane frame a client sends, before it is forwarded to an agent.

``_wire.validate`` (run while decoding) guarantees a known kind and the types of its required
fields. This adds what a client may not send an agent through a shared server: only the client
kinds, ids in the client's own 32-bit range, optional fields of the right types, no NUL bytes in
arguments, environment, working directory or paths, environment names without ``=``, sizes within
``limits``, signal numbers and credits in range, and a ``worker`` (a direct call worker, for a
same-host client: ``workerlink.py``) only at ``/tmp/.sandpool-worker-<hex>``. A frame that fails
is a ProtocolError naming the kind, the field and the fix; the hub ends that client's stream with
it, and only that stream.
"""

from __future__ import annotations

import re
from typing import Any

from .._errors import ProtocolError
from . import limits

ID_BITS = 32
CLIENT_KINDS = frozenset({"exec", "stdin", "credit", "signal", "resize", "read_file", "write_file", "call", "cancel",
                          "ping", "worker", "told"})
#: where a ``worker`` frame may have the agent listen: the sandbox's /tmp, a name of this form
WORKER_LISTEN = re.compile(r"/tmp/\.sandpool-worker-[0-9a-f]{1,32}")
#: kind -> {optional field: accepted types}
_OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    "exec": {"cwd": (str,), "env": (dict,), "stdin": (bool,)},
    "stdin": {"eof": (bool,)},
    "write_file": {"mode": (int,), "special": (bool,)},
    "read_file": {"special": (bool,)},
    "call": {"fn_key": (bytes,), "timeout": (int, float), "args_path": (str,), "bulk": (str,), "pickle": (bool,)},
    "cancel": {"call": (bool,), "steal": (bool,)},
}
MAX_SIGNAL = 64
MAX_CREDIT = 1 << 31


def check(frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` if a client may send it on; ProtocolError naming what is wrong otherwise."""
    kind = frame["t"]
    if kind not in CLIENT_KINDS:
        raise ProtocolError(f"clients may not send {kind!r} frames; stop a sandbox with the Stop call, "
                            f"and send only {', '.join(sorted(CLIENT_KINDS))}", frame={"t": kind})
    frame_id = frame["id"]
    if not 0 <= frame_id < 1 << ID_BITS:
        raise ProtocolError(f"{kind!r} frame id {frame_id} is outside 0..2**32-1", frame={"t": kind})
    for name, types in _OPTIONAL.get(kind, {}).items():
        value = frame.get(name)
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            want = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"{kind!r} frame field {name!r} must be {want} or absent, got "
                                f"{type(value).__name__} {limits.short(value)}", frame={"t": kind, "id": frame_id})
    try:
        _FIELDS.get(kind, _nothing)(frame)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{kind!r} frame: {exc}", frame={"t": kind, "id": frame_id}) from None
    return frame


def _nothing(frame: dict[str, Any]) -> None:
    pass


def _exec(frame: dict[str, Any]) -> None:
    if not frame["argv"]:
        raise ValueError("argv is empty; send the command and its arguments, e.g. ['echo', 'hi']")
    limits.command_size("exec", frame["argv"], frame.get("env"))
    limits.text("exec cwd", frame.get("cwd"), limits.MAX_PATH_BYTES, optional=True)


def _path(frame: dict[str, Any]) -> None:
    limits.text(f"{frame['t']} path", frame["path"], limits.MAX_PATH_BYTES)
    if not frame["path"]:
        raise ValueError("path is empty; send an absolute path or one relative to the working directory")
    mode = frame.get("mode")
    if mode is not None and not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode!r} is not a file mode; send e.g. 0o644")


def _signal(frame: dict[str, Any]) -> None:
    if not 1 <= frame["sig"] <= MAX_SIGNAL:
        raise ValueError(f"sig {frame['sig']} is not a signal number; send 1..{MAX_SIGNAL}")


def _credit(frame: dict[str, Any]) -> None:
    if not 0 <= frame["n"] < MAX_CREDIT:
        raise ValueError(f"n {frame['n']} is outside 0..2**31-1")


def _call(frame: dict[str, Any]) -> None:
    for name in ("args_path", "bulk"):
        limits.text(f"call {name}", frame.get(name), limits.MAX_PATH_BYTES, optional=True)
    timeout = frame.get("timeout")
    if timeout is not None and not 0 < timeout < float("inf"):
        raise ValueError(f"timeout {timeout!r} must be a finite number of seconds > 0")


def _worker(frame: dict[str, Any]) -> None:
    if not WORKER_LISTEN.fullmatch(frame["listen"]):
        raise ValueError(f"listen {limits.short(frame['listen'])} must be /tmp/.sandpool-worker-<hex>, "
                         f"the only place a client's call worker listens")


_FIELDS = {"call": _call, "exec": _exec, "read_file": _path, "write_file": _path, "signal": _signal, "credit": _credit,
           "worker": _worker}
