"""The sandpool service protocol: method names, msgpack messages, metadata keys, error names.

Shared by the server (``sandpool._service``) and its client (``sandpool._runtime.remote``). It
imports neither, only config, errors and msgpack, so a client never loads the server.

Methods (service ``sandpool.v1.Sandpool``; every request and response is one msgpack map, except
on ``Attach``, whose messages are raw bytes carrying whole or partial wire frames):

- ``Create {spec, lease}`` -> info: create and start a sandbox owned by the caller's lease.
- An info's ``network`` (present for a sandbox with a network of its own) is its network report
  (``exposed_ports``, ``service_urls``, ... as ``network_report`` packs them); host ports in it are
  on the server's loopback.
- ``Get {sandbox_id}`` -> info; ``List {tags, status, show_terminated}`` -> ``{sandboxes: [info]}``.
- ``Stop {sandbox_id, grace, missing_ok}`` -> info once terminal; ``Delete`` also forgets it.
- ``Snapshot {sandbox_id, trigger}`` -> the snapshot's record (``_images.snapshots``) in the
  server's own store, whose ids restore sandboxes of that server (``restore_from_snapshot_id``).
- ``GetSnapshot {snapshot_id}`` -> a record; ``ListSnapshots {source_sandbox_id}`` -> ``{snapshots:
  [record]}``; ``DeleteSnapshot {snapshot_id, missing_ok}`` -> ``{deleted}``. A client sees only the
  snapshots taken through the server (``_service/snapshots.py``); any other id is not found.
- ``Lease {}`` -> stream of ``{lease}``: the first message names the caller's lease, then the
  stream stays open while the client lives; its end (client exit, crash, lost host) starts the
  orphan grace period of the sandboxes the lease owns. ``Release {lease, stop}`` ends it cleanly.
- ``Logs {sandbox_id, follow, tail_lines, since, timestamps, offset}`` -> stream of ``{lines: [str],
  offset}``: the main command's log, as ``Sandbox.stream_logs`` yields it (``since``: seconds since
  the epoch). Each reply's ``offset`` is the log's byte offset after its last line; a request with
  ``offset`` starts there (``since`` and ``tail_lines`` then do not apply), which is how a client
  resumes a stream that broke.
  Without ``follow`` it ends once what was written is sent; with it, once the sandbox has ended
  and all is sent. Each message carries at most ``LOG_BATCH_BYTES`` of lines (plus one line).
- ``Attach`` (bidi; metadata ``sandpool-sandbox``): the sandbox's data plane. The client sends a
  ``hello`` frame first and gets one back; then frames flow both ways, batched. When the sandbox
  ends, the stream ends OK with trailing metadata giving the agent's exit code or signal.

Errors are gRPC status codes plus trailing metadata ``sandpool-error`` naming the exception class
(a sandpool error, ValueError or TypeError) that the client raises again with the same message,
and ``sandpool-error-extras``, the error's short string attributes (``feature``,
``file_system_snapshot_id``, ...) as a JSON map, which the client sets again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import msgpack

from .._config import SandboxSpec
from .._cwtypes import EndpointAuth, EndpointKind, HttpsEndpointStatus, TlsPassthroughEndpointStatus
from .._errors import ProtocolError, SandpoolError

SERVICE = "sandpool.v1.Sandpool"
UNARY_METHODS = ("Create", "Get", "List", "Stop", "Delete", "Release", "Snapshot", "GetSnapshot", "ListSnapshots",
                 "DeleteSnapshot")
LEASE_METHOD = "Lease"
ATTACH_METHOD = "Attach"
LOGS_METHOD = "Logs"

META_TOKEN = "authorization"  # value: "Bearer <token>"
META_SANDBOX = "sandpool-sandbox"
META_ERROR = "sandpool-error"
META_ERROR_EXTRAS = "sandpool-error-extras"
#: The longest string attribute of an error that travels in ``META_ERROR_EXTRAS`` (longer ones stay behind).
MAX_EXTRA_CHARS = 256
#: on an Attach call: ``DATA_PLANE_FAST`` asks for the same-host fast socket (see ``fastpath.py``)
META_DATA_PLANE = "sandpool-data-plane"
DATA_PLANE_FAST = "unix"
TRAILER_CODE = "sandpool-exit-code"
TRAILER_SIGNAL = "sandpool-exit-signal"
TRAILER_REASON = "sandpool-reason"
#: the ``TRAILER_REASON`` of a sandbox the server stopped because it shut down (clients tell it apart)
SHUTDOWN_REASON = "the sandpool server shut down"

#: Largest gRPC message either side accepts; data-plane messages are cut to DATA_CHUNK_BYTES, so
#: wire frames of any size (up to the wire's own limit) still pass.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DATA_CHUNK_BYTES = 1024 * 1024
#: Lines of one Logs message: up to this many bytes, plus the line that crossed it (<= 1 MiB).
LOG_BATCH_BYTES = 256 * 1024
DEFAULT_PORT = 50051


def path(method: str) -> str:
    """The gRPC path of ``method``."""
    return f"/{SERVICE}/{method}"


def pack(message: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def unpack(data: bytes, what: str = "message") -> dict[str, Any]:
    """Decode one msgpack map; ProtocolError naming ``what`` if it is not one."""
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types; translated here once
        raise ProtocolError(f"undecodable {what} of {len(data)} bytes: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(message).__name__}")
    return message


def field(message: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    """``message[name]`` checked against ``types``; TypeError naming the field and the fix."""
    if name not in message or message[name] is None:
        if default is ...:
            raise TypeError(f"request field {name!r} is missing; send it as {types}")
        return default
    value = message[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise TypeError(f"request field {name!r} must be {types}, got {type(value).__name__} {value!r}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def spec_to_dict(spec: SandboxSpec) -> dict[str, Any]:
    """A spec as plain msgpack-able data; TypeError if ``network`` holds something else."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.name == "resources" and value is not None:
            value = value.to_dict()
        out[f.name] = _plain(value)
    try:
        msgpack.packb(out["network"], use_bin_type=True)
    except TypeError:
        raise TypeError(f"network={spec.network!r} cannot be sent to a sandpool server; "
                        f"use plain dicts, lists, strings and numbers") from None
    return out


def spec_from_dict(data: Mapping[str, Any]) -> SandboxSpec:
    """The spec a client sent. TypeError/ValueError (from the spec's own checks) if invalid."""
    if not isinstance(data, Mapping):
        raise TypeError(f"request field 'spec' must be a map of sandbox options, got {type(data).__name__}")
    return SandboxSpec.from_dict(data)


#: What a bridge sandbox reports of its network (``_services.surfaces`` plus its egress names).
NETWORK_REPORT = ("exposed_ports", "service_urls", "service_endpoints", "service_addresses", "dns_egress_names")


def network_report(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """The network report of a sandbox's record (``record.extra``) as plain data; None if it has none."""
    if not any(extra.get(name) for name in NETWORK_REPORT):
        return None
    out: dict[str, Any] = {name: [list(item) if isinstance(item, tuple) else item for item in extra.get(name, ())]
                           for name in ("exposed_ports", "service_urls", "dns_egress_names")}
    for name in ("service_endpoints", "service_addresses"):
        out[name] = [{k: getattr(v, "value", v) for k, v in dataclasses.asdict(item).items()}
                     for item in extra.get(name, ())]
    return out


def network_report_from(data: object) -> dict[str, tuple[Any, ...]]:
    """A ``network_report`` as the record's extras again; ProtocolError if it is not one."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ProtocolError(f"a sandbox info's 'network' must be a map, got {type(data).__name__}")
    try:
        return {
            "exposed_ports": tuple((int(p), str(n)) for p, n in data["exposed_ports"]),
            "service_urls": tuple((int(p), str(n), str(u)) for p, n, u in data["service_urls"]),
            "dns_egress_names": tuple(str(n) for n in data["dns_egress_names"]),
            "service_endpoints": tuple(HttpsEndpointStatus(**{**e, "kind": EndpointKind(e["kind"]),
                                                              "auth": EndpointAuth(e["auth"])})
                                       for e in data["service_endpoints"]),
            "service_addresses": tuple(TlsPassthroughEndpointStatus(**{**e, "kind": EndpointKind(e["kind"])})
                                       for e in data["service_addresses"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"a sandbox info's 'network' is not a network report: {exc!r}") from exc


ERROR_NAMES = ("ValueError", "TypeError")


def error_extras(exc: BaseException) -> str | None:
    """The error's short string attributes (its class's ``extra_names()``) as a JSON map, or None if none."""
    names: tuple[str, ...] = exc.extra_names() if isinstance(exc, SandpoolError) else ()
    values = {name: getattr(exc, name, None) for name in names}
    kept = {k: v for k, v in values.items() if isinstance(v, str) and len(v) <= MAX_EXTRA_CHARS}
    return json.dumps(kept, ensure_ascii=True) if kept else None


def extras_for(cls: type[BaseException], text: object) -> dict[str, str]:
    """The attributes a ``META_ERROR_EXTRAS`` value gives an error of ``cls``: only string attributes
    ``cls`` declares, each at most MAX_EXTRA_CHARS long; anything else in ``text`` is ignored."""
    names = cls.extra_names() if issubclass(cls, SandpoolError) else ()
    try:
        data = json.loads(text) if isinstance(text, str) and len(text) <= 16 * MAX_EXTRA_CHARS else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if k in names and k != "sandbox_id" and isinstance(v, str) and len(v) <= MAX_EXTRA_CHARS}


def error_name(exc: BaseException) -> str:
    """The name the client raises again: the class of a sandpool error, ValueError or TypeError."""
    name = type(exc).__name__
    if isinstance(exc, (ValueError, TypeError)) and type(exc).__module__ == "builtins":
        return name
    return name if type(exc).__module__ == "sandpool._errors" else "SandboxError"
