"""A million trivial calls through one ``f.map``: the rate per window and the client's memory over time.

    python benchmarks/bench_map_curve.py [--calls 1000000] [--window 50000] [--apis map,imap,mp_imap]
                                         [--json PATH] [--png PATH]

Each curve runs in a fresh process (so its memory is its own), on 2 warm workers, consuming the
results in order as they come:

- ``map``:     ``f.map(((i,) for i in range(calls)))``, then each ref's ``result()`` in turn;
- ``imap``:    ``f.imap(range(calls))``, sandpool's streaming map (bounded work in flight: by
               default the bound ``map`` keeps, 512 calls per sandbox, so 1,024 here);
- ``imap_32``: the same with ``max_in_flight=32``, the default before (8 per sandbox, at least 32);
- ``mp_imap``: the peer, ``multiprocessing.Pool(2).imap(f, range(calls), chunksize=1)`` (fork).

For every window of ``--window`` calls: calls/s over that window and the client's RSS at its end
(less the RSS before the map began); the RSS is also sampled every 100 ms by a thread, and the
table shows its peak beside its end (a map lets go of each input once its call is made, and of
each call but its ref and result once it settles: its peak is its refs and inputs, listed at the
start). A steady rate shows as each window within a few tens of percent of the median window
(the machine is shared: compare with the peer's spread in the same run); flat memory as the RSS
growth per call after the first window (bytes per call, a least-squares slope) near zero. Prints
a table; JSON (default ``benchmarks/results/bench_map_curve.json``) holds every window and sample;
``--png`` draws them.
``--trace K`` runs one ``map`` under tracemalloc instead (slower) and prints the K source lines
holding the most memory when the last result is in: where the growth per call comes from.

``--sweep`` measures ``f.imap``'s in-flight bound instead: one curve per bound (``--bounds``,
multiples of the pool's sandbox count: 8 is 8 calls per sandbox), each beside ``mp_imap`` in the
same run, printing calls/s, the ratio to the peer and the client's RSS growth; what the default
bound of ``f.imap`` was chosen by (it is ``map``'s: 512 per sandbox).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
APIS = ("map", "imap", "imap_32", "mp_imap")
LABELS = {"map": "sandpool f.map", "imap": "sandpool f.imap", "imap_32": "sandpool f.imap, 32 in flight",
          "mp_imap": "mp.Pool.imap (peer)"}


def inc(x):
    return x + 1


class RssSampler:
    """This process's RSS (MB, less ``base``) every ``period`` seconds, in a thread, until stopped."""

    def __init__(self, began: float, base: int, period: float = 0.1) -> None:
        import psutil

        self.proc, self.began, self.base, self.period = psutil.Process(), began, base, period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        return (self.proc.memory_info().rss - self.base) / 1e6

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((time.perf_counter() - self.began, self.now_mb()))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def consume(results, calls: int, window: int, began: float, sampler: RssSampler) -> list[dict]:
    """Take every result in order, checking it; one row per window of ``window`` calls."""
    rows, last = [], began
    for i, value in enumerate(results, 1):
        if value != i:  # inc(i - 1)
            raise AssertionError(f"call {i - 1} returned {value!r}")
        if i % window == 0 or i == calls:
            now = time.perf_counter()
            done_before = rows[-1]["calls"] if rows else 0
            rows.append({"calls": i, "t_s": now - began, "rate": (i - done_before) / (now - last),
                         "rss_mb": sampler.now_mb()})
            last = now
    return rows


def one_curve(api: str, calls: int, window: int, in_flight: int | None = None) -> dict:
    """In this process: the curve of one API over ``calls`` trivial calls on 2 workers."""
    import psutil

    if api == "mp_imap":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(inc, range(2000), chunksize=1)
            return _timed(api, calls, window, lambda: pool.imap(inc, range(calls), chunksize=1), psutil)
    import sandpool

    with sandpool.Session() as session:
        f = session.function(max_concurrency=2)(inc)
        sandpool.results(f.map([(i,) for i in range(2000)]))  # both sandboxes up, the function shipped
        if api == "map":
            def run():
                refs = f.map((i,) for i in range(calls))
                return (ref.result() for ref in refs)
        else:
            def run():
                return f.imap(range(calls), max_in_flight=32 if api == "imap_32" else in_flight)
        return _timed(api, calls, window, run, psutil)


def trace_map(calls: int, top: int) -> str:
    """One ``f.map`` of ``calls`` under tracemalloc: the ``top`` source lines that hold the most
    memory allocated since the map began, taken when its last result is in (refs still held)."""
    import tracemalloc

    import sandpool

    with sandpool.Session() as session:
        f = session.function(max_concurrency=2)(inc)
        sandpool.results(f.map([(i,) for i in range(2000)]))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        refs = f.map((i,) for i in range(calls))
        assert [ref.result() for ref in refs][-1] == calls
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        lines = [f"{calls:,} calls through f.map, memory held when the last result is in:"]
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size_diff / calls:7.1f} B/call  {stat.count_diff:>9,} blocks  "
                         f"{os.path.relpath(frame.filename)}:{frame.lineno}")
        return "\n".join(lines)


def _timed(api: str, calls: int, window: int, start, psutil) -> dict:
    gc.collect()
    base = psutil.Process().memory_info().rss
    began = time.perf_counter()
    with RssSampler(began, base) as sampler:
        rows = consume(start(), calls, window, began, sampler)
        total = time.perf_counter() - began
    peak = max([r["rss_mb"] for r in rows] + [mb for _, mb in sampler.samples])
    return {"api": api, "calls": calls, "window": window, "total_s": total, "rate": calls / total,
            "rss_start_mb": base / 1e6, "rss_peak_mb": peak, "windows": rows, "rss_samples": sampler.samples,
            **summary(rows)}


def summary(rows: list[dict]) -> dict:
    """Steadiness and memory growth of one curve: the windows' rates against their median, and the
    RSS growth per call after the first window (least squares), in bytes."""
    rates = [r["rate"] for r in rows if r["calls"] % rows[0]["calls"] == 0] or [rows[-1]["rate"]]
    median = statistics.median(rates)
    tail = rows[1:] if len(rows) > 2 else rows
    xs, ys = [r["calls"] for r in tail], [r["rss_mb"] * 1e6 for r in tail]
    slope = statistics.linear_regression(xs, ys).slope if len(tail) > 1 and len(set(xs)) > 1 else 0.0
    return {"rate_median": median, "rate_min_vs_median": min(rates) / median, "rate_max_vs_median": max(rates) / median,
            "rss_end_mb": rows[-1]["rss_mb"], "rss_growth_bytes_per_call": slope}


def run_curves(calls: int, window: int, apis=APIS) -> dict:
    """Each API's curve in a fresh child process, one after another; the curves by API."""
    return {api: _child(api, calls, window) for api in apis}


def _child(api: str, calls: int, window: int, in_flight: int | None = None) -> dict:
    """One curve, in a fresh child process."""
    extra = [] if in_flight is None else ["--in-flight", str(in_flight)]
    done = subprocess.run([sys.executable, __file__, "--one", api, "--calls", str(calls), "--window", str(window),
                           *extra], capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"the {api} curve failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


SANDBOXES = 2  # the pool's sandboxes in every curve (max_concurrency=2)


def sweep(calls: int, window: int, bounds: list[int]) -> list[dict]:
    """``f.imap`` at each in-flight bound (``bounds`` x the sandbox count), the peer's curve
    before each (so that a busy moment of the machine falls on both alike). Prints a row each."""
    rows = []
    print("| in flight (per sandbox) | f.imap calls/s | mp.Pool.imap calls/s | ratio | client RSS growth |")
    print("|---:|---:|---:|---:|---:|")
    for per in bounds:
        peer = _child("mp_imap", calls, window)
        ours = _child("imap", calls, window, per * SANDBOXES)
        row = {"in_flight": per * SANDBOXES, "per_sandbox": per, "rate": ours["rate"], "peer_rate": peer["rate"],
               "ratio": ours["rate"] / peer["rate"], "rss_end_mb": ours["rss_end_mb"],
               "rss_growth_bytes_per_call": ours["rss_growth_bytes_per_call"]}
        rows.append(row)
        print(f"| {row['in_flight']} ({per}) | {row['rate']:,.0f} | {row['peer_rate']:,.0f} | {row['ratio']:.2f}x "
              f"| {row['rss_end_mb']:.1f} MB |", flush=True)
    return rows


def table(curves: dict) -> str:
    lines = ["| API | calls | calls/s overall | median window | slowest / fastest window vs median "
             "| client RSS growth at the end / at its peak | bytes per call after window 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for api, c in curves.items():
        lines.append(f"| {LABELS[api]} | {c['calls']:,} | {c['rate']:,.0f} | {c['rate_median']:,.0f} "
                     f"| {c['rate_min_vs_median']:.2f} / {c['rate_max_vs_median']:.2f} "
                     f"| {c['rss_end_mb']:.1f} / {c['rss_peak_mb']:.1f} MB "
                     f"| {c['rss_growth_bytes_per_call']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000, help="calls in the map (default 1,000,000)")
    parser.add_argument("--window", type=int, default=50_000, help="calls per window of the rate (default 50,000)")
    parser.add_argument("--apis", default=",".join(APIS), help=f"which curves, of {','.join(APIS)}")
    parser.add_argument("--one", choices=APIS, help=argparse.SUPPRESS)  # (internal: one curve, JSON on stdout)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "bench_map_curve.json"))
    parser.add_argument("--png", help="also draw the curves to this PNG (needs matplotlib)")
    parser.add_argument("--trace", type=int, metavar="K", help="instead: where one map's memory goes (top K lines)")
    parser.add_argument("--sweep", action="store_true", help="instead: f.imap at each in-flight bound vs the peer")
    parser.add_argument("--bounds", default="8,16,32,64,128,256,512",
                        help="the sweep's bounds, in calls per sandbox (default 8,16,32,64,128,256,512)")
    parser.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)  # (internal: imap's bound)
    args = parser.parse_args()
    if args.calls < 1 or args.window < 1:
        parser.error(f"--calls and --window must be >= 1, got {args.calls} and {args.window}")
    if args.one:
        print(json.dumps(one_curve(args.one, args.calls, args.window, args.in_flight)))
        return
    if args.sweep:
        rows = sweep(args.calls, args.window, [int(b) for b in args.bounds.split(",") if b])
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        return
    if args.trace:
        print(trace_map(args.calls, args.trace))
        return
    curves = run_curves(args.calls, args.window, [a for a in args.apis.split(",") if a])
    print(table(curves))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(curves, f, indent=1)
    if args.png:
        import _plots

        _plots.map_curve(curves, args.png, LABELS)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
