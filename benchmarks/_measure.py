"""Measuring helpers shared by the benchmark scripts: timing loops and latency summaries."""

from __future__ import annotations

import statistics
import time


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def latency(samples_s: list[float]) -> dict:
    """p50/p90/p99/mean in milliseconds of samples in seconds."""
    ms = [s * 1000 for s in samples_s]
    return {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "n": len(ms)}


def timed(n: int, fn, warm: int = 5) -> list[float]:
    """Seconds taken by each of ``n`` calls of ``fn``, after ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def map_calls_per_s(function, calls: int, reps: int = 3) -> float:
    """Best throughput (calls/s) of ``function.map`` over ``calls`` identity calls, checking every result."""
    import sandpool

    best = 0.0
    for _ in range(reps):
        began = time.perf_counter()
        values = sandpool.results(function.map([(i,) for i in range(calls)]))
        best = max(best, calls / (time.perf_counter() - began))
        assert values == list(range(calls))
    return best
