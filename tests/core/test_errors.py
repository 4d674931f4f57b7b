import pickle

import pytest

from sandpool import _errors
from sandpool._errors import (
    ActorDiedError,
    AsyncFunctionError,
    CWSandboxAuthenticationError,
    CWSandboxError,
    FunctionError,
    ProtocolError,
    RemoteError,
    SandboxDiedError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxProtocolError,
    SandboxResourceExhaustedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    SandboxUnavailableError,
    SandpoolError,
    SerializationError,
)

ALL_ERRORS = [
    getattr(_errors, name) for name in _errors.__all__ if name != "CWSandboxError"
]

PARENTS = {
    SandboxProtocolError: SandboxError,
    ProtocolError: SandboxProtocolError,
    CWSandboxAuthenticationError: SandpoolError,
    SandboxError: SandpoolError,
    SandboxNotRunningError: SandboxError,
    SandboxUnavailableError: SandboxNotRunningError,
    SandboxTimeoutError: SandboxError,
    SandboxTerminatedError: SandboxError,
    SandboxFailedError: SandboxError,
    SandboxNotFoundError: SandboxError,
    SandboxExecutionError: SandboxError,
    SandboxFileError: SandboxError,
    SandboxResourceExhaustedError: SandboxError,
    SandboxDiedError: SandboxError,
    ActorDiedError: SandboxDiedError,
    FunctionError: SandpoolError,
    AsyncFunctionError: FunctionError,
    SerializationError: FunctionError,
    RemoteError: (FunctionError, SandboxExecutionError),
}

BASE = ("reason", "metadata", "retry_delay")  # cwsandbox's three, on every class
EXTRAS = {
    SandpoolError: BASE,
    ProtocolError: (*BASE, "sandbox_id", "frame"),
    SandboxError: (*BASE, "sandbox_id"),
    SandboxFailedError: (*BASE, "sandbox_id", "status_reason"),
    SandboxExecutionError: (
        *BASE, "sandbox_id", "exec_result", "exception_type", "exception_message",
    ),
    SandboxFileError: (*BASE, "sandbox_id", "filepath"),
    SandboxDiedError: (*BASE, "sandbox_id", "exit_code", "signal"),
    ActorDiedError: (*BASE, "sandbox_id", "exit_code", "signal", "actor_name"),
    SerializationError: (*BASE, "obj_repr"),
    RemoteError: (*BASE, "sandbox_id", "exec_result", "exception_type", "exception_message",
                  "type_name", "remote_traceback"),
}


def test_all_lists_every_exception_class():
    """__all__ names every exception class the module defines, and nothing else."""
    defined = {
        name for name, obj in vars(_errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert set(_errors.__all__) == defined | {"CWSandboxError"}
    assert len(ALL_ERRORS) == len(PARENTS) + 1


@pytest.mark.parametrize("cls", list(PARENTS), ids=lambda c: c.__name__)
def test_hierarchy(cls):
    """Each class has exactly the documented direct parent and is a SandpoolError."""
    parents = PARENTS[cls]
    assert cls.__bases__ == (parents if isinstance(parents, tuple) else (parents,))
    assert issubclass(cls, SandpoolError)


def test_died_error_is_a_sandbox_error_not_a_function_error():
    """SandboxDiedError is an infrastructure failure under SandboxError, not FunctionError."""
    assert issubclass(SandboxDiedError, SandboxError)
    assert not issubclass(SandboxDiedError, FunctionError)


def test_cwsandbox_alias_is_the_base_class():
    """CWSandboxError is the very same class object as SandpoolError."""
    assert CWSandboxError is SandpoolError
    with pytest.raises(CWSandboxError):
        raise SandboxTimeoutError("too slow")


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_extras_default_to_none_and_str_is_the_message(cls):
    """Every declared extra defaults to None (metadata to {}), and str(e) is exactly the message."""
    exc = cls("something broke")
    assert str(exc) == "something broke"
    assert exc.message == "something broke"
    assert cls.extra_names() == EXTRAS[next(k for k in cls.__mro__ if k in EXTRAS)]
    assert all(getattr(exc, name) is None for name in cls.extra_names() if name != "metadata")
    assert exc.metadata == {}


def test_extras_are_kept_as_attributes():
    """Keyword-only extras given to the constructor are readable as attributes."""
    exc = SandboxFileError(
        "no such file", sandbox_id="sb-1", reason="CWSANDBOX_FILE_NOT_FOUND", filepath="/x",
    )
    assert (exc.sandbox_id, exc.reason, exc.filepath) == ("sb-1", "CWSANDBOX_FILE_NOT_FOUND", "/x")
    died = SandboxDiedError("agent killed", sandbox_id="sb-2", signal=9)
    assert (died.exit_code, died.signal) == (None, 9)
    remote = RemoteError("boom", type_name="mymod.MyError", remote_traceback="Traceback ...")
    assert (remote.type_name, remote.message, remote.remote_traceback) == (
        "mymod.MyError", "boom", "Traceback ...",
    )


def test_unknown_extra_is_a_type_error_listing_the_valid_ones():
    """An undeclared keyword raises TypeError naming it and the valid keywords."""
    with pytest.raises(TypeError, match=r"'filepth'.*reason, metadata, retry_delay, sandbox_id, filepath"):
        SandboxFileError("x", filepth="/x")


def test_extras_are_keyword_only():
    """Extras cannot be passed positionally."""
    with pytest.raises(TypeError):
        SandboxError("x", "sb-1")  # type: ignore[call-arg]


def test_repr_shows_the_set_extras():
    """repr shows the class, the message and the extras that are not None."""
    exc = SandboxFailedError("failed", sandbox_id="sb-1", status_reason="OOMKilled")
    assert repr(exc) == "SandboxFailedError('failed', sandbox_id='sb-1', status_reason='OOMKilled')"


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_pickle_round_trip_keeps_type_message_and_extras(cls):
    """Every class survives pickle with its type, message and every extra intact."""
    extras = {name: {"k": "v"} if name == "metadata" else f"value of {name}" for name in cls.extra_names()}
    exc = cls("the message", **extras)
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls
    assert str(copy) == "the message"
    assert copy.extras() == extras


def test_pickle_keeps_structured_extras_and_notes():
    """Non-string extras and notes added with add_note() survive pickle too."""
    exc = SandboxExecutionError("exit 1", exec_result={"returncode": 1}, exception_type="KeyError")
    exc.add_note("while running step 3")
    copy = pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    assert copy.exec_result == {"returncode": 1}
    assert copy.exception_type == "KeyError"
    assert copy.__notes__ == ["while running step 3"]


def test_subclass_with_required_keyword_extra_round_trips():
    """A user subclass whose extra is required keyword-only still unpickles."""

    class Required(SandboxError):
        def __init__(self, message: str = "", *, sandbox_id: str, **extras: object) -> None:
            super().__init__(message, sandbox_id=sandbox_id, **extras)

    globals()["Required"] = Required
    Required.__qualname__ = "Required"
    try:
        copy = pickle.loads(pickle.dumps(Required("gone", sandbox_id="sb-9")))
        assert (type(copy), copy.sandbox_id, str(copy)) == (Required, "sb-9", "gone")
    finally:
        del globals()["Required"]


def test_errors_module_imports_only_the_stdlib():
    """_errors imports nothing outside the standard library but the root of the tree, which lives
    with the sandbox side (that it imports nothing more is tests/agent/test_agent_imports.py)."""
    import ast
    import sys

    tree = ast.parse(open(_errors.__file__).read())
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0] for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert roots <= set(sys.stdlib_module_names) | {"__future__", "_sandpool_agent"}
