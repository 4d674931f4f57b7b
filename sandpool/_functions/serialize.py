"""Serialization for remote functions, on the caller's side: one place for every such concern.

Going in, functions and arguments travel as cloudpickle (protocol 5). Functions keep their source
file name (cloudpickle replaces it with "<dynamic-code>"), so remote tracebacks show real files
and lines. A value that will not pickle raises SerializationError naming the culprit (the argument,
or the global or closure variable of the function) before anything is sent.

Coming back, nothing a sandbox sends is unpickled (unless the function opted in with
``unsafe_pickle_results=True``): results are plain data (``_agent._plain``), and a remote exception
is rebuilt from plain data as the user's own type when that class is already loaded here, is an
Exception and takes the plain arguments; it is then also a SandboxExecutionError (a cached
subclass of both, as Ray does). Otherwise it is a RemoteError with the type's name, the message and
the traceback text. Either way the remote traceback is attached as ``__cause__`` (a
``RemoteTraceback``, as concurrent.futures does).
"""

from __future__ import annotations

import dis
import hashlib
import io
import linecache
import os
import pickle
import re
import reprlib
import stat
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Callable, MutableMapping
from typing import Any, cast

import cloudpickle

from _sandpool_agent import plain as _plain
from . import held as _held
from .._errors import RemoteError, SandboxExecutionError, SerializationError

_DYNAMIC = "<dynamic-code>"
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


#: cloudpickle's own reducer of code objects, from its public dispatch table.
_CLOUD_CODE_REDUCE: Callable[[types.CodeType], Any] = cloudpickle.Pickler.dispatch_table[types.CodeType]
#: cloudpickle's table (a ChainMap over copyreg's, which the stubs type as pickle's read-only Mapping).
_CLOUD_TABLE = cast("MutableMapping[type, Callable[[Any], Any]]", cloudpickle.Pickler.dispatch_table)


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    rebuild, args = _CLOUD_CODE_REDUCE(code)
    return rebuild, tuple(code.co_filename if a == _DYNAMIC else a for a in args)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # (cloudpickle ships no types)
    dispatch_table: ChainMap[type, Callable[[Any], Any]] = ChainMap({types.CodeType: _code_reduce}, _CLOUD_TABLE)


def dumps(obj: object) -> bytes:
    """cloudpickle ``obj`` (protocol 5), keeping code objects' file names. Raises what pickling raises."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


class _Parts:
    """A pickler's file that keeps what it is given: large bytes objects arrive whole and are kept
    by reference, not copied (mutable buffers are copied, so later changes cannot leak in; a held
    result's sealed bytes cannot change, so they are kept as a view: see ``held``)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        if type(data) is pickle.PickleBuffer and _held.is_sealed(data):
            data = data.raw()
        elif type(data) is not bytes:
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
    names = _code_globals(code)
    candidates += [(f"global {name!r}", fn_globals[name]) for name in names if name in fn_globals]
    candidates += [(f"default argument {i}", value) for i, value in enumerate(fn.__defaults__ or ())]
    for label, value in candidates:
        try:
            dumps(value)
        except Exception:
            return label, value
    return None, fn


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL"})


def _code_globals(code: types.CodeType) -> dict[str, None]:
    """The global names ``code`` and the functions nested in it use, in order of first use."""
    names = {ins.argval: None for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_OPS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_code_globals(const))
    return names


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


def loads_result(data: Any, name: str, pickled: bool = False) -> Any:
    """Decode a result from its bytes: plain data, or (``pickled``: the function opted in) a
    cloudpickle. SerializationError for anything that does not decode; nothing else of the session
    is affected."""
    if pickled:
        try:
            return loads(data)
        except Exception as exc:
            raise SerializationError(
                f"the result of {name!r} could not be unpickled here ({type(exc).__name__}: {exc}); "
                "return plain data or instances of classes importable on this side",
            ) from exc
    try:
        return _plain.decode(data)
    except _plain.Malformed as exc:
        raise decode_error(exc, name) from exc


def loads_result_file(fd: int, size: int, name: str, pickled: bool = False) -> Any:
    """``loads_result`` for a result held by a regular file of ``size`` bytes (OSError if it
    cannot be read)."""
    if pickled:
        data = bytearray(size)
        view = memoryview(data)
        while view:
            n = os.readv(fd, [view])
            if n == 0:
                raise SerializationError(f"the result file of {name!r} is shorter than {size} bytes")
            view = view[n:]
        return loads_result(data, name, pickled)
    try:
        return _plain.decode_file(fd, size)
    except _plain.Malformed as exc:
        raise decode_error(exc, name) from exc


def decode_error(exc: _plain.Malformed, name: str) -> SerializationError:
    if isinstance(exc, _plain.NeedsNumpy):
        return SerializationError(f"the result of {name!r} could not be rebuilt here: {exc}")
    return SerializationError(
        f"the result of {name!r} is not valid plain data ({exc}); the sandbox sent a malformed answer")


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


#: Source lines are filled in only from regular ``.py`` files up to this size, for this many entries.
MAX_SOURCE_BYTES = 4 * 1024 * 1024
MAX_FILLED_ENTRIES = 200


def _is_source_file(path: str) -> bool:
    """A file the traceback text may name for its source: the text comes from the sandbox, so a
    FIFO (reading it would block here), a device (``/dev/zero`` would fill memory) or a non-Python
    file is never read."""
    if not path.endswith(".py"):
        return False
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size <= MAX_SOURCE_BYTES


def _fill_source_lines(text: str) -> str:
    """Add the source line under each traceback entry that lacks one, read from this side's files
    (the sandbox has its own root, so it often cannot see the caller's source)."""
    lines = text.splitlines()
    out = []
    filled = 0
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME_LINE.match(line)
        if match is None or filled >= MAX_FILLED_ENTRIES:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(match[1] + "  ") and not _FRAME_LINE.match(following):
            continue  # the remote side had the source
        filled += 1
        if not _is_source_file(match[2]):
            continue
        source = linecache.getline(match[2], int(match[3])).strip()
        if source:
            out.append(f"{match[1]}  {source}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


#: Longest remote message and traceback text kept (a sandbox's own limits are lower).
MAX_TEXT_CHARS = 2 * 1024 * 1024


def _text(frame: dict[str, Any], key: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str):
        return ""
    return value if len(value) <= MAX_TEXT_CHARS else value[:MAX_TEXT_CHARS] + "... [clipped]"


def remote_exception(frame: dict[str, Any], sandbox_id: str | None, pickled: bool = False) -> Exception:
    """The user's exception from an ``error`` frame of kind "user", its remote traceback attached.

    Rebuilt from the frame's plain description (``exc``), or unpickled from ``data`` when
    ``pickled`` (the function opted in). An exception that cannot be rebuilt here, or is no
    Exception (SystemExit, a KeyboardInterrupt raised by the function itself), becomes RemoteError:
    re-raising those here would end the caller.
    """
    text = _fill_source_lines(_text(frame, "traceback"))
    message, type_name = _text(frame, "message"), _text(frame, "type_name") or "Exception"
    exc: Exception | None = None
    if pickled and isinstance(frame.get("data"), bytes):
        try:
            loaded = loads(frame["data"])
        except Exception:
            loaded = None
        if isinstance(loaded, Exception):
            exc = _as_execution_error(loaded, sandbox_id, type_name, message)
    if exc is None and isinstance(frame.get("exc"), bytes):
        exc = _rebuild(frame["exc"], sandbox_id, type_name, message)
    if exc is None:
        exc = RemoteError(f"{type_name}: {message}", type_name=type_name, remote_traceback=text,
                          sandbox_id=sandbox_id, exception_type=type_name, exception_message=message)
    exc.__cause__ = RemoteTraceback(text, sandbox_id)
    return exc


def _find_class(module: object, qualname: object) -> type | None:
    """The class ``module.qualname`` if its module is loaded already: dictionary lookups only, so
    no module is imported and no ``__getattr__`` (of a module or a metaclass) runs."""
    if not isinstance(module, str) or not isinstance(qualname, str):
        return None
    obj: object = sys.modules.get(module)
    for part in qualname.split("."):
        if not issubclass(type(obj), (types.ModuleType, type)):  # type(), not isinstance(): no __class__ runs
            return None
        namespace = object.__getattribute__(obj, "__dict__")
        if type(namespace) not in (dict, types.MappingProxyType):
            return None
        obj = namespace.get(part)
    return obj if issubclass(type(obj), type) else None  # type: ignore[return-value]  # a class


def _rebuild(data: bytes, sandbox_id: str | None, type_name: str, message: str) -> Exception | None:
    """The user's exception from its plain description, or None if it cannot be rebuilt here."""
    try:
        info = _plain.decode(data)
    except _plain.Malformed:
        return None
    if type(info) is not dict or type(info.get("args")) is not tuple:
        return None
    cls = _find_class(info.get("module"), info.get("qualname"))
    if cls is None or not issubclass(cls, Exception):
        return None
    try:
        exc = cls(*info["args"])
    except Exception:  # it does not take its own args back: the description is all there is
        return None
    if not isinstance(exc, cls):
        return None
    attrs, notes = info.get("attrs"), info.get("notes")
    state = getattr(exc, "__dict__", None)
    if type(attrs) is dict and isinstance(state, dict):
        state.update((k, v) for k, v in attrs.items() if type(k) is str and not k.startswith("__"))
    if type(notes) is list and all(type(n) is str for n in notes) and isinstance(state, dict):
        state["__notes__"] = notes
    return _as_execution_error(exc, sandbox_id, type_name, message)


_dual_classes: dict[type, type] = {}
_dual_lock = threading.Lock()


def _dual_class(cls: type[Exception]) -> type[Exception]:
    """The subclass of both ``cls`` and SandboxExecutionError, made once per class. It looks like
    ``cls`` in tracebacks and reprs, and pickles as itself (rebuilt through this function)."""
    dual = _dual_classes.get(cls)
    if dual is None:
        with _dual_lock:
            dual = _dual_classes.get(cls)
            if dual is None:
                namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                             "__str__": cls.__str__, "__repr__": cls.__repr__,
                             "__reduce__": _reduce_dual, "__doc__": cls.__doc__}
                # pyright computes the MRO of the parameter's declared base, not of the class it gets
                dual = _dual_classes[cls] = type(  # pyright: ignore[reportGeneralTypeIssues]
                    cls.__name__, (cls, SandboxExecutionError), namespace)
    return dual


def _reduce_dual(exc: BaseException) -> tuple[Any, ...]:
    base = type(exc).__mro__[1]
    return _make_dual, (base, exc.args, dict(getattr(exc, "__dict__", {})))


def _make_dual(cls: type[Exception], args: tuple[Any, ...], state: dict[str, Any]) -> Exception:
    """An instance of ``_dual_class(cls)`` with these args and attributes, without running any
    ``__init__`` (the values come from an instance that was built already)."""
    dual = _dual_class(cls)
    exc = dual.__new__(dual, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _as_execution_error(exc: Exception, sandbox_id: str | None, type_name: str, message: str) -> Exception:
    """``exc`` made also a SandboxExecutionError (cwsandbox's habit), with that class's attributes
    where the user's own do not take the names. ``exc`` itself when that cannot be done."""
    if isinstance(exc, SandboxExecutionError):
        return exc
    try:
        dual = _make_dual(type(exc), exc.args, dict(getattr(exc, "__dict__", {})))
    except Exception:  # a class that cannot be subclassed or made without __init__: keep its own type
        return exc
    if isinstance(exc, OSError):  # kept in slots, not in args or __dict__
        for name in ("errno", "strerror", "filename", "filename2"):
            setattr(dual, name, getattr(exc, name))
    extras = {**vars(SandboxExecutionError(message)),  # every attribute cwsandbox's class has (metadata, ...)
              "sandbox_id": sandbox_id, "exception_type": type_name, "exception_message": message}
    for name, value in extras.items():
        dual.__dict__.setdefault(name, value)
    return dual
