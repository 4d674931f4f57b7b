"""Pickling for remote functions, on the caller's side: one place for every serialization concern.

Functions, arguments and results travel as cloudpickle (protocol 5). Functions keep their source
file name (cloudpickle replaces it with "<dynamic-code>"), so remote tracebacks show real files
and lines. A value that will not pickle raises SerializationError naming the culprit (the argument,
or the global or closure variable of the function) before anything is sent.

A remote exception comes back as itself, with the remote traceback attached as ``__cause__`` (a
``RemoteTraceback``, as concurrent.futures does), or as RemoteError when its class cannot be
unpickled here.
"""

from __future__ import annotations

import hashlib
import io
import linecache
import pickle
import re
import reprlib
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

from ._errors import RemoteError, SerializationError

_DYNAMIC = "<dynamic-code>"
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    rebuild, args = _cp._code_reduce(code)
    return rebuild, tuple(code.co_filename if a == _DYNAMIC else a for a in args)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: object) -> bytes:
    """cloudpickle ``obj`` (protocol 5), keeping code objects' file names. Raises what pickling raises."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


class _Parts:
    """A pickler's file that keeps what it is given: large bytes objects arrive whole and are kept
    by reference, not copied (mutable buffers are copied, so later changes cannot leak in)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        if type(data) is not bytes:
            data = bytes(data)
        self.parts.append(data)
        self.size += len(data)
        return len(data)


def dumps_parts(obj: object, join_below: int) -> bytes | list[bytes]:
    """Pickle ``obj``: bytes when smaller than ``join_below``, else the list of parts (uncopied)."""
    out = _Parts()
    _Pickler(out, protocol=5).dump(obj)
    if out.size < join_below:
        return out.parts[0] if len(out.parts) == 1 else b"".join(out.parts)
    return out.parts


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


def fn_key(data: bytes) -> bytes:
    """The key a pickled function is known by in a sandbox (16 bytes of BLAKE2b)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def describe(obj: object) -> str:
    return f"{type(obj).__name__} object {_repr.repr(obj)}"


def dumps_function(fn: Callable[..., Any], name: str) -> bytes:
    """Pickle the function itself; SerializationError naming the global or closure variable at fault."""
    try:
        return dumps(fn)
    except Exception as exc:
        label, culprit = _function_culprit(fn)
        what = f"{label} ({describe(culprit)})" if label else describe(fn)
        raise SerializationError(
            f"cannot pickle function {name!r}: its {what} does not pickle ({type(exc).__name__}: {exc}); "
            "create such objects inside the function instead", obj_repr=_repr.repr(culprit if label else fn),
        ) from exc


def _function_culprit(fn: Callable[..., Any]) -> tuple[str | None, object]:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None, fn
    candidates: list[tuple[str, object]] = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            candidates.append((f"closure variable {name!r}", cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    fn_globals = getattr(fn, "__globals__", {})
    try:
        names = _cp._extract_code_globals(code)
    except Exception:  # a private helper of cloudpickle: fall back to the flat name list
        names = code.co_names
    candidates += [(f"global {name!r}", fn_globals[name]) for name in names if name in fn_globals]
    candidates += [(f"default argument {i}", value) for i, value in enumerate(fn.__defaults__ or ())]
    for label, value in candidates:
        try:
            dumps(value)
        except Exception:
            return label, value
    return None, fn


#: Values that plain pickle writes exactly as cloudpickle would (no class or function by reference).
_PLAIN = frozenset({int, float, str, bool, type(None), complex})


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any], name: str,
               join_below: int = 1 << 62) -> bytes | list[bytes]:
    """Pickle one call's ``(args, kwargs)`` (see ``dumps_parts``); SerializationError naming the
    argument at fault."""
    if not kwargs and all(type(a) in _PLAIN for a in args):  # the common f(3): 10x cheaper
        return pickle.dumps((args, kwargs), protocol=5)
    try:
        return dumps_parts((args, kwargs), join_below)
    except Exception as exc:
        labelled = [(f"argument {i}", a) for i, a in enumerate(args)]
        labelled += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
        label, culprit = "arguments", (args, kwargs)
        for candidate_label, value in labelled:
            try:
                dumps(value)
            except Exception:
                label, culprit = candidate_label, value
                break
        raise SerializationError(
            f"cannot pickle {label} of {name!r}: {describe(culprit)} ({type(exc).__name__}: {exc}); "
            "pass picklable values (plain data, or objects of importable classes)",
            obj_repr=_repr.repr(culprit),
        ) from exc


def loads_result(data: bytes, name: str) -> Any:
    """Unpickle a result; SerializationError if its class cannot be found here."""
    try:
        return loads(data)
    except Exception as exc:
        raise SerializationError(
            f"the result of {name!r} could not be unpickled here ({type(exc).__name__}: {exc}); "
            "return plain data or instances of classes importable on this side",
        ) from exc


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a sandbox, attached as the exception's ``__cause__``.

    ``traceback`` is its text and ``sandbox_id`` where it was raised.
    """

    def __init__(self, traceback: str, sandbox_id: str | None) -> None:
        super().__init__(traceback)
        self.traceback = traceback
        self.sandbox_id = sandbox_id

    def __str__(self) -> str:
        return f'\n"""\nRemote traceback, in sandbox {self.sandbox_id}:\n{self.traceback.rstrip()}\n"""'


_FRAME_LINE = re.compile(r'^(\s*)File "([^"]+)", line (\d+), in ')


def _fill_source_lines(text: str) -> str:
    """Add the source line under each traceback entry that lacks one, read from this side's files
    (the sandbox has its own root, so it often cannot see the caller's source)."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        if match is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(match[1] + "  ") and not _FRAME_LINE.match(following):
            continue  # the remote side had the source
        source = linecache.getline(match[2], int(match[3])).strip()
        if source:
            out.append(f"{match[1]}  {source}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def remote_exception(frame: dict, sandbox_id: str | None) -> Exception:
    """The user's exception from an ``error`` frame of kind "user", its remote traceback attached.

    An exception that does not unpickle here, or is no Exception (SystemExit, a KeyboardInterrupt
    raised by the function itself), becomes RemoteError: re-raising those here would end the caller.
    """
    text = _fill_source_lines(frame.get("traceback") or "")
    exc: object = None
    if frame.get("data") is not None:
        try:
            exc = loads(frame["data"])
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        type_name = frame.get("type_name") or "Exception"
        exc = RemoteError(f"{type_name}: {frame['message']}", type_name=type_name, remote_traceback=text,
                          sandbox_id=sandbox_id)
    exc.__cause__ = RemoteTraceback(text, sandbox_id)
    return exc
