"""Attacks on the same-host shortcut for references between calls (``sandpool._functions.held``).

A large result of a local sandbox is copied by the client out of that sandbox's /tmp into a sealed
memfd of its own; passed by reference to another call, its bytes go into the consumer's own
argument file. No handle names them: nothing a sandbox holds or sends refers to the client's copy.
The attacks: a producer that keeps a link to its result file and rewrites it after answering,
hoping the consumer (or the client's ``result()``) sees the rewritten bytes; and a sandbox started
while a held result exists, looking for the client's copy among its descriptors, mappings and
/proc. Each asserts the attack did its part, was contained, and the sandboxes keep working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from service_helpers import wait_until

from sandpool import Session
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


def make_then_rewrite(n: int) -> bytes:
    """Return n bytes of "x"; meanwhile a thread hard-links the result file the worker writes,
    and once told (/tmp/go) rewrites it through that link with "y"."""
    import threading
    import time

    def rewrite() -> None:
        name = None
        while name is None:
            name = next((e for e in os.listdir("/tmp") if e.startswith(".sandpool-r-")), None)
            time.sleep(0.0002)
        os.link(f"/tmp/{name}", "/tmp/kept")
        open("/tmp/linked", "w").close()
        while not os.path.exists("/tmp/go"):
            time.sleep(0.001)
        with open("/tmp/kept", "r+b") as f:
            f.write(b"y" * n)
        open("/tmp/rewritten", "w").close()

    threading.Thread(target=rewrite, daemon=True).start()
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
        assert wait_until(lambda: os.path.exists(os.path.join(directory, "rewritten")))
        return value

    monkeypatch.setattr(_bulk, "take_result", paused)
    copies = []
    monkeypatch.setattr(_held, "hold", lambda fd, size: copies.append(hold(fd, size)) or copies[-1])
    produce = session.function(make_then_rewrite, max_concurrency=1)
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


