"""Helpers for the remote-function pool tests."""

from __future__ import annotations

from service_helpers import wait_until


def assert_quick_calls_are_stolen(nap) -> None:
    """Run ``nap(600)`` and thirty ``nap(0)`` on a warm two-sandbox pool: the short calls pipelined
    behind the long one must be taken back and run on the idle sandbox while the long one still runs.

    A call already handed to the busy worker in the same batch as the long one cannot be taken back
    (a few at most); without stealing about half of them would wait out the long call's 600 s. No
    clock decides: only whether they ran while it still runs (the 60 s bound is for a hang).
    """
    long, *quick = nap.map([(600,)] + [(0,)] * 30)
    assert wait_until(lambda: sum(r.done() for r in quick) >= 27, timeout=60), [r.done() for r in quick]
    assert not long.done()
    assert long.cancel() is True
    assert [r.result(timeout=30) for r in quick] == [0] * 30  # the few behind it in its worker, too
