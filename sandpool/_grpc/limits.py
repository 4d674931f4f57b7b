"""The bounds of what one client request may carry, checked before anything is built from it.

A server keeps what clients send (specs in its fleet and journal, frames on their way to agents),
so every size a client controls is bounded here: the bytes of a control-plane request, the
entries and sizes of a spec's environment, arguments, tags and annotations, the fields of each
data-plane frame, and what a List reply carries per sandbox (:func:`summary`; with at most 32
tags of 128 bytes, a List of the 1000 ended and every live sandbox stays far below gRPC's 16 MiB). The checks run on plain decoded data (before ``SandboxSpec`` is built, so a huge
request costs one length check, not a validation of every entry), and fail with ValueError or
TypeError naming the field, the value or its size, the bound and the fix.

Argument and environment bounds follow execve's: one string at most 128 KiB (the kernel's
MAX_ARG_STRLEN), all of them together at most 1 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from . import messages as m

#: One encoded control-plane request (Create, Get, List, Stop, Delete, Release, Lease, Logs).
MAX_REQUEST_BYTES = 1 << 20
#: One argument, environment value, or name=value entry.
MAX_STRING_BYTES = 128 << 10
#: Arguments of a command, entries of an environment.
MAX_ARGS = 4096
MAX_ENV_ENTRIES = 4096
#: All arguments plus all environment entries of one exec'd command together.
MAX_ARGV_ENV_BYTES = 1 << 20
#: ... and of a spec's main command and environment, which reach the sandbox in one spawn message.
MAX_SPEC_ARGV_ENV_BYTES = 128 << 10
MAX_TAGS, MAX_TAG_BYTES = 32, 128
MAX_ANNOTATIONS, MAX_ANNOTATION_BYTES = 64, 4096
#: A path (working directory, file path, image reference, a spec's command).
MAX_PATH_BYTES = 4096
#: A spec as List shows it: whole up to this size, else without environment, args and annotations.
MAX_SUMMARY_BYTES = 8192
#: A sandbox or lease id.
MAX_ID_BYTES = 128


def short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a client's value quoted in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def request_bytes(what: str, size: int) -> None:
    """ValueError if an encoded request of ``size`` bytes is above :data:`MAX_REQUEST_BYTES`."""
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"the {what} is {size} bytes, above this server's {MAX_REQUEST_BYTES}-byte limit "
                         f"for a control request; send fewer or smaller environment variables, arguments, "
                         f"tags or annotations (limits: {MAX_ENV_ENTRIES} environment entries, {MAX_ARGS} "
                         f"arguments, {MAX_ARGV_ENV_BYTES} bytes of both together)")


def log_request(request: Mapping[str, Any]) -> tuple[str, bool, int | None, float | None, bool, int | None]:
    """A Logs request's ``(sandbox_id, follow, tail_lines, since, timestamps, offset)``, checked: TypeError
    or ValueError naming the field, for a wrong type, a negative count or offset, a non-finite ``since``."""
    sandbox_id = identifier("sandbox_id", m.field(request, "sandbox_id", str))
    tail = m.field(request, "tail_lines", int, None)
    if tail is not None and not 0 <= tail < 1 << 31:
        raise ValueError(f"tail_lines must be an int from 0 to 2**31-1 (or left out for all), got {tail!r}")
    since = m.field(request, "since", (int, float), None)
    if since is not None and not -1e12 < since < 1e12:
        raise ValueError(f"since must be seconds since the epoch (a finite number), got {since!r}")
    offset = m.field(request, "offset", int, None)
    if offset is not None and not 0 <= offset < 1 << 63:
        raise ValueError(f"offset must be a byte offset >= 0 that a Logs reply gave (or left out), got {offset!r}")
    return (sandbox_id, m.field(request, "follow", bool, False), tail,
            None if since is None else float(since), m.field(request, "timestamps", bool, False), offset)


def text(field: str, value: object, bound: int, *, optional: bool = False) -> int:
    """``value``'s size in bytes; TypeError unless it is a str, ValueError on NUL or above ``bound``."""
    if value is None and optional:
        return 0
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__} {short(value)}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > bound:
        raise ValueError(f"{field} is {size} bytes, above the {bound}-byte limit; shorten it")
    if "\0" in value:
        raise ValueError(f"{field} contains a NUL byte: {short(value)}; remove it (no program can receive it)")
    return size


def identifier(field: str, value: object) -> str:
    """A sandbox or lease id: a short str without NUL."""
    text(field, value, MAX_ID_BYTES)
    assert isinstance(value, str)  # text() raised otherwise
    return value


def strings(field: str, value: object, *, count: int, each: int, optional: bool = False) -> int:
    """A list of at most ``count`` strings of at most ``each`` bytes; their total size."""
    if value is None and optional:
        return 0
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{field} must be a list of str, got {type(value).__name__} {short(value)}")
    if len(value) > count:
        raise ValueError(f"{field} has {len(value)} entries, above the limit of {count}; send fewer")
    return sum(text(f"{field}[{i}]", item, each) for i, item in enumerate(value))


def mapping(field: str, value: object, *, count: int, each: int, env: bool = False, optional: bool = False) -> int:
    """A str -> str map of at most ``count`` entries; each ``name=value`` at most ``each`` bytes; total size.
    With ``env``, names must be non-empty and without ``=``."""
    if value is None and optional:
        return 0
    if not isinstance(value, Mapping):
        raise TypeError(f"{field} must be a map of str to str, got {type(value).__name__} {short(value)}")
    if len(value) > count:
        raise ValueError(f"{field} has {len(value)} entries, above the limit of {count}; send fewer")
    total = 0
    for key, item in value.items():
        size = text(f"{field} name", key, each) + text(f"{field}[{short(key, 30)}]", item, each) + 1
        if size > each:
            raise ValueError(f"{field} entry {short(key, 30)} is {size} bytes, above the {each}-byte limit")
        if env and (not key or "=" in key):
            raise ValueError(f"{field} name {short(key)} is invalid: names must be non-empty and without '='")
        total += size
    return total


def command_size(field: str, argv: object, env: object, *, budget: int = MAX_ARGV_ENV_BYTES) -> None:
    """An argument list and an environment within execve's bounds (see the module docstring), and
    together within ``budget`` bytes."""
    total = strings(f"{field} argv" if field else "args", argv, count=MAX_ARGS, each=MAX_STRING_BYTES,
                    optional=True)
    total += mapping(f"{field} env" if field else "environment_variables", env, count=MAX_ENV_ENTRIES,
                     each=MAX_STRING_BYTES, env=True, optional=True)
    if total > budget:
        raise ValueError(f"{field or 'the spec'}: arguments and environment are {total} bytes together, "
                         f"above the {budget}-byte limit; pass large data as a file instead")


def spec_dict(data: Mapping[str, Any]) -> None:
    """Bounds of a spec a client sent, checked on the plain map before any ``SandboxSpec`` is built."""
    if not isinstance(data, Mapping):
        raise TypeError(f"request field 'spec' must be a map of sandbox options, got {type(data).__name__}")
    text("container_image", data.get("container_image"), MAX_PATH_BYTES, optional=True)
    text("working_dir", data.get("working_dir"), MAX_PATH_BYTES, optional=True)
    text("command", data.get("command"), MAX_PATH_BYTES, optional=True)
    argv = data.get("args")
    command_size("", argv, data.get("environment_variables"), budget=MAX_SPEC_ARGV_ENV_BYTES)
    strings("tags", data.get("tags"), count=MAX_TAGS, each=MAX_TAG_BYTES, optional=True)
    mapping("annotations", data.get("annotations"), count=MAX_ANNOTATIONS, each=MAX_ANNOTATION_BYTES,
            optional=True)


def summary(spec_data: dict[str, Any]) -> dict[str, Any]:
    """``spec_data`` as a List reply carries it: whole if small, else without its large fields, so a
    List costs a bounded size per sandbox (Get still answers with the whole spec)."""
    if len(msgpack.packb(spec_data, use_bin_type=True)) <= MAX_SUMMARY_BYTES:
        return spec_data
    return {k: v for k, v in spec_data.items() if k not in ("environment_variables", "args", "annotations")}
