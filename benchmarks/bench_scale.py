"""Scale on one host: N concurrent sandboxes at the default (namespaces, as root) level.

    python benchmarks/bench_scale.py [--n 100,500,1000] [--isolation LEVEL] [--json PATH]     (as root)

For each N, in a fresh process (its own client, template and state dir), one session:

- up:        start N sandboxes at once and run one ``exec(["true"])`` in each (proof that they run),
             wall time until every result is in; also "running": until every start has resolved
             (each sandbox RUNNING: its agent answered the handshake from inside its namespaces),
             the issue's "come up" read literally, the first exec not included;
- exec:      one more ``exec(["true"])`` in each of the N, all at once, wall time;
- memory:    private memory (USS: Private_Clean + Private_Dirty, from /proc/PID/smaps_rollup via
             psutil) of each sandbox's agent, median and max, how many are over 3 MiB and the five
             largest (by kind of mapping, and their place in the order of forks); the agents' PSS
             median (their share of the pages they map with others: USS counts none of a page two
             processes share, and grows when the other exits); and USS of the agent with every
             process of the sandbox (nothing runs in it then: what a sandbox costs at rest), median;
- down:      stop all N at once (no grace), wall time;
- CPU:       per sandbox, the client's and the template's CPU time during "up", and each agent's
             CPU over its whole life (setup, the execs, exit; counted when the template reaps it);
             of that, the agent's own CPU once it is up (start and one exec, from
             /proc/PID/schedstat, a mean over N), the rest being its exit (the kernel's teardown of its
             memory and namespaces) and the processes it ran; and its minor page faults once up
             (most are copy-on-write copies of pages it shares with the template);
- leftovers: ``sandpool.testing.wait_for_no_leftovers`` on the state dir after that process exits;
- load:      the machine's idle share during "up" and "down" (/proc/stat), and "up if CPU-bound":
             N x (client + template + agent CPU per sandbox) / cpus, the wall time "up" would take
             on an otherwise idle machine were it only CPU-bound (an upper bound: the agent's CPU
             is over its whole life). On a shared machine a slow "up" with 0 % idle is other load.

Targets (issue 15, item 6): N=1000 up in <= 5 s, an exec in each in <= 2 s, all stopped in <= 3 s,
<= 3 MiB private memory per sandbox, and the per-sandbox start cost (up / N) at N=1000 within 1.5x
of N=100 (the floor, from the same run). Prints a Markdown table; JSON goes to
``benchmarks/results/bench_scale.json`` unless ``--json`` says otherwise (``-`` is stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from sandpool import SandboxDefaults, Session
from sandpool.testing import kill_leftovers, wait_for_no_leftovers

MIB = 1 << 20
TEMPLATE_MARK = "_sandpool_agent.template"
TARGETS = {"up_s": 5.0, "exec_s": 2.0, "down_s": 3.0, "uss_max_mib": 3.0, "per_start_ratio": 1.5}


def uss_pss(pid: int) -> tuple[int, int] | None:
    """``pid``'s private memory (USS) and its share of all it maps (PSS: each page divided by the
    number of processes mapping it), in bytes."""
    import psutil

    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return None
    return info.uss, info.pss


def private_by_mapping(pid: int) -> dict[str, int]:
    """KiB of ``pid``'s private memory (Private_Clean + Private_Dirty) by kind of mapping: the
    Python heap's arenas (anonymous), the C heap, libpython's data, the rest."""
    kinds: dict[str, int] = {}
    kind = "other"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                field = line.split()
                if not field[0].endswith(":"):  # a mapping's header: address, perms, offset, dev, inode, path
                    path = field[5] if len(field) > 5 else ""
                    kind = ("anon" if not path else "heap" if path == "[heap]"
                            else "libpython" if "libpython" in path else "other")
                elif field[0] in ("Private_Clean:", "Private_Dirty:"):
                    kinds[kind] = kinds.get(kind, 0) + int(field[1])
    except OSError:
        pass
    return kinds


def largest(pids: list[int], usses: list[int], count: int = 5) -> list[dict]:
    """The ``count`` agents with the most private memory: MiB, KiB by kind of mapping, and where
    each stands in the order the agents were forked (pid order, 0 = first; spares come out of order)."""
    order = {pid: rank for rank, pid in enumerate(sorted(pids))}
    top = sorted(zip(usses, pids), reverse=True)[:count]
    return [{"uss_mib": u / MIB, "fork_rank": order[pid], "private_kib": private_by_mapping(pid)} for u, pid in top]


def tree_uss(pid: int) -> int | None:
    """Private memory of ``pid`` and all its descendants (an agent and any helper process it keeps)."""
    import psutil

    try:
        top = psutil.Process(pid)
        return sum(p.memory_full_info().uss for p in [top, *top.children(recursive=True)])
    except psutil.Error:
        return None


def cpu_seconds(client, template) -> tuple[float, float, float]:
    """CPU time so far of the client, the template, and the template's reaped children (agents)."""
    a, b = client.cpu_times(), template.cpu_times()
    return a.user + a.system, b.user + b.system, b.children_user + b.children_system


def machine_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine so far (/proc/stat), all cpus."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def idle_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else 0.0


def agents_once_up(pids: list[int]) -> dict:
    """Mean CPU (ms, the agent's own) and minor page faults of each agent, read once it is up."""
    cpu, faults = [], []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/schedstat") as f:  # (stat's utime and stime are clock ticks: 0 here)
                runtime_ns = int(f.read().split()[0])
        except OSError:
            continue
        faults.append(int(fields[7]))  # minflt (field 10)
        cpu.append(runtime_ns / 1e6)
    if not cpu:
        return {"agent_up_cpu_ms_each": None, "agent_up_minflt_each": None}
    return {"agent_up_cpu_ms_each": statistics.mean(cpu), "agent_up_minflt_each": statistics.mean(faults)}


def wait_all(refs: list) -> None:
    for ref in refs:
        ref.result()


def one_scale(n: int, isolation: str) -> dict:
    """In this process (its shared runtime's state dir is $SANDPOOL_STATE_DIR): the figures for N."""
    import psutil

    row: dict = {"n": n}
    with Session(defaults=SandboxDefaults(tags=("bench-scale",), isolation=isolation)) as session:
        warm = session.sandbox()  # the runtime and its template up before the clock starts
        warm.exec(["true"]).result()
        warm.stop(graceful_shutdown_seconds=0).result()
        client = psutil.Process()
        template = next(p for p in client.children() if TEMPLATE_MARK in " ".join(p.cmdline()))
        pool = [session.sandbox() for _ in range(n)]
        cpu0 = cpu_seconds(client, template)
        ticks = machine_ticks()
        began = time.perf_counter()
        wait_all([sandbox.start() for sandbox in pool])
        row["running_s"] = time.perf_counter() - began
        wait_all([sandbox.exec(["true"]) for sandbox in pool])
        row["up_s"] = time.perf_counter() - began
        row["up_machine_idle_pct"] = idle_pct(ticks, machine_ticks())
        cpu1 = cpu_seconds(client, template)
        row["up_client_cpu_ms_each"] = (cpu1[0] - cpu0[0]) / n * 1000
        row["up_template_cpu_ms_each"] = (cpu1[1] - cpu0[1]) / n * 1000
        row["per_start_ms"] = row["up_s"] / n * 1000
        row.update(agents_once_up([sandbox._record.agent_pid for sandbox in pool]))

        began = time.perf_counter()
        codes = [ref.result().returncode for ref in [sandbox.exec(["true"]) for sandbox in pool]]
        row["exec_s"] = time.perf_counter() - began
        if any(codes):
            raise RuntimeError(f"{sum(1 for c in codes if c)} of {n} execs of true failed")

        pids = [sandbox._record.agent_pid for sandbox in pool]
        both = [m for m in (uss_pss(pid) for pid in pids) if m is not None]
        if len(both) != n:
            raise RuntimeError(f"found {len(both)} agent processes for {n} running sandboxes")
        usses = [u for u, _pss in both]
        row["uss_median_mib"] = statistics.median(usses) / MIB
        row["pss_median_mib"] = statistics.median(pss for _uss, pss in both) / MIB
        row["uss_max_mib"] = max(usses) / MIB
        row["uss_over_3_mib"] = sum(1 for u in usses if u > 3 * MIB)
        row["largest"] = largest(pids, usses)
        trees = [u for u in (tree_uss(sandbox._record.agent_pid) for sandbox in pool) if u is not None]
        row["sandbox_uss_median_mib"] = statistics.median(trees) / MIB  # (measured while nothing runs in it)

        ticks = machine_ticks()
        began = time.perf_counter()
        wait_all([sandbox.stop(graceful_shutdown_seconds=0) for sandbox in pool])
        row["down_s"] = time.perf_counter() - began
        row["down_machine_idle_pct"] = idle_pct(ticks, machine_ticks())
        cpu2 = cpu_seconds(client, template)  # (the agents' CPU reaches the template's children at reaping)
        row["agent_cpu_ms_each"] = (cpu2[2] - cpu1[2]) / n * 1000
        # what "up" would take on an otherwise idle machine if it were only CPU-bound (agent CPU over
        # its whole life, so an upper bound): shows how much of a slow "up" is other load
        row["up_cpu_bound_s"] = n * (row["up_client_cpu_ms_each"] + row["up_template_cpu_ms_each"]
                                     + row["agent_cpu_ms_each"]) / 1000 / (os.cpu_count() or 1)
    return row


def run_scale(n: int, isolation: str) -> dict:
    """One N in a fresh process with a state dir of its own; then what is left of it (nothing, we hope)."""
    state_dir = tempfile.mkdtemp(prefix="sandpool-scale-")
    env = {**os.environ, "SANDPOOL_STATE_DIR": state_dir}
    done = subprocess.run([sys.executable, __file__, "--one", str(n), "--isolation", isolation], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"N={n} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    report = wait_for_no_leftovers(state_dir, timeout=10.0)
    row["leftovers"] = str(report).replace(state_dir, "$SANDPOOL_STATE_DIR") if report else ""
    if report:
        kill_leftovers(report)
    shutil.rmtree(state_dir, ignore_errors=True)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="100,500,1000", help="comma-separated numbers of sandboxes")
    parser.add_argument("--isolation", default="namespaces", help="the level (namespaces: the default as root)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # (internal: one N, JSON row on stdout)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_scale.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_scale(args.one, args.isolation)))
        return
    counts = [int(x) for x in args.n.split(",") if x]
    rows = []
    for n in counts:
        row = run_scale(n, args.isolation)
        rows.append(row)
        print(f"# N={n}: {json.dumps(row)}", file=sys.stderr)
    floor = next((r for r in rows if r["n"] == min(counts)), None)
    for row in rows:
        row["per_start_vs_smallest_n"] = row["per_start_ms"] / floor["per_start_ms"] if floor else None

    print(f"| N | up (start + 1 exec each) s | all running s | per sandbox ms | x per sandbox at N={floor['n']} | exec in each s "
          "| stop all s | USS median MiB | USS max MiB | sandbox USS median MiB | CPU ms each: client / template / agent "
          "| agent once up: CPU ms / minor faults | up if CPU-bound s | machine idle % up / stop | leftovers |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['up_s']:.2f} | {r['running_s']:.2f} | {r['per_start_ms']:.2f} | {r['per_start_vs_smallest_n']:.2f}x "
              f"| {r['exec_s']:.2f} | {r['down_s']:.2f} | {r['uss_median_mib']:.2f} | {r['uss_max_mib']:.2f} "
              f"| {r['sandbox_uss_median_mib']:.2f} "
              f"| {r['up_client_cpu_ms_each']:.1f} / {r['up_template_cpu_ms_each']:.1f} / {r['agent_cpu_ms_each']:.1f} "
              f"| {_fmt(r['agent_up_cpu_ms_each'], '.1f')} / {_fmt(r['agent_up_minflt_each'], '.0f')} "
              f"| {r['up_cpu_bound_s']:.2f} | {r['up_machine_idle_pct']:.0f} / {r['down_machine_idle_pct']:.0f} "
              f"| {r['leftovers'] or 'none'} |")
    for r in rows:
        print(f"N={r['n']}: agent PSS median {r['pss_median_mib']:.2f} MiB; {r['uss_over_3_mib']} agents over 3 MiB; the largest (MiB, fork rank, private KiB by "
              "mapping): " + "; ".join(f"{a['uss_mib']:.2f} #{a['fork_rank']} {a['private_kib']}" for a in r["largest"]))
    print(f"\ntargets at N=1000: up <= {TARGETS['up_s']} s, exec <= {TARGETS['exec_s']} s, stop <= "
          f"{TARGETS['down_s']} s, USS <= {TARGETS['uss_max_mib']} MiB, per sandbox <= "
          f"{TARGETS['per_start_ratio']}x N=100. load average now: {os.getloadavg()[0]:.1f}")
    out = {"isolation": args.isolation,
           "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg": os.getloadavg()},
           "targets": TARGETS, "rows": rows}
    text = json.dumps(out, indent=2)
    if args.json == "-":
        print(text)
    else:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
