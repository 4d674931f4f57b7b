"""Remote functions against the process pools a user would otherwise pick, measured in one run.

    python benchmarks/bench_functions.py [--reps 3] [--only sandpool,ppe] [--quick] [--conc 1,2,4,8]
                                         [--json out.json]

Each peer runs in a fresh child process (this script with ``--peer NAME``), which prints one JSON
line; the parent prints a table, the ratios the issue targets, and the whole record as JSON.
Peers: multiprocessing.Pool and ProcessPoolExecutor (fork), loky and trio-parallel when installed,
sandpool (sync calls, and ``await`` inside trio), and Ray (tasks) when it is installed and named in
``--only`` (its cluster takes seconds to start, so it is not in the default list); the last column
quotes Ray's reference figures, measured on this machine kind.

Metrics (same definitions as the peer anchors): cold start of 8 workers (pool creation until 8
distinct workers each ran a task; for sandpool, from opening a Session with its own runtime), round
trip p50/p90/p99 of inc(x) (2000 sequential calls on 2 warm workers), 20,000 inc via map with one
task per item, 400 x sleep(50 ms) on 8 warm workers (ideal 2.5 s), a 10 MB bytes echo (median of 10),
private memory (USS) per idle worker (for sandpool: agent plus worker process of one sandbox); with
``--conc``, trivial calls/s through map on pools of each of those sizes (throughput vs concurrency).
``--quick`` takes smaller counts (see QUICK). ``run_peers`` is the same run for other scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))
import _fn_tasks as T  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each measure does: latency calls, warm-up calls, map calls, sleep tasks, echo bytes,
    the pool sizes of throughput vs concurrency and the calls timed at each."""

    lat: int = 2000
    warm: int = 200
    map: int = 20_000
    conc_tasks: int = 400
    payload: int = 10_000_000
    conc: tuple[int, ...] = ()
    conc_calls: int = 5000


QUICK = Sizes(lat=300, warm=50, map=2000, conc_tasks=48, payload=1_000_000, conc_calls=1000)
CONC_SLEEP = 0.05
PEERS = ["mp_pool", "ppe", "loky", "trio_parallel", "sandpool", "sandpool_async"]
LABELS = {"mp_pool": "mp.Pool (fork)", "ppe": "ProcessPoolExecutor (fork)", "loky": "loky",
          "trio_parallel": "trio-parallel", "sandpool": "sandpool (sync)", "sandpool_async": "sandpool (trio)",
          "ray": "Ray tasks"}
#: Ray (tasks), from shared/reference/peer_benchmarks.md (same machine kind, not measured here).
RAY_REFERENCE = {"cold8_ms": 3835, "rtt_p50_us": 1684, "rtt_p99_us": 3800, "map20k_tps": 1531,
                 "conc_s": 2.654, "payload_ms": 14.3, "uss_mb": 42.3}
#: The ratios the issue sets a bound on (sandpool over its peer, same run).
RATIO_TARGETS = {"rtt_p50_vs_ppe": 0.75}
METRICS = [("cold8_ms", "cold start, 8 workers (ms)"), ("rtt_p50_us", "round trip p50 (us)"),
           ("rtt_p90_us", "round trip p90 (us)"), ("rtt_p99_us", "round trip p99 (us)"),
           ("map20k_tps", "map, 1 call per task (calls/s)"),
           ("conc_s", "N x 50 ms on 8 workers (s)"), ("payload_ms", "bytes echo (ms)"),
           ("uss_mb", "private MB per idle worker")]


def pct(values, q):
    s = sorted(values)
    return s[round(q / 100 * (len(s) - 1))]


def uss_mb(pids):
    import psutil

    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).memory_full_info().uss / 1e6)
        except psutil.Error:
            pass
    return statistics.median(out) if out else float("nan")


# -- sync peers ---------------------------------------------------------------------------------------


class SyncPeer:
    """open(n), call(fn, *args), map(fn, xs), gather(fn, argtuples), pids(), close()."""

    def gather(self, fn, argtuples):
        return [f.result() for f in [self.submit(fn, *a) for a in argtuples]]


class MpPool(SyncPeer):
    def open(self, n):
        import multiprocessing

        self.pool = multiprocessing.get_context("fork").Pool(n)

    def call(self, fn, *a):
        return self.pool.apply(fn, a)

    def submit(self, fn, *a):
        r = self.pool.apply_async(fn, a)
        r.result = r.get
        return r

    def map(self, fn, xs):
        return self.pool.map(fn, xs, chunksize=1)

    def close(self):
        self.pool.close()
        self.pool.join()


class Executor(SyncPeer):
    def __init__(self, kind):
        self.kind = kind

    def open(self, n):
        if self.kind == "loky":
            import loky

            self.ex = loky.ProcessPoolExecutor(max_workers=n)
        else:
            import concurrent.futures
            import multiprocessing

            self.ex = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))

    def call(self, fn, *a):
        return self.ex.submit(fn, *a).result()

    def submit(self, fn, *a):
        return self.ex.submit(fn, *a)

    def map(self, fn, xs):
        return list(self.ex.map(fn, xs, chunksize=1))

    def close(self):
        self.ex.shutdown(wait=True)


class RayPeer(SyncPeer):
    """Ray tasks on a local cluster of ``n`` cpus (started by ``open``, stopped by ``close``)."""

    def open(self, n):
        import ray
        import ray.cloudpickle

        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.cloudpickle.register_pickle_by_value(T)  # the workers cannot import this folder's modules
        self.ray, self.fns = ray, {}

    def fn(self, f):
        if f not in self.fns:
            self.fns[f] = self.ray.remote(f)
        return self.fns[f]

    def call(self, f, *a):
        return self.ray.get(self.fn(f).remote(*a))

    def submit(self, f, *a):
        return _RayFuture(self.ray, self.fn(f).remote(*a))

    def map(self, f, xs):
        return self.ray.get([self.fn(f).remote(x) for x in xs])

    def close(self):
        self.ray.shutdown()


@dataclasses.dataclass
class _RayFuture:
    ray: object
    ref: object

    def result(self):
        return self.ray.get(self.ref)


class Sandpool(SyncPeer):
    def open(self, n):
        import cloudpickle

        import sandpool

        cloudpickle.register_pickle_by_value(T)
        self.session = sandpool.Session().__enter__()
        self.n, self.fns = n, {}

    def fn(self, f):
        if f not in self.fns:
            self.fns[f] = self.session.function(f, max_concurrency=self.n)
        return self.fns[f]

    def call(self, f, *a):
        return self.fn(f).remote(*a).result()

    def submit(self, f, *a):
        return self.fn(f).remote(*a)

    def map(self, f, xs):
        return [r.result() for r in self.fn(f).map([(x,) for x in xs])]

    def close(self):
        self.session.__exit__(None, None, None)


def sandpool_pids(session):
    """Per sandbox of the session's pools: its agent and its call worker."""
    import psutil

    groups = []
    for pool in session._pools.values():
        for slot in pool.slots:
            agent = slot.sandbox.sandbox._record.agent_pid
            groups.append([agent] + [c.pid for c in psutil.Process(agent).children()])
    return groups


def run_sync(make, res, reps, sizes):
    """Round trip, map and payload on 2 warm workers; concurrency on 8; cold start and memory;
    trivial calls/s on pools of each size of ``sizes.conc``."""
    if make is not None:
        for _ in range(reps):  # cold start of 8, then memory of the 8 idle workers
            d = tempfile.mkdtemp()
            peer = make()
            t = time.perf_counter()
            peer.open(8)
            pids = peer.gather(T.rendezvous, [(d, 8, 60)] * 8)
            res.setdefault("cold8_ms", []).append((time.perf_counter() - t) * 1e3)
            assert len(set(pids)) == 8
            time.sleep(0.5)
            res.setdefault("uss_mb", []).append(uss_mb(pids))
            peer.close()
    factory = make or Sandpool  # sandpool's cold start is measured apart (sandpool_cold)
    peer = factory()
    peer.open(2)
    warm_and_measure(peer, res, reps, sizes)
    peer.close()
    peer = factory()
    peer.open(8)
    peer.gather(T.sleep_task, [(0.01,)] * 16)
    for _ in range(reps):
        t = time.perf_counter()
        peer.gather(T.sleep_task, [(CONC_SLEEP,)] * sizes.conc_tasks)
        res.setdefault("conc_s", []).append(time.perf_counter() - t)
    peer.close()
    for c in sizes.conc:
        peer = factory()
        peer.open(c)
        peer.map(T.inc, range(max(c * 20, sizes.warm)))  # every worker up
        for _ in range(reps):
            t = time.perf_counter()
            out = peer.map(T.inc, range(sizes.conc_calls))
            res.setdefault(f"tps_c{c}", []).append(sizes.conc_calls / (time.perf_counter() - t))
            assert len(out) == sizes.conc_calls
        peer.close()


def record_latency(res, lat_ns):
    for q in (50, 90, 99):
        res.setdefault(f"rtt_p{q}_us", []).append(pct(lat_ns, q) / 1e3)


def warm_and_measure(peer, res, reps, sizes):
    peer.gather(T.inc, [(i,) for i in range(sizes.warm)])
    for i in range(sizes.warm):
        peer.call(T.inc, i)
    payload = os.urandom(sizes.payload)
    peer.call(T.identity, payload)
    xs = list(range(sizes.map))
    for _ in range(reps):
        lat = []
        for i in range(sizes.lat):
            t = time.perf_counter_ns()
            peer.call(T.inc, i)
            lat.append(time.perf_counter_ns() - t)
        record_latency(res, lat)
        t = time.perf_counter()
        out = peer.map(T.inc, xs)
        res.setdefault("map20k_tps", []).append(sizes.map / (time.perf_counter() - t))
        assert sum(out) == sum(xs) + sizes.map
        samples = []
        for _ in range(10):
            t = time.perf_counter()
            assert len(peer.call(T.identity, payload)) == sizes.payload
            samples.append(time.perf_counter() - t)
        res.setdefault("payload_ms", []).append(statistics.median(samples) * 1e3)


def sandpool_cold(res, reps):
    """Cold start from nothing: a Session with its own runtime (template process) to 8 fresh
    sandboxes that each ran one call (reuse=False: instant calls would otherwise all go to the
    first sandbox up); then the private memory of 8 idle warm sandboxes."""
    import cloudpickle
    import trio

    import sandpool

    cloudpickle.register_pickle_by_value(T)

    async def once():
        t = time.perf_counter()
        async with sandpool.Session() as s:
            fresh = s.function(T.whoami, max_concurrency=8, reuse=False)
            ids = await sandpool.gather(fresh.map([()] * 8))
            res.setdefault("cold8_ms", []).append((time.perf_counter() - t) * 1e3)
            assert len(set(ids)) == 8, ids
            warm = s.function(T.sleep_task, max_concurrency=8)
            await sandpool.gather(warm.map([(0.2,)] * 8))  # calls of unknown length: one per sandbox
            await trio.sleep(0.5)
            res.setdefault("uss_mb", []).append(statistics.median(
                sum(uss_mb([pid]) for pid in group) for group in sandpool_pids(s) if len(group) > 1))

    for _ in range(reps):
        trio.run(once)


# -- async peers --------------------------------------------------------------------------------------


def run_async(kind, res, reps, sizes):
    import trio

    async def main():
        if kind == "trio_parallel":
            import trio_parallel

            async def session(n, body):
                async with trio_parallel.open_worker_context() as ctx:
                    lim = trio.CapacityLimiter(n)
                    await body(lambda fn, *a: ctx.run_sync(fn, *a, limiter=lim))
        else:
            import cloudpickle

            import sandpool

            cloudpickle.register_pickle_by_value(T)

            async def session(n, body):
                async with sandpool.Session() as s:
                    fns = {}

                    def call(fn, *a):
                        if fn not in fns:
                            fns[fn] = s.function(fn, max_concurrency=n)
                        return fns[fn].remote(*a)

                    await body(call)

        async def gather(call, fn, argtuples):
            out = [None] * len(argtuples)

            async def one(i, a):
                out[i] = await call(fn, *a)

            async with trio.open_nursery() as nursery:
                for i, a in enumerate(argtuples):
                    nursery.start_soon(one, i, a)
            return out

        async def warm2(call):
            await gather(call, T.inc, [(i,) for i in range(sizes.warm)])
            for i in range(sizes.warm):
                await call(T.inc, i)
            for _ in range(reps):
                lat = []
                for i in range(sizes.lat):
                    t = time.perf_counter_ns()
                    await call(T.inc, i)
                    lat.append(time.perf_counter_ns() - t)
                record_latency(res, lat)
                t = time.perf_counter()
                out = await gather(call, T.inc, [(x,) for x in range(sizes.map)])
                res.setdefault("map20k_tps", []).append(sizes.map / (time.perf_counter() - t))
                assert sum(out) == sum(range(sizes.map)) + sizes.map

        def throughput(c):
            async def body(call):
                await gather(call, T.inc, [(i,) for i in range(max(c * 20, sizes.warm))])
                for _ in range(reps):
                    t = time.perf_counter()
                    await gather(call, T.inc, [(i,) for i in range(sizes.conc_calls)])
                    res.setdefault(f"tps_c{c}", []).append(sizes.conc_calls / (time.perf_counter() - t))

            return body

        await session(2, warm2)
        for c in sizes.conc:
            await session(c, throughput(c))

    trio.run(main)


def child(name, reps, sizes):
    res: dict[str, list[float]] = {}
    if name in ("mp_pool", "ppe", "loky", "ray"):
        make = {"mp_pool": MpPool, "ppe": lambda: Executor("ppe"), "loky": lambda: Executor("loky"),
                "ray": RayPeer}[name]
        run_sync(make, res, reps, sizes)
    elif name == "sandpool":
        sandpool_cold(res, reps)
        run_sync(None, res, reps, sizes)
    else:
        run_async(name, res, reps, sizes)
    print(json.dumps({"peer": name, "results": res}))


def run_peers(names, reps, sizes, log=sys.stderr):
    """Each peer in a fresh child process, one after another: (medians by peer and metric, every
    repetition by peer and metric, why a peer was skipped)."""
    medians, raw, errors = {}, {}, {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--peer", name, "--reps", str(reps),
                               "--sizes", json.dumps(dataclasses.asdict(sizes))],
                              capture_output=True, text=True, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            errors[name] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{LABELS[name]}: skipped ({errors[name]})", file=log)
            continue
        raw[name] = json.loads(lines[-1])["results"]
        medians[name] = {k: statistics.median(v) for k, v in raw[name].items()}
    return medians, raw, errors


# -- the parent: run everything, print a table ---------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default=",".join(PEERS))
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run, not figures")
    parser.add_argument("--conc", default="", help="pool sizes for trivial calls/s vs concurrency, e.g. 1,2,4,8")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the record to this file")
    args = parser.parse_args()
    if args.peer:
        fields = json.loads(args.sizes)
        return child(args.peer, args.reps, Sizes(**{**fields, "conc": tuple(fields["conc"])}))
    sizes = dataclasses.replace(QUICK if args.quick else Sizes(),
                                conc=tuple(int(c) for c in args.conc.split(",") if c))
    medians, _raw, errors = run_peers(args.only.split(","), args.reps, sizes)
    record = {"machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}, "reps": args.reps,
              "sizes": dataclasses.asdict(sizes),
              "medians": medians, "ray_reference": RAY_REFERENCE, "errors": errors, "ratios": ratios(medians, sizes)}
    print(f"map: {sizes.map:,} calls; {sizes.conc_tasks} x 50 ms on 8 workers (ideal {ideal_conc_s(sizes):.2f} s); "
          f"echo of {sizes.payload / 1e6:g} MB\n")
    print_table(medians, sizes)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def ideal_conc_s(sizes):
    return sizes.conc_tasks * CONC_SLEEP / 8


def ratios(m, sizes):
    sp, out = m.get("sandpool", {}), {}
    ppe, pool = m.get("ppe", {}), m.get("mp_pool", {})
    if sp and ppe:
        out["rtt_p50_vs_ppe"] = sp["rtt_p50_us"] / ppe["rtt_p50_us"]
        out["payload_vs_ppe"] = sp["payload_ms"] / ppe["payload_ms"]
    if m.get("sandpool_async") and ppe:
        out["rtt_p50_async_vs_ppe"] = m["sandpool_async"]["rtt_p50_us"] / ppe["rtt_p50_us"]
    if sp and pool:
        out["map20k_vs_mp_pool"] = sp["map20k_tps"] / pool["map20k_tps"]
    if sp:
        out["map20k_vs_ray_reference"] = sp["map20k_tps"] / RAY_REFERENCE["map20k_tps"]
        out["conc_vs_ideal"] = sp["conc_s"] / ideal_conc_s(sizes)
        out["payload_vs_ray_reference"] = sp["payload_ms"] / RAY_REFERENCE["payload_ms"]
    return out


def print_table(m, sizes):
    names = list(m)
    print("| metric | " + " | ".join(LABELS[n] for n in names) + " | Ray tasks (reference) |")
    print("|---|" + "---:|" * (len(names) + 1))
    for key, label in METRICS:
        cells = [_fmt(m[n].get(key)) for n in names] + [_fmt(RAY_REFERENCE.get(key))]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    for key, value in ratios(m, sizes).items():
        target = RATIO_TARGETS.get(key)
        print(f"{key}: {value:.2f}" + (f" (target <= {target})" if target else ""))


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


if __name__ == "__main__":
    main()
