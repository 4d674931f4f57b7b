"""Attacks on the same-host shortcut for references between calls (``sandpool._functions.held``).

A large result of a local sandbox is copied by the client out of that sandbox's /tmp into a sealed
memfd of its own; passed by reference to another call, its bytes go into the consumer's own
argument file. No handle names them: nothing a sandbox holds or sends refers to the client's copy.
The attacks: a producer that keeps a link to its result file and rewrites it after answering,
hoping the consumer (or the client's ``result()``) sees the rewritten bytes, or truncates it while
the client copies it; a sandbox started while a held result exists, looking for the client's copy
among its descriptors, mappings and /proc; and a producer that took its worker over and names a
forged result file (a pickle that runs a command when unpickled, a link, a FIFO, a sparse file
past the size limit) while its ref is passed on, hoping the client decodes or unpickles it. Each asserts the attack did its part, was contained, and the sandboxes keep working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from service_helpers import wait_until
from test_results import forge  # (pickled by value: that module registers itself)

from sandpool import SerializationError, Session
from sandpool._functions import bulk as _bulk, held as _held
from sandpool._functions.call import CallRef
from sandpool._isolation import probe

cloudpickle.register_pickle_by_value(sys.modules[__name__])

N = 4 * _bulk.BULK_BYTES  # a result file
hold = _held.hold


@pytest.fixture
def session() -> Iterator[Session]:
    """The level whose sandboxes' /tmp the client reaches (and so holds results from)."""
    why = probe.unavailable("namespaces")
    if why:
        pytest.skip(f"namespaces level unavailable: {why}")
    with Session(defaults={"isolation": "namespaces"}) as s:
        yield s


def make_then_tamper(n: int, how: str = "rewrite") -> bytes:
    """Return n bytes of "x"; meanwhile a thread hard-links the result file the worker writes,
    and once told (/tmp/go) rewrites it through that link with "y" (or, ``how="shrink"``,
    truncates it to nothing), then says so (/tmp/done)."""
    import threading
    import time

    def tamper() -> None:
        name = None
        while name is None:
            name = next((e for e in os.listdir("/tmp") if e.startswith(".sandpool-r-")), None)
            time.sleep(0.0002)
        os.link(f"/tmp/{name}", "/tmp/kept")
        open("/tmp/linked", "w").close()
        while not os.path.exists("/tmp/go"):
            time.sleep(0.001)
        with open("/tmp/kept", "r+b") as f:
            if how == "shrink":
                f.truncate(0)
            else:
                f.write(b"y" * n)
        open("/tmp/done", "w").close()

    threading.Thread(target=tamper, daemon=True).start()
    return b"x" * n


def first_kept_byte() -> bytes:
    with open("/tmp/kept", "rb") as f:
        return f.read(1)


def summary(value: bytes) -> tuple[int, bytes]:
    return len(value), bytes(sorted(set(value)))


def test_a_result_rewritten_after_the_answer_reaches_neither_consumer_nor_client(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = _bulk.take_result

    def paused(directory: str, path: str, name: str, decode: Any) -> Any:
        # Let the attacker link the file before the client takes it, and rewrite it right after.
        assert wait_until(lambda: os.path.exists(os.path.join(directory, "linked")))
        value = taken(directory, path, name, decode)
        open(os.path.join(directory, "go"), "w").close()
        assert wait_until(lambda: os.path.exists(os.path.join(directory, "done")))
        return value

    monkeypatch.setattr(_bulk, "take_result", paused)
    copies = []
    monkeypatch.setattr(_held, "hold", lambda fd, size: copies.append(hold(fd, size)) or copies[-1])
    produce = session.function(make_then_tamper, max_concurrency=1)
    size = CallRef(None)  # sends the producer's call only once set: its ref is passed on first
    ref = produce.remote(size)
    out = session.function(summary).remote(ref)
    size.set_result(N)
    assert out.result(timeout=60) == (N, b"x")
    assert copies  # held, not decoded as it came
    assert ref.result() == b"x" * N
    monkeypatch.setattr(_bulk, "take_result", taken)
    assert session.function(first_kept_byte, max_concurrency=1).remote().result(timeout=60) == b"y"  # it did
    assert session.function(summary, max_concurrency=1).remote(b"ok").result(timeout=60) == (2, b"ko")


def make_x(n: int) -> bytes:
    return b"x" * n


def look_for_held_copies() -> list[str]:
    """Everything this sandbox can see that would be the client's copy of a result: descriptors,
    mappings, and any process's in its /proc."""
    found = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "sandpool-result" in target:
                    found.append(f"/proc/{pid}/fd/{fd} -> {target}")
            with open(f"/proc/{pid}/maps") as maps:
                found += [line for line in maps if "sandpool-result" in line]
        except OSError:
            continue
    return found


def test_a_sandbox_started_while_a_result_is_held_cannot_find_it(session: Session,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    monkeypatch.setattr(_held, "hold", lambda fd, size: copies.append(hold(fd, size)) or copies[-1])
    size = CallRef(None)
    held = session.function(make_x, max_concurrency=1).remote(size)
    passed = session.function(summary).remote(held)
    size.set_result(N)
    assert passed.result(timeout=60) == (N, b"x")
    assert copies  # the client holds it now (not decoded yet)
    fresh = session.function(look_for_held_copies, reuse=False)  # a new sandbox, started now
    assert fresh.remote().result(timeout=60) == []
    same = session.function(look_for_held_copies, max_concurrency=1)  # the producer's own sandbox
    assert same.remote().result(timeout=60) == []
    assert held.result() == b"x" * N
    assert fresh.remote().result(timeout=60) == []  # and it keeps working




def test_a_result_file_shrunk_while_the_client_copies_it_fails_that_call_only(
        session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer truncates its result file (through a link it kept) after the client opened
    and measured it, before the copy: the copy comes up short, both calls fail with
    SerializationError, nothing is held, and the sandboxes work on."""
    taken, where = _bulk.take_result, []

    def noting(directory: str, path: str, name: str, decode: Any) -> Any:
        where.append(directory)
        assert wait_until(lambda: os.path.exists(os.path.join(directory, "linked")))
        return taken(directory, path, name, decode)

    def shrunk_first(fd: int, size: int) -> _held.Held:
        open(os.path.join(where[-1], "go"), "w").close()
        assert wait_until(lambda: os.path.exists(os.path.join(where[-1], "done")))
        return hold(fd, size)

    monkeypatch.setattr(_bulk, "take_result", noting)
    monkeypatch.setattr(_held, "hold", shrunk_first)
    size = CallRef(None)
    ref = session.function(make_then_tamper, max_concurrency=1).remote(size, "shrink")
    out = session.function(summary).remote(ref)
    size.set_result(N)
    for r in (ref, out):
        with pytest.raises(SerializationError, match="ended after 0 of"):
            r.result(timeout=60)
    monkeypatch.setattr(_bulk, "take_result", taken)
    assert session.function(summary, max_concurrency=1).remote(b"ok").result(timeout=60) == (2, b"ko")


class Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def forge_result_file(kind: str, marker: str) -> None:
    """As hostile code that took the worker over: write a result file of ``kind`` (a pickle that
    runs a command, a link to a host file, a FIFO, a sparse file past the size limit) and name it
    in a forged answer (the one the client takes: the worker's own comes after it)."""
    import pickle

    path = f"/tmp/.sandpool-r-forged-{kind}"
    if kind == "pickle":
        with open(path, "wb") as f:
            f.write(pickle.dumps([Evil(marker)] * 100_000))  # large: a result file
    elif kind == "link":
        os.symlink("/etc/hostname", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(int(kind))  # sparse: no memory taken here
    forge({"t": "result", "path": path})


FORGED = [("pickle", "could not be unpickled in the sandbox"), ("link", "could not be read"),
          ("fifo", "not a regular file"), (str(_bulk.MAX_RESULT_BYTES + 1), "above the limit")]


@pytest.mark.parametrize(("kind", "words"), FORGED, ids=[k if k.isalpha() else "oversized" for k, _ in FORGED])
def test_a_forged_result_passed_by_reference_is_neither_decoded_nor_unpickled_in_the_client(
        session: Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, kind: str, words: str) -> None:
    """A producer names a forged result file while its ref is passed on. A pickle whose unpickling
    runs a command is held as bytes and reaches the consumer's plain decoder only (which refuses
    it); no command runs in the client, and its ``result()`` refuses it as plain data too. A link,
    a FIFO or a file past the size limit is refused before any copy. The sandboxes work on."""
    copies, decoded = [], []
    monkeypatch.setattr(_held, "hold", lambda fd, size: copies.append(hold(fd, size)) or copies[-1])
    decode = _held.Held.decode
    monkeypatch.setattr(_held.Held, "decode", lambda self: decoded.append(self) or decode(self))
    marker = str(tmp_path / "ran")
    size = CallRef(None)
    ref = session.function(forge_result_file).remote(kind, size)
    out = session.function(summary).remote(ref)
    size.set_result(marker)
    with pytest.raises(SerializationError, match=words):
        out.result(timeout=60)
    assert not decoded and len(copies) == (kind == "pickle")
    with pytest.raises(SerializationError, match="not valid plain data" if kind == "pickle" else words):
        ref.result()
    assert not os.path.exists(marker)
    assert session.function(summary, max_concurrency=1).remote(b"ok").result(timeout=60) == (2, b"ko")
