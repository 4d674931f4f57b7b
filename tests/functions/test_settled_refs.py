"""Remote functions, memory: a settled ref keeps its outcome and nothing else, and a map lets go of
each input once its call is made, so a long map's client holds what its list of refs costs.

A ref's ``Call`` (its pickled arguments, its request id) is found, or not, among the live objects
after a full collection; an input is seen through a weak reference to an object it carries.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import cloudpickle
import pytest
from service_helpers import wait_until

from sandpool import OperationCancelled, Session
from sandpool._functions.call import Call
from sandpool._functions.plan import in_flight_bound

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLEEP = 600.0  # how long a held call sleeps: no test waits for it, each cancels it


def inc(x):
    return x + 1


def fail(x):
    raise KeyError(x)


def nap(secs, _token=None):
    time.sleep(secs)
    return secs


class Token:
    """An input's stand-in: weakly referenced by the test, pickled as an empty object."""


def live_calls(refs):
    """The Calls still alive whose ref is one of ``refs``, after a full collection."""
    gc.collect()
    ids = {id(ref) for ref in refs}
    return [o for o in gc.get_objects() if type(o) is Call and id(o.ref) in ids]


def test_settled_remote_refs_keep_no_call_but_keep_their_outcome():
    """A settled remote() ref, value or error, holds no Call; its outcome stays: result() answers
    again, the error is the same object, cancel() is a no-op."""
    with Session() as s:
        f, g = s.function(inc, max_concurrency=1), s.function(fail, max_concurrency=1)
        ok, bad = f.remote(1), g.remote(2)
        assert ok.result() == 2
        with pytest.raises(KeyError) as first:
            bad.result()
        assert live_calls([ok, bad]) == []
        assert ok.result() == 2 and not ok.cancel() and ok.result() == 2
        with pytest.raises(KeyError) as again:
            bad.result()
        assert again.value is first.value
        assert f.remote(41).result() == 42  # the pool goes on


def test_map_refs_keep_no_call_and_results_stay_in_order():
    """A map's settled refs hold no Call; every result is there, in input order, errors each in its own ref."""
    with Session() as s:
        f = s.function(inc, max_concurrency=2)
        refs = f.map([(i,) for i in range(300)])
        assert [ref.result() for ref in refs] == list(range(1, 301))
        assert live_calls(refs) == []
        bad = f.map([(1,), ("x",), (3,)])  # "x" + 1 raises TypeError in the sandbox
        assert bad[0].result() == 2 and bad[2].result() == 4
        with pytest.raises(TypeError):
            bad[1].result()
        assert live_calls(bad) == []


def test_a_ref_a_thread_waited_on_lets_go_of_the_waiters_event():
    """A thread blocked on a map's ref (not its sandbox's lone call, so it waits on the ref's own
    event) wakes when the ref is cancelled, with OperationCancelled; the ref then refers to no
    event, Call or pool, and its neighbour's result comes."""
    with Session() as s:
        f = s.function(nap, max_concurrency=1)
        refs = f.map([(SLEEP,), (0,)])
        outcome = []

        def wait():
            try:
                refs[0].result()
            except OperationCancelled as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        held = lambda: [type(o).__name__ for o in gc.get_referents(refs[0])]  # noqa: E731
        assert wait_until(lambda: "_Waiter" in held()), held()
        assert refs[0].cancel()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and len(outcome) == 1
        assert not {"_Waiter", "Call", "Pool"} & set(held()), held()
        assert refs[1].result() == 0


def test_cancelled_ref_lets_go_of_its_call_once_the_sandbox_let_go():
    """A running call cancelled by its ref: once the sandbox answered, nothing holds its Call (the
    pool drops an answer to a settled ref, so only the ref could have); the sandbox takes the next."""
    with Session() as s:
        f = s.function(nap, max_concurrency=1)
        ref = f.remote(SLEEP)
        assert wait_until(lambda: s.statistics().calls_running == 1)
        assert ref.cancel()
        with pytest.raises(OperationCancelled):
            ref.result()
        assert wait_until(lambda: s.statistics().calls_running == 0), s.statistics()
        assert live_calls([ref]) == []
        assert f.remote(0).result() == 0


def test_map_lets_go_of_each_input_once_its_call_is_made():
    """While a map waits at its in-flight bound, the inputs of the calls made are gone and the rest
    are held; cancelling the refs ends the map, its sandbox keeps working."""
    with Session() as s:
        f = s.function(nap, max_concurrency=1)
        bound = in_flight_bound(1)
        items = [(SLEEP if i == 0 else 0, Token()) for i in range(bound + 20)]
        tokens = [weakref.ref(item[1]) for item in items]
        refs = f.map(items)
        del items
        # The feeder submits its calls in one batch once it reached the bound, then waits.
        stats = s.statistics
        assert wait_until(lambda: stats().calls_queued + stats().calls_running == bound), stats()
        gc.collect()
        assert [t() is None for t in tokens] == [True] * bound + [False] * 20
        for ref in refs:
            ref.cancel()
        assert wait_until(lambda: stats().calls_queued + stats().calls_running == 0), stats()
        gc.collect()
        assert all(t() is None for t in tokens)  # the feeder ended, skipping the cancelled
        assert f.remote(0).result() == 0
