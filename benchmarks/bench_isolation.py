"""Start latency per isolation level, each beside its floor measured in the same run.

    python benchmarks/bench_isolation.py [--quick] [--json PATH]     (as root, for the namespaces level)

Measures, one sandbox at a time (``session.sandbox(...)`` then ``start()`` until RUNNING, then a stop
that is not timed), and once more including the first ``exec(["true"])``, taking the levels in turn
(round-robin) so that load from elsewhere falls on all of them alike:

- process:      the process level; floor: ``subprocess.run(["true"])`` (a fork and exec).
- namespaces:   the namespaces level on the host image (pid/mount/uts/ipc/cgroup/net namespaces,
                overlay root, pivot_root, cgroups with the default pids limit); floor:
                ``unshare --fork --pid --mount-proc --net --uts --ipc --cgroup --mount true``.
- namespaces + limits: the same with memory, cpu and pids limits (three more cgroup files).
- oci (crun):   the same sandbox as an OCI bundle run by crun (a fresh interpreter as the agent).
- namespaces, debian:bookworm: another image as the overlay's lower layer (if it is in the store).

With ``--against DIR`` (another checkout, e.g. the main branch), it measures only the namespaces
level of this checkout and of DIR: two child processes, one per checkout, take each sample in turn
(3 runs, each ``n`` starts, starts with a first exec, and execs in a running sandbox, with the
``unshare`` floor once per round, so each ratio stands beside a floor of the same run): the cost of
what this checkout adds, such as the syscall filter and the tmpfs-backed writable layer. Target: at
most 10% slower.

Also the first two levels started one by one 100 ms apart (now and then, not in a burst). Then 100
namespaces sandboxes started at once until all run and stopped at once (wall time; floor:
100 such ``unshare ... true`` started at once and reaped). Target: namespaces within 1.5x of process.
Latencies are nearest-rank p50/p99. Prints a Markdown table; JSON goes to
``benchmarks/results/bench_isolation.json`` unless ``--json`` says otherwise (``-`` is stdout).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from _measure import latency as summary, timed
from bench_core import up_down
from sandpool import Session
from sandpool._isolation import images, probe

UNSHARE = ["unshare", "--fork", "--pid", "--mount-proc", "--net", "--uts", "--ipc", "--cgroup", "--mount", "true"]


def one_start(session: Session, options: dict, first_exec: bool) -> float:
    """Seconds from start() to RUNNING (and to the first exec's result); the stop is not timed."""
    sandbox = session.sandbox(**options)
    began = time.perf_counter()
    sandbox.start().result()
    if first_exec:
        sandbox.exec(["true"]).result()
    elapsed = time.perf_counter() - began
    sandbox.stop(graceful_shutdown_seconds=0).result()
    return elapsed


def after_pause(session: Session, n: int, levels: list) -> dict:
    """Starts 100 ms after the last one (sandboxes started now and then, not in a burst): a cgroup
    move after a pause waits for an RCU grace period, which the namespaces level's spares pay early."""
    samples: dict = {name: [] for name, _options, _floor in levels}
    for _ in range(n):
        for name, options, _floor in levels:
            time.sleep(0.1)
            samples[name].append(one_start(session, options, first_exec=False))
    return {name: summary(values) for name, values in samples.items()}


def interleaved_starts(session: Session, n: int, levels: list) -> dict:
    """Round-robin over the levels, so load that comes and goes hits every level alike."""
    samples: dict = {name: {"start": [], "start_exec": []} for name, _options, _floor in levels}
    for i in range(n + 3):  # the first 3 rounds warm up (the namespaces level's spares appear then)
        for name, options, _floor in levels:
            for kind, first_exec in (("start", False), ("start_exec", True)):
                elapsed = one_start(session, options, first_exec)
                if i >= 3:
                    samples[name][kind].append(elapsed)
    return samples


#: Run in a child with PYTHONPATH set to a checkout: one timed sample (seconds) per line read from
#: stdin ("start", "start_exec" or "exec"), so two checkouts' samples can be taken in turn.
_AGAINST_CHILD = """
import sys, time
import sandpool
from bench_isolation import one_start
with sandpool.Session(defaults={"isolation": "namespaces"}) as session:
    for _ in range(5):
        one_start(session, {}, True)
    sandbox = session.sandbox()
    sandbox.exec(["true"]).result()
    print(sandpool.__file__, flush=True)
    for line in sys.stdin:
        if line.strip() == "exec":
            began = time.perf_counter()
            sandbox.exec(["true"]).result()
            elapsed = time.perf_counter() - began
        else:
            elapsed = one_start(session, {}, line.strip() == "start_exec")
        print(elapsed, flush=True)
"""
_KINDS = ("start", "start_exec", "exec")


def against(other: str, n: int, reps: int) -> dict:
    """This checkout's namespaces level beside ``other``'s: per run, two child processes (one per
    checkout) take each sample in turn, the order swapped every round, so load from elsewhere
    falls on both alike, and the floor (``UNSHARE``) once per round between them. Returns per run
    and checkout the p50 (ms) of each kind, and per run the floor's p50 (ms)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    runs: dict = {"this": [], "other": [], "floor": []}
    floor_argv = UNSHARE if shutil.which("unshare") else ["true"]
    for _ in range(reps):
        children = {}
        for key, root in (("this", here), ("other", other)):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, bench_dir])}
            child = subprocess.Popen([sys.executable, "-c", _AGAINST_CHILD], env=env, cwd="/", text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            children[key] = (child, child.stdout.readline().strip())
        samples = {key: {kind: [] for kind in _KINDS} for key in children}
        floor = []
        for i in range(n):
            floor.extend(timed(1, lambda: subprocess.run(floor_argv, check=True), warm=0))
            for kind in _KINDS:
                for key in (("this", "other") if i % 2 else ("other", "this")):
                    child = children[key][0]
                    child.stdin.write(kind + "\n")
                    child.stdin.flush()
                    samples[key][kind].append(float(child.stdout.readline()))
        for key, (child, package) in children.items():
            child.stdin.close()
            child.wait()
            runs[key].append({"package": package, **{k: summary(v)["p50_ms"] for k, v in samples[key].items()}})
        runs["floor"].append(summary(floor)["p50_ms"])
    return runs


def print_against(runs: dict) -> None:
    print(f"| run | namespaces | this checkout p50 | {runs['other'][0]['package']} p50 | ratio | floor p50 "
          "| this / floor | other / floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, (mine, theirs, floor) in enumerate(zip(runs["this"], runs["other"], runs["floor"]), 1):
        for kind in _KINDS:
            print(f"| {i} | {kind} | {mine[kind]:.2f} ms | {theirs[kind]:.2f} ms | {mine[kind] / theirs[kind]:.2f}x | "
                  f"{floor:.2f} ms | {mine[kind] / floor:.2f}x | {theirs[kind] / floor:.2f}x |")
    for kind in _KINDS:
        ratio = statistics.median(m[kind] / t[kind] for m, t in zip(runs["this"], runs["other"]))
        print(f"median ratio, {kind}: {ratio:.2f}x")


def filter_cost(n: int, reps: int) -> dict:
    """The syscall filter alone: p50 of ``subprocess.run(["true"])`` (fork, exec, wait; the agent's
    exec path) in a child that loaded the filter and in one that did not, taking each sample in
    turn (so load from elsewhere falls on both alike), ``reps`` times; plus the time to load the
    compiled filter, which every agent start pays."""
    from _sandpool_agent.confine import _sys, seccomp

    program = seccomp.program()
    # one ctypes buffer of the program's size made here first, so that the children's load time is
    # the load's own, as an agent's is (~0.3 ms, timed there); in a bare forked child the first
    # such buffer adds ~0.8 ms
    ctypes.create_string_buffer(program, len(program))
    runs: dict = {"filtered": [], "unfiltered": [], "load_us": []}
    for _ in range(reps):
        children: dict = {}
        for key in ("unfiltered", "filtered"):
            children[key] = _sampler(key == "filtered", program, _sys, [fd for c in children.values() for fd in c[:2]])
        samples: dict = {key: [] for key in children}
        for i in range(n + 5):  # the first 5 warm up
            for key in (("unfiltered", "filtered") if i % 2 else ("filtered", "unfiltered")):
                ask, answer, _pid, _loaded = children[key]
                os.write(ask, b"s")
                elapsed = float(os.read(answer, 100))
                if i >= 5:
                    samples[key].append(elapsed)
        for key, (ask, answer, pid, loaded) in children.items():
            os.close(ask)
            os.close(answer)
            os.waitpid(pid, 0)
            runs[key].append(summary(samples[key])["p50_ms"])
            if key == "filtered":
                runs["load_us"].append(loaded)
    return runs


def _sampler(filtered: bool, program: bytes, _sys, others: list[int]) -> tuple[int, int, int, float]:
    """A child that loads the filter (if ``filtered``), then times one ``subprocess.run(["true"])``
    per byte it reads, until EOF. Returns (fd to ask, fd to read its answers, its pid, load time in
    us). ``others``: the parent's ends of earlier samplers' pipes, closed in this one."""
    ask_r, ask_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (ask_w, ans_r, *others):
            os.close(fd)
        _sys.no_new_privs()  # (both: the agent has it already)
        began = time.perf_counter()
        if filtered:
            _sys.seccomp_filter(program)
        os.write(ans_w, repr((time.perf_counter() - began) * 1e6).encode())
        while os.read(ask_r, 1):
            began = time.perf_counter()
            subprocess.run(["true"], check=True)
            os.write(ans_w, repr(time.perf_counter() - began).encode())
        os._exit(0)
    os.close(ask_r)
    os.close(ans_w)
    return ask_w, ans_r, pid, float(os.read(ans_r, 100))


def floor_many(argv: list[str], count: int) -> float:
    began = time.perf_counter()
    for proc in [subprocess.Popen(argv) for _ in range(count)]:
        proc.wait()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not figures")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_isolation.json"))
    parser.add_argument("--against", metavar="DIR", help="compare the namespaces level with another checkout")
    args = parser.parse_args()
    n, reps, many = (5, 1, 20) if args.quick else (60, 3, 100)
    if args.against:
        runs = against(os.path.abspath(args.against), n, 3)
        print_against(runs)
        runs["filter"] = cost = filter_cost(max(n, 100), 3)
        print("\nthe filter alone, subprocess.run(['true']) p50: " + ", ".join(
            f"{f:.2f} vs {u:.2f} ms ({f / u:.2f}x)" for f, u in zip(cost["filtered"], cost["unfiltered"]))
            + "; loading it: " + ", ".join(f"{t:.0f} us" for t in cost["load_us"]))
        if args.json != "-":
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
            with open(args.json.replace(".json", "_against.json"), "w") as f:
                json.dump(runs, f, indent=1)
        return 0
    why = probe.unavailable("namespaces")
    has_unshare = shutil.which("unshare") is not None
    levels = [("process", {"isolation": "process"}, ["true"])]
    if why is None:
        floor = UNSHARE if has_unshare else ["true"]
        levels.append(("namespaces", {"isolation": "namespaces"}, floor))
        levels.append(("namespaces + limits", {"isolation": "namespaces", "resources": {
            "limits": {"memory": "512Mi", "cpu": "1", "pids": 256}}}, floor))
        if probe.unavailable("oci") is None:
            levels.append(("oci (crun)", {"isolation": "oci"}, floor))
        if images.find("debian:bookworm"):
            levels.append(("namespaces, debian:bookworm", {"isolation": "namespaces",
                                                          "container_image": "debian:bookworm"}, floor))
    else:
        print(f"namespaces level unavailable ({why}); measuring the process level only", file=sys.stderr)

    record: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                "kernel": platform.release(), "load_before": os.getloadavg()}, "levels": {}}
    with Session() as session:
        samples = interleaved_starts(session, n, levels)
        record["after_pause"] = after_pause(session, max(5, n // 3), levels[:2])
    for name, _options, floor_argv in levels:
        floor = summary(timed(n, lambda a=floor_argv: subprocess.run(a, check=True), warm=5))
        record["levels"][name] = {"start": summary(samples[name]["start"]),
                                  "start_exec": summary(samples[name]["start_exec"]),
                                  "floor": floor, "floor_argv": " ".join(floor_argv)}
    if why is None:
        with Session(defaults={"isolation": "namespaces"}) as session:
            runs = [up_down(session, many) for _ in range(reps)]
        floors = [floor_many(UNSHARE if has_unshare else ["true"], many) for _ in range(reps)]
        record["many"] = {"count": many, "runs": runs, "start_s": statistics.median(r["start_s"] for r in runs),
                          "stop_s": statistics.median(r["stop_s"] for r in runs), "floor_s": statistics.median(floors)}
    record["machine"]["load_after"] = os.getloadavg()

    base = record["levels"]["process"]
    print("| level | start p50 | start p99 | start+exec p50 | floor | floor p50 | vs floor | vs process |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, figures in record["levels"].items():
        start, both, floor = figures["start"], figures["start_exec"], figures["floor"]
        print(f"| {name} | {start['p50_ms']:.2f} ms | {start['p99_ms']:.2f} ms | {both['p50_ms']:.2f} ms | "
              f"`{figures['floor_argv'].split(' true')[0] or 'true'}` | {floor['p50_ms']:.2f} ms | "
              f"{start['p50_ms'] / floor['p50_ms']:.2f}x | {start['p50_ms'] / base['start']['p50_ms']:.2f}x "
              f"(with exec {both['p50_ms'] / base['start_exec']['p50_ms']:.2f}x) |")
    pause = record["after_pause"]
    print("\nafter a 100 ms pause: " + ", ".join(f"{name} {figures['p50_ms']:.2f} ms" for name, figures in pause.items())
          + (f" ({pause['namespaces']['p50_ms'] / pause['process']['p50_ms']:.2f}x)" if "namespaces" in pause else ""))
    if "many" in record:
        m = record["many"]
        print(f"\n{m['count']} namespaces sandboxes: all running in {m['start_s'] * 1000:.0f} ms, all stopped in "
              f"{m['stop_s'] * 1000:.0f} ms; floor ({m['count']} unshare ... true at once): {m['floor_s'] * 1000:.0f} ms")
    print(f"\nload average before {record['machine']['load_before']}, after {record['machine']['load_after']}")
    if args.json == "-":
        json.dump(record, sys.stdout, indent=1)
    else:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
