"""Remote functions, the API: decorating, .remote/.map/.local/calling, streams, values round trip.

Every test runs real sandboxes. Functions of this module are pickled by value (registered below),
so the sandboxes never import this test module (and with it pytest and trio).
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import time

import cloudpickle
import pytest
import trio

import sandpool
from sandpool import AsyncFunctionError, OperationCancelled, RemoteFunction, SerializationError, Session

cloudpickle.register_pickle_by_value(sys.modules[__name__])

Point = collections.namedtuple("Point", "x y")


class Box:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Box) and other.value == self.value


OFFSET = 100


def add_offset(x):
    return x + OFFSET  # a global of this module, shipped with the function


def test_decorator_with_and_without_parentheses():
    """@session.function and @session.function(...) both give a RemoteFunction with its metadata."""
    with Session() as s:
        @s.function
        def double(x):
            """Twice x."""
            return 2 * x

        @s.function(max_concurrency=1, timeout_seconds=5)
        def triple(x):
            return 3 * x

        assert isinstance(double, RemoteFunction) and isinstance(triple, RemoteFunction)
        assert double.__name__ == "double" and double.__doc__ == "Twice x."
        assert double.remote(4).result() == 8
        assert triple.remote(4).result() == 12
        assert double(5) == 10  # calling it is .remote(...).result()
        assert double.local(6) == 12  # runs here
        assert s.sandbox_count >= 1


def test_map_returns_refs_in_order_and_as_completed_yields_each():
    """.map(list of tuples) gives refs in input order; as_completed yields each once; items must be tuples."""
    with Session() as s:
        @s.function
        def power(x, y):
            return x ** y

        refs = power.map([(i, 2) for i in range(50)])
        assert [r.result() for r in refs] == [i * i for i in range(50)]
        assert sorted(r.result() for r in sandpool.as_completed(power.map([(i, 3) for i in range(10)]))) == \
            [i ** 3 for i in range(10)]
        assert power.map([]) == []
        with pytest.raises(TypeError, match=r"tuple of positional arguments.*\.imap"):
            power.map([1, 2])


def test_imap_and_starmap_sync_ordered_and_unordered():
    """imap/starmap stream results (in input order, or as they finish) from any iterable."""
    with Session() as s:
        @s.function
        def slow_square(x):
            import time
            # 1 is slower than those after it (order must hold anyway); 0 so slow that others overtake it
            time.sleep(600 if x == 0 else 0.05 if x == 1 else 0)
            return x * x

        assert list(slow_square.imap(range(1, 20))) == [x * x for x in range(1, 20)]
        stream = slow_square.imap(iter([0, 3]), ordered=False)  # two warm sandboxes
        assert next(stream) == 9
        stream.close()  # cancels the 600 s call still running
        assert sorted(slow_square.imap(range(1, 20), ordered=False, max_in_flight=4)) == [x * x for x in range(1, 20)]

        @s.function
        def mul(a, b):
            return a * b

        assert list(mul.starmap(zip(range(5), range(5)))) == [0, 1, 4, 9, 16]
        assert list(mul.starmap([])) == []


def test_async_api_inside_trio():
    """In trio: await f.remote(), async for over imap of an async iterable, gather, and calling
    the object directly is refused with a pointer to 'await f.remote'."""
    async def main():
        async with Session() as s:
            @s.function
            def inc(x):
                return x + 1

            assert await inc.remote(1) == 2
            assert await sandpool.gather(inc.map([(i,) for i in range(5)])) == [1, 2, 3, 4, 5]

            async def numbers():
                for i in range(10):
                    await trio.sleep(0)
                    yield i

            assert [y async for y in inc.imap(numbers())] == list(range(1, 11))
            assert sorted([y async for y in inc.imap(range(10), ordered=False)]) == list(range(1, 11))
            with pytest.raises(RuntimeError, match="await inc.remote"):
                inc(1)
    trio.run(main)


def test_values_round_trip_exactly():
    """Plain results come back exactly: tuples stay tuples, sets, frozensets, big ints, complex,
    bytes, nested data and non-str dict keys survive."""
    with Session() as s:
        @s.function
        def echo(*args, **kwargs):
            return args, kwargs

        values = ((1, 2), {1, 2}, frozenset({(1, "a")}), [1, {"a": (3,)}], b"\x00\xff", None, 1.5, 2 ** 100,
                  -2 ** 100, 1 - 2j, True, "\u00e9", {(1, 2): [None], 3: {"x"}})
        args, kwargs = echo.remote(*values, key=(3, 4)).result()
        assert args == values and type(args[0]) is tuple and type(args[2]) is frozenset
        assert kwargs == {"key": (3, 4)}


def test_objects_round_trip_with_unsafe_pickle_results():
    """With unsafe_pickle_results=True, namedtuples and custom classes come back as themselves;
    without it, such a result fails its call with SerializationError naming the type and the option."""
    with Session() as s:
        @s.function(unsafe_pickle_results=True)
        def echo(*args, **kwargs):
            return args, kwargs

        values = (Point(1, 2), Box([1, {"a": (3,)}]))
        args, kwargs = echo.remote(*values, key=Point(3, 4)).result()
        assert args == values and type(args[0]) is Point
        assert kwargs == {"key": Point(3, 4)}

        @s.function
        def point():
            return Point(1, 2)

        with pytest.raises(SerializationError, match="Point.*unsafe_pickle_results=True"):
            point.remote().result()


def test_numpy_arrays_round_trip():
    """A numpy array comes back equal, with its dtype and shape."""
    np = pytest.importorskip("numpy")
    with Session() as s:
        @s.function
        def scale(a, k):
            return a * k

        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        out = scale.remote(a, 2).result()
        assert out.dtype == np.float32 and out.shape == (3, 4) and (out == a * 2).all()
        big = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)  # 8 MB: through files
        out = scale.remote(big, 3).result()
        assert out.shape == (1000, 1000) and (out == big * 3).all()


def test_lambdas_closures_globals_and_module_imports():
    """A lambda, a closure over local state, a global of the module and a module imported at the
    top of the module all work in the sandbox."""
    factor = 7
    with Session() as s:
        square = s.function(lambda x: x * x)
        closure = s.function(lambda x: x * factor)
        offset = s.function(add_offset)

        @s.function
        def uses_math(x):
            return math.sqrt(x)  # math is imported at module level only

        assert square.remote(3).result() == 9
        assert closure.remote(3).result() == 21
        assert offset.remote(1).result() == 101
        assert uses_math.remote(16).result() == 4.0


def test_remote_functions_call_each_other_locally_in_the_sandbox():
    """A remote function used by another becomes its plain function there (no nested sandboxes)."""
    with Session() as s:
        @s.function
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)

        @s.function
        def fib_plus_one(n):
            return fib(n) + 1

        assert fib.remote(15).result() == 610
        assert fib_plus_one.remote(10).result() == 56


def test_unpicklable_argument_or_function_fails_before_any_sandbox():
    """SerializationError names the culprit (argument index, keyword or global) and no sandbox starts."""
    import threading

    lock = threading.Lock()
    with Session() as s:
        @s.function
        def ident(x, y=None):
            return x

        with pytest.raises(SerializationError, match=r"argument 1 of 'test_unpicklable.*ident'.*lock") as info:
            ident.remote(1, lock)
        assert "lock" in info.value.obj_repr
        with pytest.raises(SerializationError, match=r"keyword argument 'y'"):
            ident.remote(1, y=lock)

        @s.function
        def uses_lock(x):
            with lock:
                return x

        with pytest.raises(SerializationError, match=r"closure variable 'lock'"):
            uses_lock.remote(1)
        refs = ident.map([(1,), (lock,)])  # map pickles lazily: the bad item fails its own ref
        assert refs[0].result() == 1
        with pytest.raises(SerializationError, match="argument 0"):
            refs[1].result()
        assert s.sandbox_count <= 1


def test_unpicklable_function_fails_before_any_sandbox_is_started():
    """Nothing starts when the very first call cannot be pickled."""
    import threading

    lock = threading.Lock()
    with Session() as s:
        @s.function
        def uses_lock():
            return lock.locked()

        with pytest.raises(SerializationError, match="closure variable 'lock'"):
            uses_lock.remote()
        assert s.sandbox_count == 0


def test_async_functions_are_refused_at_decoration():
    """An async def (or async generator) raises AsyncFunctionError when decorated."""
    with Session() as s:
        with pytest.raises(AsyncFunctionError, match="async function"):
            @s.function
            async def nope():
                pass
        with pytest.raises(AsyncFunctionError):
            @s.function()
            async def agen():
                yield 1


def test_bad_options_fail_at_the_decorator_line():
    """Unknown sandbox options and bad values raise TypeError/ValueError naming the fix."""
    with Session() as s:
        with pytest.raises(TypeError, match="did you mean 'tags'"):
            s.function(tagz=["x"])
        with pytest.raises(ValueError, match="max_concurrency"):
            s.function(max_concurrency=0)
        with pytest.raises(ValueError, match="timeout_seconds"):
            s.function(timeout_seconds=-1)
        with pytest.raises(TypeError, match="retries"):
            s.function(retries="3")


def test_imap_over_an_endless_iterable_pulls_a_bounded_number():
    """A consumer that stops after 10 results of imap over itertools.count() leaves at most
    max_in_flight inputs pulled beyond them, and the calls still in flight are cancelled."""
    pulled = []

    def counting():
        for i in itertools.count():
            pulled.append(i)
            yield i

    with Session() as s:
        @s.function
        def ident(x):
            return x

        got = []
        stream = ident.imap(counting(), max_in_flight=8)
        for value in stream:
            got.append(value)
            if len(got) == 10:
                break
        assert got == list(range(10))
        assert len(pulled) <= 10 + 8
        window = list(stream._window)
        stream.close()
        assert all(ref.done() for ref in window)


def test_imap_keeps_as_many_in_flight_as_map_by_default_and_bounds_argument_bytes(monkeypatch):
    """By default a stream keeps map's bound of unfinished calls (512 per sandbox); whatever the
    count, it stops pulling once the pickled arguments of its unconsumed calls reach the byte
    bound (here lowered to 1 MB: three 400 KB arguments), and pulls on as they are consumed."""
    from sandpool._functions import imap as _imap
    from sandpool._functions.pool import in_flight_bound

    pulled = []

    def counting(size):
        for i in itertools.count():
            pulled.append(i)
            yield bytes(size)

    with Session() as s:
        @s.function(max_concurrency=2)
        def length(b):
            return len(b)

        with length.imap(counting(8)) as stream:
            assert next(stream) == 8
            assert len(pulled) == in_flight_bound(2) == 1024
        pulled.clear()
        monkeypatch.setattr(_imap, "MAX_IN_FLIGHT_BYTES", 1_000_000)
        with length.imap(counting(400_000)) as stream:
            assert next(stream) == 400_000
            assert len(pulled) == 3  # the third reached the bound
            assert list(itertools.islice(stream, 20)) == [400_000] * 20
            assert len(pulled) <= 21 + 3


def test_statistics_and_repr_show_the_pool():
    """session.statistics() counts sandboxes and calls; repr(session) shows them at a glance."""
    with Session() as s:
        assert s.statistics().calls_done == 0
        @s.function(max_concurrency=2)
        def ident(x):
            return x

        assert [r.result() for r in ident.map([(i,) for i in range(20)])] == list(range(20))
        stats = s.statistics()
        assert stats.calls_done == 20 and stats.calls_failed == 0 and stats.calls_queued == 0
        assert stats.sandboxes_idle + stats.sandboxes_busy <= 2 and stats.sandboxes_idle >= 1
        assert "calls=0 queued/0 running/20 done/0 failed" in repr(s)
        assert "idle" in repr(s)

        @s.function(max_concurrency=2)
        def nap(seconds):
            time.sleep(seconds)

        ref = nap.remote(600)
        assert ref.cancel() is True  # a 600 s call cannot have finished: the cancel must take
        with pytest.raises(OperationCancelled):
            ref.result()
        assert ref.cancel() is False  # and once settled, there is nothing left to cancel


def test_progress_bar_with_tqdm(capsys):
    """progress=True draws a tqdm bar (to stderr) for map and imap."""
    pytest.importorskip("tqdm")
    with Session() as s:
        @s.function
        def ident(x):
            return x

        assert [r.result() for r in ident.map([(i,) for i in range(5)], progress=True)] == list(range(5))
        assert list(ident.imap(range(5), progress=True)) == list(range(5))
    err = capsys.readouterr().err
    assert "5/5" in err and "ident" in err


def test_calling_after_the_session_closed_fails_clearly():
    """A RemoteFunction outlives its session only as an object: calls then raise SandboxError
    saying to open a new Session; .local() still works."""
    with Session() as s:
        @s.function
        def ident(x):
            return x

        assert ident.remote(1).result() == 1
    with pytest.raises(sandpool.SandboxError, match="open a new Session"):
        ident.remote(1)
    with pytest.raises(sandpool.SandboxError, match="open a new Session"):
        ident.map([(1,)])
    assert ident.local(2) == 2


def _collector_on() -> bool:
    import gc

    return gc.isenabled()


def test_a_function_runs_with_the_garbage_collector_on():
    """The template forks with its collector off (a collection there would copy pages into every
    agent forked before it); the agent turns it back on, so user code in its call worker collects
    cycles as anywhere else."""
    with Session() as s:
        assert s.function(_collector_on).remote().result() is True
