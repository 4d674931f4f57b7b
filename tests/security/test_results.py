"""Nothing a sandbox sends back as a remote function's result or exception runs code in the client.

Each attack is what code inside a sandbox can do: return or raise an object whose ``__reduce__``
is ``os.system``, or (as hostile code that took over the call worker) write forged answers on
the worker's socket: a pickle where plain data belongs, an exception naming a module the client
never imported or a function instead of a class, a result "file" that is a link to a host file
or a FIFO. Each test asserts that the command did not run on the host (its marker file is never
created), that the call fails with a clear error, and that the same session's next call works.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

import cloudpickle
import pytest

from sandpool import RemoteError, SandboxExecutionError, SerializationError, Session
from sandpool._functions import bulk as _bulk
from sandpool._functions.serialize import RemoteTraceback

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Evil:
    """Unpickling this runs ``touch marker`` (what the client used to do with results)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilError(Exception):
    """An exception that runs ``touch marker`` when unpickled."""

    def __reduce__(self):
        return os.system, (f"touch {self.args[0]}",)


class Rejected(Exception):
    """A user's exception with two arguments and an attribute of its own."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(code, why)
        self.code = code


@dataclasses.dataclass
class Reading:
    sensor: str
    values: list


def forge(answer: dict) -> None:
    """Inside the sandbox: send ``answer`` for the running call on the worker's own socket, before
    the worker answers it, as hostile code that took the worker over would."""
    import gc
    import struct

    import msgpack

    worker = next(o for o in gc.get_objects() if type(o).__name__ == "Worker" and hasattr(o, "outbox"))
    body = msgpack.packb({**answer, "id": worker.current}, use_bin_type=True)
    worker.io.sendall(struct.pack(">I", len(body)) + body)


@pytest.fixture(params=["direct", "relay"])
def session(request, monkeypatch):
    """A session whose calls reach the worker directly (local sandboxes), or through the agent's
    relay, as for sandboxes of a `sandpool serve` server or Slurm (no bulk directory then)."""
    if request.param == "relay":
        monkeypatch.setattr(_bulk, "host_dir", lambda sandbox: None)
    with Session() as s:
        yield s


def still_works(session: Session) -> None:
    """The same session's next call runs and returns."""
    @session.function
    def double(x):
        return 2 * x

    assert double.remote(21).result(timeout=60) == 42


def test_result_whose_reduce_is_os_system_never_runs_in_the_client(session, tmp_path):
    """A result whose __reduce__ is os.system fails in the sandbox with SerializationError naming
    the type and the opt-in; the command never runs here; the session keeps working."""
    marker = tmp_path / "pwned-result"

    @session.function
    def attack(path):
        return [1, Evil(path)]

    with pytest.raises(SerializationError, match=r"Evil object is not plain data.*unsafe_pickle_results=True"):
        attack.remote(str(marker)).result(timeout=60)
    assert not marker.exists()
    still_works(session)


def test_exception_whose_reduce_is_os_system_comes_back_without_running(session, tmp_path):
    """An exception whose __reduce__ is os.system is rebuilt from plain data as itself (and as a
    SandboxExecutionError): the command never runs here."""
    marker = tmp_path / "pwned-exception"

    @session.function
    def attack(path):
        raise EvilError(path)

    with pytest.raises(EvilError) as info:
        attack.remote(str(marker)).result(timeout=60)
    assert isinstance(info.value, SandboxExecutionError) and info.value.args == (str(marker),)
    assert not marker.exists()
    still_works(session)


def test_forged_pickle_result_is_malformed_not_unpickled(session, tmp_path):
    """Hostile code that writes a pickle as the call's result on the worker's socket gets a
    SerializationError ("not valid plain data") for that call; nothing is unpickled."""
    marker = tmp_path / "pwned-forged"

    @session.function
    def attack(path):
        forge({"t": "result", "data": cloudpickle.dumps(Evil(path))})
        return "the real answer, too late"

    with pytest.raises(SerializationError, match="not valid plain data"):
        attack.remote(str(marker)).result(timeout=60)
    assert not marker.exists()
    still_works(session)


def test_forged_exception_pickle_and_names_are_not_trusted(session, tmp_path, monkeypatch):
    """A forged error frame carrying a pickled exception, and plain descriptions naming os.system
    or a class of a module the client never imported: RemoteError each time, nothing unpickled,
    no module imported (importing the bait module would create the marker)."""
    marker = tmp_path / "pwned-import"
    (tmp_path / "sandpool_bait_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass BaitError(Exception):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from _sandpool_agent import plain as _plain

    cases = [
        {"data": cloudpickle.dumps(EvilError(str(marker))), "type_name": "x.EvilError"},
        {"exc": _plain.encode({"module": "os", "qualname": "system", "args": (f"touch {marker}",)}),
         "type_name": "os.system"},
        {"exc": _plain.encode({"module": "sandpool_bait_module", "qualname": "BaitError", "args": ("x",)}),
         "type_name": "sandpool_bait_module.BaitError"},
    ]

    @session.function
    def attack(fields):
        forge({"t": "error", "kind": "user", "message": "forged", "traceback": "forged traceback", **fields})

    for fields in cases:
        with pytest.raises(RemoteError) as info:
            attack.remote(fields).result(timeout=60)
        assert info.value.type_name == fields["type_name"] and "forged" in str(info.value)
        assert isinstance(info.value, SandboxExecutionError)
    assert not marker.exists() and "sandpool_bait_module" not in sys.modules
    still_works(session)


def test_forged_traceback_naming_a_fifo_or_device_is_not_read(session, tmp_path):
    """Source lines of a remote traceback are filled in from this side's files: a forged traceback
    naming a FIFO here (reading it would block the client) or /dev/zero (reading it would fill the
    client's memory) is shown as it came, without reading them."""
    fifo = tmp_path / "blocks.py"
    os.mkfifo(fifo)

    @session.function
    def attack(paths):
        lines = "".join(f'  File "{p}", line 1, in attack\n' for p in paths)
        forge({"t": "error", "kind": "user", "message": "forged", "type_name": "x.Forged",
               "traceback": f"Traceback (most recent call last):\n{lines}x.Forged: forged\n"})

    with pytest.raises(RemoteError) as info:
        attack.remote([str(fifo), "/dev/zero"]).result(timeout=60)
    assert str(fifo) in info.value.remote_traceback and "/dev/zero" in info.value.remote_traceback
    still_works(session)


@pytest.fixture
def direct_session():
    """A session of local sandboxes, whose results may come as files (the relay mode has none)."""
    with Session() as s:
        yield s


def test_forged_result_files_that_are_links_or_fifos_are_refused(direct_session, tmp_path):
    """A result "file" that is a symlink to a host file, or a FIFO, in the sandbox's /tmp: the
    client refuses it (no link followed, no read that blocks) and fails that call only."""
    session = direct_session

    @session.function
    def attack(kind):
        path = f"/tmp/.sandpool-r-forged-{kind}"
        if kind == "link":
            os.symlink("/etc/hostname", path)
        else:
            os.mkfifo(path)
        forge({"t": "result", "path": path})

    @session.function
    def probe():
        return 1

    probe.remote().result(timeout=60)
    slot = next(slot for pool in session._pools.values() for slot in pool.slots)
    assert slot.bulk_dir is not None  # local sandboxes offer result files
    for kind, words in (("link", "could not be read"), ("fifo", "not a regular file")):
        with pytest.raises(SerializationError, match=words):
            attack.remote(kind).result(timeout=60)
    still_works(session)


def test_result_of_a_class_the_client_lacks_fails_clearly(session):
    """A result whose class exists only in the sandbox fails with SerializationError naming it."""
    @session.function
    def make():
        namespace: dict = {}
        exec("class OnlyInTheSandbox:\n    pass\nvalue = OnlyInTheSandbox()", namespace)
        return {"value": namespace["value"]}

    with pytest.raises(SerializationError, match="OnlyInTheSandbox object is not plain data"):
        make.remote().result(timeout=60)
    still_works(session)


def test_exception_is_its_own_type_and_a_sandbox_execution_error(session):
    """A remote ValueError is caught by `except ValueError` and by `except SandboxExecutionError`;
    a user's exception comes back with its args, attributes and notes, its remote traceback as
    __cause__, and pickles as itself."""
    @session.function
    def fail(kind):
        if kind == "value":
            raise ValueError("bad value")
        if kind == "file":
            open("/nonexistent-dir/data.txt")
        error = Rejected(404, "no such page")
        error.add_note("while fetching")
        raise error

    try:
        fail.remote("value").result(timeout=60)
    except SandboxExecutionError as caught:
        assert isinstance(caught, ValueError) and caught.args == ("bad value",)
        assert str(caught) == "bad value" and repr(caught) == "ValueError('bad value')"
        assert caught.exception_type == "builtins.ValueError" and caught.sandbox_id.startswith("sb-")
    with pytest.raises(ValueError):
        fail.remote("value").result(timeout=60)
    with pytest.raises(FileNotFoundError) as missing:
        fail.remote("file").result(timeout=60)
    assert missing.value.filename == "/nonexistent-dir/data.txt" and "No such file" in str(missing.value)
    with pytest.raises(Rejected) as info:
        fail.remote("rejected").result(timeout=60)
    error = info.value
    assert isinstance(error, SandboxExecutionError)
    assert error.args == (404, "no such page") and error.code == 404 and error.__notes__ == ["while fetching"]
    assert isinstance(error.__cause__, RemoteTraceback) and "raise error" in error.__cause__.traceback
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, Rejected) and isinstance(again, SandboxExecutionError) and again.code == 404
    assert type(again) is type(error)


def test_exception_whose_type_cannot_be_rebuilt_is_a_remote_error(session):
    """A class defined inside the function (not loadable here) comes back as RemoteError with the
    type's name, the message and the traceback text; it is a SandboxExecutionError too."""
    @session.function
    def fail():
        class LocalProblem(Exception):
            pass

        raise LocalProblem("only here")

    with pytest.raises(RemoteError) as info:
        fail.remote().result(timeout=60)
    error = info.value
    assert error.type_name.endswith("fail.<locals>.LocalProblem") and "only here" in str(error)
    assert "raise LocalProblem" in error.remote_traceback and isinstance(error, SandboxExecutionError)
    still_works(session)


def test_numpy_results_round_trip_as_plain_data(session):
    """Arrays (small, large enough for a file, Fortran-ordered, structured, datetime) and numpy
    scalars come back equal, writable and with their dtype; an object array is refused."""
    np = pytest.importorskip("numpy")

    @session.function
    def arrays():
        import numpy

        return {"small": numpy.arange(6, dtype=numpy.int16).reshape(2, 3),
                "large": numpy.arange(1_000_000, dtype=numpy.float64),
                "fortran": numpy.asfortranarray(numpy.arange(12.0).reshape(3, 4)),
                "records": numpy.array([(1, 2.5)], dtype=[("a", "i4"), ("b", "f8")]),
                "dates": numpy.array(["2024-01-01"], dtype="M8[D]"),
                "scalar": numpy.float32(1.5)}

    @session.function
    def objects():
        import numpy

        return numpy.array([1, None], dtype=object)

    out = arrays.remote().result(timeout=60)
    assert out["small"].dtype == np.int16 and out["small"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["large"].flags.writeable and float(out["large"].sum()) == float(np.arange(1_000_000).sum())
    assert (out["fortran"] == np.arange(12.0).reshape(3, 4)).all()
    assert out["records"].dtype.names == ("a", "b") and out["records"]["b"][0] == 2.5
    assert str(out["dates"][0]) == "2024-01-01"
    assert type(out["scalar"]) is np.float32 and out["scalar"] == 1.5
    with pytest.raises(SerializationError, match="dtype object holds Python objects"):
        objects.remote().result(timeout=60)
    still_works(session)


def test_unsafe_pickle_results_brings_back_a_dataclass(session):
    """With unsafe_pickle_results=True a dataclass comes back as itself, and a custom exception
    is unpickled as itself and is a SandboxExecutionError; without it, the same result fails."""
    @session.function(unsafe_pickle_results=True)
    def read(sensor):
        if sensor == "broken":
            raise Rejected(500, "sensor broken")
        return Reading(sensor, [1.5, 2.5])

    @session.function
    def read_plain(sensor):
        return Reading(sensor, [1.5])

    assert read.remote("t1").result(timeout=60) == Reading("t1", [1.5, 2.5])
    with pytest.raises(Rejected) as info:
        read.remote("broken").result(timeout=60)
    assert isinstance(info.value, SandboxExecutionError) and info.value.code == 500
    with pytest.raises(SerializationError, match="Reading object is not plain data"):
        read_plain.remote("t1").result(timeout=60)
    assert [r.result(timeout=60) for r in read.map([("a",), ("b",)])] == [Reading("a", [1.5, 2.5]),
                                                                          Reading("b", [1.5, 2.5])]


def _ext(code: int, data: bytes = b"") -> object:
    import msgpack

    return msgpack.ExtType(code, data)


@pytest.mark.parametrize("payload, words", [
    (pickle.dumps(Evil("/nonexistent/marker")), "ExtraData|extra data|incomplete|Malformed|unknown"),
    (b"\xc1\x00\x00\x00\x10abc", "runs past"),
    ("marker-late", "marker outside the first place"),
    ("marker-alone", "marker outside the first place"),
    ("unknown-ext", "unknown extension type 9"),
    ("object-dtype", "holds Python objects"),
    ("short-array", "needs 8 bytes"),
    ("oob-outside", "does not fit"),
    ("empty-list-bomb", "more than one container"),
    (b"\x91" * 5000 + b"\xc0", "StackError"),
])
def test_decoder_refuses_malformed_payloads(payload, words):
    """The client's decoder turns every malformed or hostile payload into Malformed (a ValueError)
    naming the problem: misplaced markers, unknown types, object dtypes, arrays that do not fit
    their bytes, a payload of empty lists that would take 60 times its size, nesting past msgpack's
    stack. It never builds anything but plain values."""
    import msgpack

    from _sandpool_agent import plain as _plain

    built = {
        "marker-late": [1, _ext(1)],
        "marker-alone": {"a": _ext(2)},
        "unknown-ext": _ext(9, b"x"),
        "object-dtype": [_ext(4), "O", [1], "C", False, b"\0" * 8],
        "short-array": [_ext(4), "<f8", [1], "C", False, b"123"],
        "oob-outside": [_ext(5), "<f8", [1], "C", False, 0, 8],
    }
    if payload == "empty-list-bomb":
        payload = b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\x90" * 3_000_000
    elif isinstance(payload, str):
        payload = msgpack.packb(built[payload], use_bin_type=True)
    with pytest.raises(_plain.Malformed, match=words):
        _plain.decode(payload)
    assert _plain.decode(_plain.encode([(1, 2), {3}])) == [(1, 2), {3}]
