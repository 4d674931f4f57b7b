"""Helpers for the remote-function pool tests."""

from __future__ import annotations

import os

from service_helpers import wait_until


def assert_quick_calls_are_stolen(session, nap, *extra) -> None:
    """Run ``nap(600)`` and thirty ``nap(0, *extra)`` on a warm two-sandbox pool: the short calls
    pipelined behind the long one must be taken back and run on the idle sandbox while the long one
    still runs.

    A call already handed to the busy worker in the same batch as the long one cannot be taken back
    (a few at most); without stealing about half of them would wait out the long call's 600 s. No
    clock decides: only whether they ran while it still runs (the 60 s bound is for a hang).
    """
    long, *quick = nap.map([(600,)] + [(0, *extra)] * 30)
    assert wait_until(lambda: sum(r.done() for r in quick) >= 27, timeout=60), (
        [r.done() for r in quick], pool_state(session))
    assert not long.done()
    assert long.cancel() is True
    assert [r.result(timeout=30) for r in quick] == [0] * 30  # the few behind it in its worker, too


def pool_state(session) -> list[dict]:
    """What each pool of ``session`` holds, and its sandboxes' processes, for a failure's message:
    per slot its state, whether it is direct, when it last answered (trio time), its calls as (sent,
    being stolen), and the agent's process tree with signal masks."""
    return [{"queue": len(pool.queue), "steal_timer": pool.steal_timer,
             "slots": [(slot.state, slot.direct is not None, round(slot.progress_at, 3),
                        [(c.sent, c.stealing) for c in slot.inflight.values()],
                        _process_tree(slot.started and slot.started.sandbox._record.agent_pid))
                       for slot in pool.slots]}
            for pool in session._pools.values()]


def _process_tree(pid: int | None) -> list[tuple]:
    """(pid, wchan, State/SigBlk/SigPnd/ShdPnd/SigCgt lines) for ``pid`` and its descendants."""
    found, todo = [], [pid] if pid else []
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                status = [line for line in f.read().splitlines()
                          if line.split(":")[0] in ("State", "SigBlk", "SigPnd", "ShdPnd", "SigCgt")]
            with open(f"/proc/{current}/wchan") as f:
                wchan = f.read()
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except OSError:
            continue
        found.append((current, wchan, status))
    return found
