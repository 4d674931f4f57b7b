"""exec in a running sandbox beside ``subprocess.run(["true"])``, interleaved in one run.

    python benchmarks/bench_exec.py [--quick] [--isolation auto|process|namespaces] [--json PATH]

Three ways of running ``true``, measured in short rounds in turn (10 samples of each way per round,
so that a change in the machine's load during the run weighs on all of them alike):

- floor:  ``subprocess.run(["true"])`` in this process;
- sync:   ``sb.exec(["true"]).result()`` from this thread (a sync ``Session``, its loop in the portal
          thread);
- trio:   ``await sb.exec(["true"])`` in a trio loop of its own (an ``async with Session()`` in a
          second thread; this thread waits, blocked, while the loop times a round).

Target: sync and trio p50 <= 1.5x the floor's p50 at the default (namespaces) level. Latencies are
nearest-rank p50/p99 over all samples. Prints a Markdown table and writes every figure as JSON
(default ``benchmarks/results/bench_exec.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from typing import Any

import trio

from _measure import latency, timed
from sandpool import SandboxDefaults, Session

TARGET = 1.5


class TrioSide:
    """A trio loop in a thread of its own holding a running sandbox; ``samples(k)`` times k execs there."""

    def __init__(self, isolation: str) -> None:
        self._isolation = isolation
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._sandbox: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="bench-trio", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the constructor (or lost at exit)
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with Session(defaults=SandboxDefaults(tags=("bench",), isolation=self._isolation)) as session:
            self._sandbox = await session.sandbox()
            self._token, self._stop = trio.lowlevel.current_trio_token(), trio.Event()
            self._ready.set()
            await self._stop.wait()
            await self._sandbox.stop(graceful_shutdown_seconds=0)

    async def _round(self, count: int) -> list[float]:
        out = []
        for _ in range(count):
            began = time.perf_counter()
            await self._sandbox.exec(["true"])
            out.append(time.perf_counter() - began)
        return out

    def samples(self, count: int) -> list[float]:
        return trio.from_thread.run(self._round, count, trio_token=self._token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()


def run(n: int, rounds: int, isolation: str) -> dict[str, Any]:
    """``n`` samples of each, in ``rounds`` interleaved rounds; the latencies by way."""
    samples: dict[str, list[float]] = {"floor": [], "sync": [], "trio": []}
    per_round = max(1, n // rounds)
    with Session(defaults=SandboxDefaults(tags=("bench",), isolation=isolation)) as session:
        sandbox = session.sandbox().wait()
        side = TrioSide(isolation)
        try:
            timed(20, lambda: sandbox.exec(["true"]).result())  # warm up
            side.samples(20)
            for _ in range(rounds):
                samples["floor"] += timed(per_round, lambda: subprocess.run(["true"], check=True), warm=1)
                samples["sync"] += timed(per_round, lambda: sandbox.exec(["true"]).result(), warm=1)
                samples["trio"] += side.samples(per_round)
        finally:
            side.close()
            sandbox.stop(graceful_shutdown_seconds=0).result()
    return {name: latency(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not figures")
    parser.add_argument("--isolation", default="auto", choices=["auto", "process", "namespaces"])
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "results", "bench_exec.json"))
    args = parser.parse_args()
    n, rounds = (100, 10) if args.quick else (1000, 100)
    load_start = os.getloadavg()
    figures = run(n, rounds, args.isolation)
    floor = figures["floor"]["p50_ms"]
    print(f"\nexec `true` ({platform.node()}, {os.cpu_count()} cpus, isolation={args.isolation}, n={n}, "
          f"load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f})\n")
    print("| way | p50 ms | p99 ms | ratio p50 vs floor | target | met |\n|---|---:|---:|---:|---:|:---:|")
    ratios = {}
    for name in ("floor", "sync", "trio"):
        f = figures[name]
        ratio = f["p50_ms"] / floor
        ratios[name] = ratio
        met = "-" if name == "floor" else ("yes" if ratio <= TARGET else "**no**")
        print(f"| {name} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {ratio:.2f}x | <= {TARGET}x | {met} |")
    record = {"bench": "bench_exec", "isolation": args.isolation, "n": n, "rounds": rounds, "figures": figures,
              "ratios_p50": ratios, "target": TARGET, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
