"""sandpool core benchmarks, each printed beside its floor measured in the same run.

    python benchmarks/bench_core.py [--quick] [--json PATH]

Measures, on the embedded default (LocalRuntime):

- start:    ``session.sandbox()`` then ``start()`` until RUNNING, one at a time (sync API and trio
            API); floor: ``python -S -c pass`` (a bare interpreter start). Target <= 1.5x.
- exec:     ``sb.exec(["true"])`` until its result, in a running sandbox (sync and trio);
            floor: ``subprocess.run(["true"])``. Target <= 1.5x.
- 100 up/down: 100 sandboxes started concurrently until all RUN, then stopped concurrently until
            all are gone (wall time); floor: 100 ``python -S -c pass`` started at once and reaped.
- idle memory: private memory (USS) of each agent process of 20 idle sandboxes; floor: USS of an
            idle bare interpreter (``python -S``). Target <= 5 MB.

Latencies are p50/p99 (nearest rank) over all samples; wall times are the median of repetitions.
Prints a Markdown table and writes every figure as JSON (default ``benchmarks/results/bench_core.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import trio

import sandpool
from _measure import latency, timed
from _sandpool_agent.linux import children
from sandpool import SandboxDefaults, Session

MB = 1e6
TEMPLATE_MARK = "_sandpool_agent.template"


# ---------------------------------------------------------------- measuring
def uss_bytes(pid: int) -> int | None:
    """Private (unshared) memory of ``pid``: Private_Clean + Private_Dirty, as psutil's USS."""
    try:
        import psutil

        return psutil.Process(pid).memory_full_info().uss
    except ImportError:
        pass
    except Exception:  # gone, or not permitted
        return None
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- floors
PY_PASS = [sys.executable, "-S", "-c", "pass"]


def floor_python_start(n: int) -> list[float]:
    return timed(n, lambda: subprocess.run(PY_PASS, check=True))


def floor_true(n: int) -> list[float]:
    return timed(n, lambda: subprocess.run(["true"], check=True), warm=10)


def floor_100_interpreters(count: int) -> float:
    began = time.perf_counter()
    procs = [subprocess.Popen(PY_PASS) for _ in range(count)]
    for proc in procs:
        proc.wait()
    return time.perf_counter() - began


def floor_idle_interpreter() -> int | None:
    proc = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        time.sleep(0.3)
        return uss_bytes(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait()


# ---------------------------------------------------------------- sandpool, sync API
def sync_start(session: Session, n: int) -> list[float]:
    samples = []
    for i in range(n + 3):
        sandbox = session.sandbox()
        began = time.perf_counter()
        sandbox.start().result()
        elapsed = time.perf_counter() - began
        sandbox.stop(graceful_shutdown_seconds=0).result()
        if i >= 3:  # warm-up
            samples.append(elapsed)
    return samples


def sync_exec(session: Session, n: int) -> list[float]:
    sandbox = session.sandbox()
    sandbox.wait()
    try:
        return timed(n, lambda: sandbox.exec(["true"]).result(), warm=20)
    finally:
        sandbox.stop(graceful_shutdown_seconds=0).result()


def up_down(session: Session, count: int) -> dict:
    pool = [session.sandbox() for _ in range(count)]
    began = time.perf_counter()
    for ref in [sandbox.start() for sandbox in pool]:
        ref.result()
    up = time.perf_counter()
    for ref in [sandbox.stop(graceful_shutdown_seconds=0) for sandbox in pool]:
        ref.result()
    down = time.perf_counter()
    return {"start_s": up - began, "stop_s": down - up, "total_s": down - began}


def idle_memory(session: Session, count: int) -> dict:
    pool = [session.sandbox() for _ in range(count)]
    for ref in [sandbox.start() for sandbox in pool]:
        ref.result()
    time.sleep(0.5)  # let them go idle
    templates = [pid for pid in children(os.getpid()) if TEMPLATE_MARK in cmdline(pid)]
    agents = [sandbox._record.agent_pid for sandbox in pool]  # not the template's pre-made spares
    usses = [u for u in map(uss_bytes, agents) if u is not None]
    template_uss = [u for u in map(uss_bytes, templates) if u is not None]
    for ref in [sandbox.stop(graceful_shutdown_seconds=0) for sandbox in pool]:
        ref.result()
    if len(usses) != count:
        raise RuntimeError(f"found {len(usses)} agent processes for {count} idle sandboxes")
    return {"agent_uss_median_mb": statistics.median(usses) / MB, "agent_uss_max_mb": max(usses) / MB,
            "agents": len(usses), "template_uss_mb": sum(template_uss) / MB}


# ---------------------------------------------------------------- sandpool, trio API
async def trio_figures(n_start: int, n_exec: int) -> dict:
    async with Session(defaults=SandboxDefaults(tags=("bench",), isolation=ISOLATION)) as session:
        starts = []
        for i in range(n_start + 3):
            sandbox = session.sandbox()
            began = time.perf_counter()
            await sandbox.start()
            elapsed = time.perf_counter() - began
            await sandbox.stop(graceful_shutdown_seconds=0)
            if i >= 3:
                starts.append(elapsed)
        sandbox = session.sandbox()
        await sandbox
        for _ in range(20):
            await sandbox.exec(["true"])
        execs = []
        for _ in range(n_exec):
            began = time.perf_counter()
            await sandbox.exec(["true"])
            execs.append(time.perf_counter() - began)
    return {"start": starts, "exec": execs}


# ---------------------------------------------------------------- report
def ratio_row(name: str, measured: dict, floor_name: str, floor: dict, target: float | None) -> dict:
    ratio = measured["p50_ms"] / floor["p50_ms"]
    return {"metric": name, "p50_ms": measured["p50_ms"], "p99_ms": measured["p99_ms"],
            "floor": floor_name, "floor_p50_ms": floor["p50_ms"], "floor_p99_ms": floor["p99_ms"],
            "ratio_p50": ratio, "target_ratio": target,
            "meets_target": None if target is None else ratio <= target}


def table(rows: list[dict], up: dict, up_floor: float, memory: dict, idle_floor: float | None) -> str:
    def verdict(ok):
        return "-" if ok is None else ("yes" if ok else "**no**")

    lines = [
        "| measurement | p50 | p99 | floor (same run) | floor p50 | floor p99 | ratio (p50) | target | met |",
        "|---|---:|---:|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        target = "-" if r["target_ratio"] is None else f"<= {r['target_ratio']}x"
        lines.append(f"| {r['metric']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['floor']} | "
                     f"{r['floor_p50_ms']:.2f} ms | {r['floor_p99_ms']:.2f} ms | {r['ratio_p50']:.2f}x | "
                     f"{target} | {verdict(r['meets_target'])} |")
    lines.append(f"| 100 sandboxes started + stopped (wall) | {up['total_s'] * 1000:.0f} ms "
                 f"(start {up['start_s'] * 1000:.0f} + stop {up['stop_s'] * 1000:.0f}) | | "
                 f"100 × `python -S -c pass`, concurrent | {up_floor * 1000:.0f} ms | | "
                 f"{up['total_s'] / up_floor:.2f}x | - | - |")
    mem = memory["agent_uss_median_mb"]
    idle = "n/a" if idle_floor is None else f"{idle_floor / MB:.2f} MB"
    ratio = "n/a" if idle_floor is None else f"{mem * MB / idle_floor:.2f}x"
    lines.append(f"| idle sandbox, private memory (USS, median of {memory['agents']}) | {mem:.2f} MB | "
                 f"max {memory['agent_uss_max_mb']:.2f} MB | idle `python -S` (USS) | {idle} | | {ratio} | "
                 f"<= 5 MB | {verdict(mem <= 5.0)} |")
    return "\n".join(lines)


ISOLATION = "auto"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not figures")
    parser.add_argument("--isolation", default="auto", choices=["auto", "process", "namespaces"],
                        help="the sandboxes' isolation level (default: auto, namespaces as root)")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                       "results", "bench_core.json"),
                        help="where to write the JSON record ('-' for stdout)")
    args = parser.parse_args()
    global ISOLATION
    ISOLATION = args.isolation
    n_py, n_true, n_start, n_exec, reps, idle_n = (5, 20, 10, 20, 1, 5) if args.quick else (40, 300, 200, 500, 3, 20)
    started = time.perf_counter()
    load_start = os.getloadavg()

    floors = {"python_S_pass": latency(floor_python_start(n_py)), "subprocess_true": latency(floor_true(n_true))}
    with Session(defaults=SandboxDefaults(tags=("bench",), isolation=ISOLATION)) as session:
        warm = session.sandbox().wait()  # open the session and its runtime before timing anything
        warm.stop(graceful_shutdown_seconds=0).result()
        sync = {"start": latency(sync_start(session, n_start)), "exec": latency(sync_exec(session, n_exec))}
        ups = [up_down(session, 100) for _ in range(reps)]
        memory = idle_memory(session, idle_n)
    async_raw = trio.run(trio_figures, n_start, n_exec)
    asyn = {k: latency(v) for k, v in async_raw.items()}
    up_floor = statistics.median(floor_100_interpreters(100) for _ in range(reps))
    idle_floor = floor_idle_interpreter()
    up = {k: statistics.median(u[k] for u in ups) for k in ups[0]}

    rows = [
        ratio_row("start to RUNNING (sync API)", sync["start"], "`python -S -c pass`", floors["python_S_pass"], 1.5),
        ratio_row("start to RUNNING (trio API)", asyn["start"], "`python -S -c pass`", floors["python_S_pass"], 1.5),
        ratio_row("exec `true` (sync API)", sync["exec"], "`subprocess.run(['true'])`", floors["subprocess_true"], 1.5),
        ratio_row("exec `true` (trio API)", asyn["exec"], "`subprocess.run(['true'])`", floors["subprocess_true"], 1.5),
    ]
    record = {
        "bench": "bench_core", "sandpool": sandpool.__version__, "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release()},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - started, 2),
        "floors": floors, "sync": sync, "trio": asyn, "ratios": rows,
        "up_down_100": {"median": up, "runs": ups, "floor_100_python_S_pass_s": up_floor},
        "idle_memory": {**memory, "floor_idle_python_S_uss_mb": None if idle_floor is None else idle_floor / MB,
                        "target_mb": 5.0, "meets_target": memory["agent_uss_median_mb"] <= 5.0},
    }
    print(table(rows, up, up_floor, memory, idle_floor))
    print(f"\nThe template process all sandboxes fork from: {memory['template_uss_mb']:.2f} MB USS, paid once.")
    print(f"Python {record['machine']['python']}, {record['machine']['cpus']} cpus, "
          f"load {load_start[0]:.2f} -> {record['loadavg_end'][0]:.2f}, {record['wall_s']} s"
          f"{' (--quick: too few samples for figures)' if args.quick else ''}")
    if args.json == "-":
        print(json.dumps(record))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
