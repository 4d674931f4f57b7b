"""References between calls on the same host: a large plain result of a local sandbox is held by
the client as its encoded bytes (a sealed memfd, see ``sandpool._functions.held``); passed by
reference to another call it goes on as those bytes, never decoded or pickled in the client, and
``ref.result()`` still decodes it here. Spies tell which path ran."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from sandpool import OperationCancelled, SerializationError, Session
from sandpool._functions import bulk as _bulk, held as _held
from sandpool._functions.call import CallRef

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIG = 3 * _bulk.BULK_BYTES  # through a result file


def make(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def make_tree(n: int) -> dict[str, object]:
    return {"blob": make(n), "nums": list(range(10)), "nested": ("a", [1.5, None])}


def digest(value: object) -> tuple[int, str]:
    import hashlib

    blob = value["blob"] if isinstance(value, dict) else value
    return len(blob), hashlib.sha256(blob).hexdigest()


class Keeper:
    def __init__(self) -> None:
        self.kept: list[tuple[int, str]] = []

    def keep(self, value: object) -> tuple[int, str]:
        self.kept.append(digest(value))
        return self.kept[-1]

    def log(self) -> list[tuple[int, str]]:
        return self.kept


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many results were held, and how many held ones this client decoded."""
    counts = {"held": 0, "decoded": 0}
    hold, decode = _held.hold, _held.Held.decode

    def spy_hold(fd: int, size: int) -> _held.Held:
        counts["held"] += 1
        return hold(fd, size)

    def spy_decode(self: _held.Held) -> object:
        counts["decoded"] += 1
        return decode(self)

    monkeypatch.setattr(_held, "hold", spy_hold)
    monkeypatch.setattr(_held.Held, "decode", spy_decode)
    return counts


def expected(n: int) -> tuple[int, str]:
    return digest(make(n))


def gate() -> CallRef:
    """A ref settled by the test: a call taking it is sent only once it is, so the refs made
    from it are passed on before they finish (as ``g.remote(f.remote(x))`` does)."""
    return CallRef(None)


def test_a_large_result_goes_on_by_reference_without_being_decoded_here(decoded: dict[str, int]) -> None:
    with Session() as s:
        produce, consume = s.function(make), s.function(digest)
        size = gate()
        ref = produce.remote(size)
        out = consume.remote(ref)
        size.set_result(BIG)
        assert out.result(timeout=60) == expected(BIG)
        assert decoded == {"held": 1, "decoded": 0}
        value = ref.result()  # the client can still have it
        assert value == make(BIG) and ref.result() is value  # decoded once, then kept
        assert decoded == {"held": 1, "decoded": 1}
        size = gate()
        tree = s.function(make_tree).remote(size)
        out = consume.remote(tree)
        size.set_result(BIG)
        assert out.result(timeout=60) == expected(BIG)  # nested plain data decodes there
        assert tree.result() == make_tree(BIG)
        assert decoded == {"held": 2, "decoded": 2}
        assert consume.remote(produce.remote(BIG).result()).result(timeout=60) == expected(BIG)
        assert decoded["held"] == 2  # fetched here first: decoded as it came, not held


def test_chained_three_deep_and_into_an_actor(decoded: dict[str, int]) -> None:
    with Session() as s:
        produce = s.function(make)
        echo = s.function(lambda v: v)
        keeper = s.cls(Keeper).remote()
        size = gate()
        out = keeper.keep.remote(echo.remote(echo.remote(produce.remote(size))))
        size.set_result(BIG)
        assert out.result(timeout=60) == expected(BIG)
        assert decoded["held"] == 3 and decoded["decoded"] == 0


def test_a_held_argument_keeps_its_call_s_place_in_the_actor_s_order(decoded: dict[str, int]) -> None:
    """An actor call waiting for a held result runs after the calls made before it and before
    those made after it, as a call waiting for a decoded one does."""
    with Session() as s:
        keeper = s.cls(Keeper).remote()
        size = gate()
        big = s.function(make).remote(size)
        outs = [keeper.keep.remote(make(1024)), keeper.keep.remote(big), keeper.keep.remote(make(512))]
        size.set_result(BIG)
        want = [expected(1024), expected(BIG), expected(512)]
        assert [o.result(timeout=60) for o in outs] == want and keeper.log() == want
        assert decoded == {"held": 1, "decoded": 0}


def test_small_pickled_and_relayed_results_are_not_held(decoded: dict[str, int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with Session() as s:
        consume = s.function(digest)
        small, big = gate(), gate()
        outs = [consume.remote(s.function(make).remote(small)),
                consume.remote(s.function(make, unsafe_pickle_results=True).remote(big))]
        small.set_result(1024)
        big.set_result(BIG)
        assert [o.result(timeout=60) for o in outs] == [expected(1024), expected(BIG)]
        assert decoded["held"] == 0
    monkeypatch.setattr(_bulk, "host_dir", lambda record: None)  # as for a remote runtime: frames only
    with Session() as s:
        size = gate()
        out = s.function(digest).remote(s.function(make).remote(size))
        size.set_result(BIG)
        assert out.result(timeout=60) == expected(BIG)
        assert decoded["held"] == 0


def test_a_held_result_that_does_not_decode_raises_serialization_error_at_result() -> None:
    """Bytes that are no payload (what a hostile worker could write) fail ``result()`` only."""
    import os

    fd = os.memfd_create("t")
    try:
        os.write(fd, b"\xc1" + b"\xff" * 64)
        held = _held.hold(fd, 65)
    finally:
        os.close(fd)
    ref = CallRef(None)
    ref.label = "forged"
    ref.set_result(held)
    with pytest.raises(SerializationError, match="forged"):
        ref.result()


def refuse(n: int) -> bytes:
    raise KeyError(f"no {n}")


def chain(s: Session, producer: object, n: int, held: bool) -> tuple[CallRef, CallRef]:
    """``digest.remote(producer.remote(n))`` passed on before the producer's answer (``held``), or
    after it (the ref already decoded here: the path the held one bypasses)."""
    consume = s.function(digest)
    if not held:
        ref = s.function(producer).remote(n)
        ref.exception(timeout=60)
        return ref, consume.remote(ref)  # type: ignore[return-value]
    size = gate()
    ref = s.function(producer).remote(size)
    out = consume.remote(ref)
    size.set_result(n)
    return ref, out  # type: ignore[return-value]


@pytest.mark.parametrize("held", [True, False], ids=["held", "decoded"])
def test_held_and_decoded_references_give_the_same_results_and_errors(held: bool, decoded: dict[str, int]) -> None:
    """The same value, and the same producer's error, whichever path the reference took."""
    with Session() as s:
        ref, out = chain(s, make, BIG, held)
        assert out.result(timeout=60) == expected(BIG) and ref.result() == make(BIG)
        assert decoded["held"] == int(held)
        ref, out = chain(s, refuse, BIG, held)
        for r in (ref, out):
            with pytest.raises(KeyError, match="no"):
                r.result(timeout=60)


def test_a_held_reference_cancelled_either_side_and_released() -> None:
    """Cancelling the consumer leaves the producer's held result to the client; cancelling the
    producer cancels the consumer. Once its refs are dropped, the held mapping is unmapped."""
    import gc
    import weakref

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum("sandpool-result" in line for line in f)

    with Session() as s:
        produce, consume = s.function(make), s.function(digest)
        size = gate()
        ref = produce.remote(size)
        out = consume.remote(ref)
        assert out.cancel()
        size.set_result(BIG)
        assert ref.exception(timeout=60) is None
        with pytest.raises(OperationCancelled):
            out.result()
        size = gate()
        ref2 = produce.remote(size)
        out2 = consume.remote(ref2)
        assert ref2.cancel()
        with pytest.raises(OperationCancelled):
            out2.result(timeout=60)
        ref3, out3 = chain(s, make, BIG, held=True)
        assert out3.result(timeout=60) == expected(BIG)
        kept = weakref.ref(ref3._value)
        assert type(kept()) is _held.Held and maps() >= 1
        del ref3, out3
        gc.collect()
        assert kept() is None
        assert maps() == 1  # the cancelled consumer's producer still holds its own
        assert ref.result() == make(BIG)
        del ref
        gc.collect()
        assert maps() == 0
