"""How the fake agent reads a remote call and encodes its answer, exactly as the real call worker does.

The client's frames go through a real cloudpickle round trip (so a test still catches a function
or argument that does not pickle), and answers are encoded as ``_sandpool_agent.worker`` encodes
them. This is the one place to change when the worker's result encoding changes.
"""

from __future__ import annotations

import traceback
from typing import Any

from _sandpool_agent import plain as _plain

def load_call(frame: dict[str, Any],
              fns: dict[bytes, Any]) -> tuple[Any, tuple[Any, ...], dict[str, Any]] | dict[str, Any]:
    """``(fn, args, kwargs)`` of a ``call`` frame, or the ``error`` frame that answers it."""
    import cloudpickle

    key = frame.get("fn_key") or b""
    what = "function"
    try:
        if frame["fn"]:
            fns[key] = cloudpickle.loads(frame["fn"])
        elif key not in fns:
            return error(frame["id"], "protocol", "the agent has no function for this fn_key; send its bytes")
        what = "arguments"
        args, kwargs = cloudpickle.loads(frame["args"])
    except BaseException as exc:  # noqa: BLE001 - any unpickling failure is reported, as the worker does
        return error(frame["id"], "serialization", f"the {what} could not be unpickled in the sandbox: "
                     f"{type(exc).__name__}: {exc}", traceback=_format(exc))
    return fns[key], args, kwargs


def result(call_id: int, value: Any, micros: int, pickled: bool = False) -> dict[str, Any]:
    """The ``result`` frame for a returned value: plain data (``_plain``), or a cloudpickle when the
    function opted in (``pickled``); a ``serialization`` error if it cannot travel."""
    import cloudpickle

    try:
        data = cloudpickle.dumps(value, protocol=5) if pickled else _plain.encode(value)
    except _plain.NotPlain as exc:
        return error(call_id, "serialization", f"the result ({_qualified(type(value))}) is not plain data: {exc}; "
                     f"return plain data ({_plain.PLAIN_TYPES}), or pass unsafe_pickle_results=True to "
                     "@session.function(...) to receive any object, for code you trust")
    except BaseException as exc:  # noqa: BLE001
        return error(call_id, "serialization", f"the result ({_qualified(type(value))}) could not be sent: "
                     f"{type(exc).__name__}: {exc}")
    return {"t": "result", "id": call_id, "us": micros, "data": data}


def user_error(call_id: int, exc: BaseException, pickled: bool = False) -> dict[str, Any]:
    """The ``error`` frame of kind "user" for an exception the function raised: plain data
    (``exc``), plus its pickle when the function opted in."""
    import cloudpickle

    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        message = f"<{cls.__name__} with an unprintable message>"
    extra: dict[str, object] = {"type_name": _qualified(cls), "traceback": _format(exc)}
    try:
        extra["exc"] = _plain.describe_exception(exc)
    except BaseException:  # noqa: BLE001 - the caller gets a RemoteError with the text instead
        pass
    if pickled:
        try:
            extra["data"] = cloudpickle.dumps(exc, protocol=5)
        except BaseException:  # noqa: BLE001
            pass
    return error(call_id, "user", message, **extra)


def error(call_id: int, kind: str, message: str, **extra: object) -> dict[str, Any]:
    return {"t": "error", "id": call_id, "kind": kind, "message": message, **extra}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
