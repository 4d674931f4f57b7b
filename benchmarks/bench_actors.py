"""Actors beside remote functions and Ray's actor figures.

Each run is a fresh child process (this script with ``--run``), printing one JSON line; the
parent runs it ``--runs`` times (default 3) and prints each run and the medians. In every run:

- actor round trip: 2,000 sequential ``handle.inc(x)`` (sync) after 200 warm-up calls, p50/p99,
  and the same as ``await handle.inc.remote(x)`` inside trio;
- function round trip: the same with ``inc(x)`` of ``@session.function`` in the same run, in
  blocks of 100 interleaved with the actor's (a busy moment of the machine falls on both);
- ordered calls/s: 20,000 ``handle.inc.remote(i)`` on one actor, every result checked in order;
- 100 MB by reference: ``size.remote(make.remote())`` against fetching ``make.remote()`` here
  and passing the value (both travel through this client: see docs/actors.md).

Ray is not installed here: its figures (actor round trip p50 809 us for ActorPool, 802 us for a
direct ``ray.get(actor.inc.remote(x))``) are quoted from shared/reference/peer_benchmarks.md,
measured on this machine kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

RAY_ACTOR_RTT_US = 809.0
ROUND_TRIPS = 2000
WARM = 200
ORDERED_CALLS = 20000
BIG_BYTES = 100 * 1024 * 1024


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def _rtt_pair(calls: dict) -> dict:
    """Round trips of each of ``calls`` (name -> call(i)), measured in interleaved blocks of 100 so
    that a busy moment of the machine falls on both alike; p50/p99 in us per name."""
    for call in calls.values():
        for i in range(WARM):
            call(i)
    samples: dict = {name: [] for name in calls}
    for _ in range(ROUND_TRIPS // 100):
        for name, call in calls.items():
            for i in range(100):
                began = time.perf_counter()
                call(i)
                samples[name].append(time.perf_counter() - began)
    return {name: {"p50_us": _pct(v, 50) * 1e6, "p99_us": _pct(v, 99) * 1e6} for name, v in samples.items()}


class Inc:
    def inc(self, x):
        return x + 1


def one_run() -> dict:
    import cloudpickle
    import trio

    import sandpool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out: dict = {}
    with sandpool.Session() as session:
        @session.function(max_concurrency=1)
        def inc(x):
            return x + 1

        @session.function(max_concurrency=1)
        def make():
            return b"x" * BIG_BYTES

        @session.function(max_concurrency=1)
        def size(value):
            return len(value)

        actor = session.cls(Inc).remote()
        out.update(_rtt_pair({"actor_sync": actor.inc, "function_sync": inc}))
        began = time.perf_counter()
        refs = [actor.inc.remote(i) for i in range(ORDERED_CALLS)]
        values = [r.result() for r in refs]
        out["ordered_calls_per_s"] = ORDERED_CALLS / (time.perf_counter() - began)
        assert values == list(range(1, ORDERED_CALLS + 1))
        size(b"")  # warm
        began = time.perf_counter()
        assert size.remote(make.remote()).result() == BIG_BYTES
        out["big_by_ref_ms"] = (time.perf_counter() - began) * 1e3
        began = time.perf_counter()
        assert size.remote(make.remote().result()).result() == BIG_BYTES
        out["big_through_client_ms"] = (time.perf_counter() - began) * 1e3

    async def in_trio() -> None:
        async with sandpool.Session() as s:
            handle = s.cls(Inc).remote()
            fn = s.function(max_concurrency=1)(lambda x: x + 1)
            calls = {"actor_trio": handle.inc.remote, "function_trio": fn.remote}
            for call in calls.values():
                for i in range(WARM):
                    await call(i)
            samples: dict = {name: [] for name in calls}
            for _ in range(ROUND_TRIPS // 100):
                for name, call in calls.items():
                    for i in range(100):
                        began = time.perf_counter()
                        await call(i)
                        samples[name].append(time.perf_counter() - began)
            for name, values in samples.items():
                out[name] = {"p50_us": _pct(values, 50) * 1e6, "p99_us": _pct(values, 99) * 1e6}

    trio.run(in_trio)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run", action="store_true", help="one run, in this process (JSON on stdout)")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(one_run()))
        return
    runs = []
    for n in range(args.runs):
        done = subprocess.run([sys.executable, __file__, "--run"], check=True, capture_output=True, text=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"run {n + 1}: " + _line(run))
    med = {key: statistics.median(r[key]["p50_us"] for r in runs) for key in
           ("actor_sync", "function_sync", "actor_trio", "function_trio")}
    print("\nmedians of the runs' p50 (us), and ratios in each run:")
    for key, value in med.items():
        print(f"  {key:14s} {value:8.1f}")
    for n, run in enumerate(runs, 1):
        print(f"  run {n}: actor/Ray sync {run['actor_sync']['p50_us'] / RAY_ACTOR_RTT_US:.3f}x, "
              f"trio {run['actor_trio']['p50_us'] / RAY_ACTOR_RTT_US:.3f}x (target <= 0.25x); "
              f"actor/function sync {run['actor_sync']['p50_us'] / run['function_sync']['p50_us']:.2f}x, "
              f"trio {run['actor_trio']['p50_us'] / run['function_trio']['p50_us']:.2f}x; "
              f"ordered {run['ordered_calls_per_s']:,.0f} calls/s (target 10,000)")


def _line(run: dict) -> str:
    return (f"actor sync p50 {run['actor_sync']['p50_us']:.0f} us (p99 {run['actor_sync']['p99_us']:.0f}), "
            f"function sync p50 {run['function_sync']['p50_us']:.0f} us, "
            f"actor trio p50 {run['actor_trio']['p50_us']:.0f} us, function trio p50 "
            f"{run['function_trio']['p50_us']:.0f} us, ordered {run['ordered_calls_per_s']:,.0f}/s, "
            f"100 MB by ref {run['big_by_ref_ms']:.0f} ms vs through client {run['big_through_client_ms']:.0f} ms")


if __name__ == "__main__":
    main()
