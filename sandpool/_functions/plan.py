"""The pool's decisions, as plain functions over plain data (no trio, no sandboxes): which sandbox
takes the next call, how many calls one sandbox may hold, how many sandboxes to start, which
calls to take back from a stalled sandbox for an idle one, and how many calls one ``map`` keeps
in flight; and the pool's counters. ``_pool`` acts on their answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Calls of known length are pipelined until a sandbox holds about this much work (seconds).
PIPELINE_SECONDS = 0.002
#: Most calls one sandbox holds at once, and most argument bytes (one call always fits).
MAX_DEPTH = 256
MAX_DEPTH_BYTES = 64 * 1024 * 1024
#: Argument bytes one map or stream keeps in flight at most (at least one call always goes).
MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024


def in_flight_bound(limit: int) -> int:
    """How many unfinished calls one ``map`` or ``imap`` keeps, on a pool of ``limit`` sandboxes:
    every sandbox's deepest pipeline (``MAX_DEPTH``) twice over, so that none waits for the client
    to refill it; at least 64. Memory bounds it: a trivial call in flight costs the client about
    1 KB (its ref, its Call, its pickled arguments), so 512 per sandbox is ~0.5 MB per sandbox,
    and ``MAX_IN_FLIGHT_BYTES`` caps the arguments of large ones whatever the count."""
    return max(64, 2 * limit * MAX_DEPTH)


@dataclass(frozen=True)
class PoolStatistics:
    """Counters of one pool, or of all pools of a session added up."""

    sandboxes_starting: int = 0
    sandboxes_idle: int = 0
    sandboxes_busy: int = 0
    calls_queued: int = 0
    calls_running: int = 0
    calls_done: int = 0
    calls_failed: int = 0
    calls_cancelled: int = 0
    calls_retried: int = 0

    def __add__(self, other: PoolStatistics) -> PoolStatistics:
        return PoolStatistics(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


# -- decisions (plain data in, plain data out) --------------------------------------------------


def pipeline_depth(estimate: float | None, reuse: bool) -> int:
    """How many calls one sandbox may hold, given the function's typical duration (s, or None)."""
    if not reuse:
        return 1
    if estimate is None:
        return 2
    return max(2, min(MAX_DEPTH, math.ceil(PIPELINE_SECONDS / max(estimate, 1e-7))))


def choose_slot(loads: Sequence[tuple[int, int] | None], waiting: int, starting: int, depth: int) -> int | None:
    """Index of the ready sandbox for the next waiting call, or None to keep it waiting.

    ``loads[i]`` is (calls, argument bytes) held by sandbox i, None while it is not ready. An idle
    sandbox wins; else the least loaded one below ``depth``, but only when more calls wait than
    the sandboxes still starting will take (so N long calls spread over N sandboxes).
    """
    best: int | None = None
    best_calls = 0  # the calls ``best`` holds
    for i, load in enumerate(loads):
        if load is None or load[0] >= depth or (load[0] and load[1] >= MAX_DEPTH_BYTES):
            continue
        if best is None or load[0] < best_calls:
            best, best_calls = i, load[0]
            if load[0] == 0:
                break
    if best is not None and best_calls and waiting <= starting:
        return None
    return best


def sandboxes_to_start(waiting: int, idle: int, starting: int, live: int, limit: int) -> int:
    """How many sandboxes to start so that every waiting call has an idle or starting one."""
    return max(0, min(waiting - idle - starting, limit - live))

#: A sandbox that has not answered for this long while calls wait behind its running one is
#: stalled: an idle sandbox takes those calls over (work stealing).
STEAL_AFTER_SECONDS = 0.01


def choose_steals(slots: Sequence[tuple[bool, int, float]], now: float) -> dict[int, int]:
    """How many calls to take back from each stalled sandbox: {index: count}.

    ``slots[i]`` is (idle, waiting, progress_at): whether sandbox i is ready and holds nothing,
    how many calls wait there behind the running one (not already being taken back), and when it
    last answered. Only when some sandbox is idle: half (rounded up) of what waits on each
    sandbox that has not answered for ``STEAL_AFTER_SECONDS``.
    """
    if not any(idle for idle, _, _ in slots):
        return {}
    return {i: (waiting + 1) // 2 for i, (idle, waiting, progress_at) in enumerate(slots)
            if waiting and now - progress_at >= STEAL_AFTER_SECONDS}
