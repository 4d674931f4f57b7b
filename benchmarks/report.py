"""sandpool beside its peers and floors, every figure from one run: a Markdown report with charts.

    python benchmarks/report.py [--quick] [--out DIR] [--scale-1000] [--calls N] ...

Runs the benchmark suites of this folder and writes ``DIR/REPORT.md`` (default
``benchmarks/report/``), a PNG per figure (matplotlib) and the raw data as JSON (``report.json``,
and ``NAME.json`` beside each ``NAME.png``). Each figure sets sandpool's series beside its peers
or its floor measured in the same run, so a busy machine shows in both:

- call_latency:  p50/p90/p99 round trip of a trivial remote call (sync and trio) beside
                 multiprocessing.Pool, ProcessPoolExecutor, loky, trio-parallel and Ray (when
                 installed; not in --quick) on 2 warm workers (bench_functions.py);
- exec_latency:  p50/p90/p99 of ``exec(["true"])`` in a running sandbox beside ``subprocess.run``;
  start_latency: start to RUNNING beside ``python -S -c pass`` (bench_core.py);
- throughput:    trivial calls/s through map vs pool size (1, 2, 4, 8) beside the same peers;
- scale:         N sandboxes up (start + one exec each), an exec in each, all stopped, and private
                 memory per sandbox, vs N (10..200; ``--scale-1000`` adds 500 and 1,000) beside N
                 bare interpreters started at once and the idle memory of an interpreter and of the
                 peers' workers (bench_scale.py);
- remote:        exec and call round trips and calls/s through ``sandpool serve`` on this host (the
                 fast data plane, the gRPC plane and the cwsandbox client) beside a local Session
                 (bench_service.py);
- map_curve:     the rate per window and the client's RSS over a million-call ``f.map`` (and
                 ``f.imap``, by default and with map's bound in flight) beside
                 ``multiprocessing.Pool.imap`` (bench_map_curve.py).

``--quick`` (under 3 minutes on 2 cpus) takes smaller counts: a smoke run, not figures to quote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import cloudpickle  # noqa: E402

import _plots  # noqa: E402
import bench_core  # noqa: E402
import bench_functions  # noqa: E402
import bench_map_curve  # noqa: E402
import bench_scale  # noqa: E402
import bench_service  # noqa: E402
import sandpool  # noqa: E402
from _measure import latency  # noqa: E402
from sandpool import SandboxDefaults, Session  # noqa: E402

SECTIONS = ("calls", "exec", "scale", "remote", "map_curve")
#: (sandpool's series, the peer its ratio is quoted against): sync calls against the sync pools,
#: calls awaited in trio against trio-parallel
PAIRS = (("sandpool", "ppe"), ("sandpool", "mp_pool"), ("sandpool", "ray"), ("sandpool_async", "trio_parallel"))
PCT = ("p50", "p90", "p99")


def _pcts(summary: dict, scale: float = 1.0) -> dict:
    """{'p50': .., 'p90': .., 'p99': ..} of a _measure.latency summary (ms), times ``scale``."""
    return {q: summary[f"{q}_ms"] * scale for q in PCT}


def figure(title: str, kind: str, unit: str, sandpool_series: dict, beside: dict, ratios: dict, **raw) -> dict:
    """One figure's record: sandpool's series, its peers' or floor's (``kind``) from the same run,
    the ratios quoted in the report, and whatever raw data it was drawn from."""
    return {"title": title, "beside_kind": kind, "unit": unit, "sandpool": sandpool_series, "beside": beside,
            "ratios": ratios, "raw": raw}


# ---------------------------------------------------------------- the suites
def calls(args) -> dict:
    """call_latency and throughput, from one run of bench_functions' peers."""
    sizes = dataclasses.replace(bench_functions.QUICK if args.quick else bench_functions.Sizes(), conc=args.conc)
    medians, raw, errors = bench_functions.run_peers(args.peers, args.reps, sizes)
    label = bench_functions.LABELS
    ours = [p for p in ("sandpool", "sandpool_async") if p in medians]
    theirs = [p for p in medians if p not in ours]
    lat = {p: {q: medians[p][f"rtt_{q}_us"] for q in PCT} for p in medians}
    tps = {p: {str(c): medians[p][f"tps_c{c}"] for c in args.conc if f"tps_c{c}" in medians[p]} for p in medians}
    split: dict = {" p50": {}, "calls/s": {}}
    for ours_p, peer in PAIRS:  # the peer each is quoted against (every peer is in the table)
        if ours_p in medians and peer in medians:
            split[" p50"][f"{label[ours_p]} / {label[peer]} p50"] = lat[ours_p]["p50"] / lat[peer]["p50"]
            for c in args.conc:
                if str(c) in tps[ours_p] and str(c) in tps[peer]:
                    split["calls/s"][f"{label[ours_p]} / {label[peer]} calls/s at {c}"] = \
                        tps[ours_p][str(c)] / tps[peer][str(c)]
    common = {"medians": medians, "repetitions": raw, "skipped": errors, "sizes": dataclasses.asdict(sizes)}
    return {
        "call_latency": figure("Round trip of a trivial remote call (2 warm workers)", "peer", "us",
                               {label[p]: lat[p] for p in ours}, {label[p]: lat[p] for p in theirs},
                               split[" p50"], **common),
        "throughput": figure("Trivial calls/s through map vs pool size", "peer", "calls/s",
                             {label[p]: tps[p] for p in ours}, {label[p]: tps[p] for p in theirs},
                             split["calls/s"]),
        "_idle_uss": {label[p]: medians[p]["uss_mb"] * 1e6 / bench_scale.MIB for p in theirs if "uss_mb" in medians[p]},
    }


def execs(args, rounds: int = 5) -> dict:
    """exec_latency and start_latency: bench_core's sync and trio measures beside its floors, taken
    a fifth at a time in turn (so load that comes and goes weighs on sandpool and floor alike)."""
    import trio

    n_exec = args.exec_n // rounds  # and fewer of the rest: a start costs about 10 execs, a floor sample 1
    n_true, n_start, n_py = min(60, n_exec), max(1, n_exec // 5), max(1, n_exec // 25)
    raw: dict = {k: [] for k in ("floor_true", "floor_py", "sync_exec", "sync_start", "exec", "start")}
    with Session(defaults=SandboxDefaults(tags=("bench",))) as session:
        session.sandbox().wait().stop(graceful_shutdown_seconds=0).result()  # the runtime up before timing
        for _ in range(rounds):
            raw["floor_true"] += bench_core.floor_true(n_true)
            raw["floor_py"] += bench_core.floor_python_start(n_py)
            raw["sync_exec"] += bench_core.sync_exec(session, n_exec)
            raw["sync_start"] += bench_core.sync_start(session, n_start)
            for key, samples in trio.run(bench_core.trio_figures, n_start, n_exec).items():
                raw[key] += samples
    floor_true, floor_py, sync_exec, sync_start = (latency(raw[k]) for k in ("floor_true", "floor_py", "sync_exec",
                                                                             "sync_start"))
    asyn = {k: latency(raw[k]) for k in ("exec", "start")}
    exec_ours = {"exec (sync)": _pcts(sync_exec), "exec (trio)": _pcts(asyn["exec"])}
    start_ours = {"start (sync)": _pcts(sync_start), "start (trio)": _pcts(asyn["start"])}
    return {
        "exec_latency": figure("exec(['true']) in a running sandbox", "floor", "ms", exec_ours,
                               {"subprocess.run(['true'])": _pcts(floor_true)},
                               {f"{k} / subprocess.run p50": v["p50"] / floor_true["p50_ms"]
                                for k, v in exec_ours.items()},
                               floor=floor_true, sync=sync_exec, trio=asyn["exec"]),
        "start_latency": figure("A sandbox from start() to RUNNING", "floor", "ms", start_ours,
                                {"python -S -c pass": _pcts(floor_py)},
                                {f"{k} / python -S -c pass p50": v["p50"] / floor_py["p50_ms"]
                                 for k, v in start_ours.items()},
                                floor=floor_py, sync=sync_start, trio=asyn["start"]),
    }


def scale(args, peer_uss: dict) -> dict:
    """bench_scale's rows for each N, beside N interpreters started at once and idle memories."""
    rows = [bench_scale.run_scale(n, args.isolation) for n in args.scale_n]
    floor = {str(n): bench_core.floor_100_interpreters(n) for n in args.scale_n}
    idle = bench_core.floor_idle_interpreter()
    uss = {"idle python -S": idle / bench_scale.MIB} if idle else {}
    uss.update({f"idle {name} worker": mib for name, mib in peer_uss.items()})
    small, big = rows[0], rows[-1]
    ratios = {f"per-sandbox start at N={big['n']} / N={small['n']}": big["per_start_ms"] / small["per_start_ms"]}
    for r in rows:
        ratios[f"N={r['n']} up / N x python -S at once"] = r["up_s"] / floor[str(r["n"])]
    if idle:
        ratios[f"USS median at N={big['n']} / idle python -S"] = big["uss_median_mib"] * bench_scale.MIB / idle
    return {"scale": figure(f"N sandboxes at the {args.isolation} level", "floor", "s, MiB", {"rows": rows},
                            {"N x python -S -c pass at once (s)": floor, "idle worker USS (MiB)": uss}, ratios,
                            leftovers=[r["leftovers"] for r in rows])}


def remote(args) -> dict:
    """bench_service's clients: through the server (fast plane, gRPC plane, cwsandbox) beside local."""
    cloudpickle.register_pickle_by_value(bench_service)  # its function is imported here, not __main__
    figures = bench_service.run(args.service_n, rounds=5 if args.quick else 10)

    def series(f: dict) -> dict:
        out = {"exec p50": f["exec_rtt"]["p50_ms"], "exec p99": f["exec_rtt"]["p99_ms"]}
        if "call_rtt" in f:
            out.update({"call p50": f["call_rtt"]["p50_ms"], "call p99": f["call_rtt"]["p99_ms"],
                        "calls/s": f["calls_per_s"], "read_file ops/s": f["file_ops_per_s"]})
        return out

    names = {"remote": "serve, same host (fast plane)", "grpc": "serve, gRPC plane", "cwsandbox": "cwsandbox client"}
    ours = {names[k]: series(figures[k]) for k in names if k in figures}
    local = series(figures["local"])
    ratios = {}
    for name, s in ours.items():
        for key in ("exec p50", "call p50", "calls/s"):
            if key in s:
                ratios[f"{name} / local {key}"] = s[key] / local[key]
    return {"remote": figure("Through `sandpool serve` on this host vs a local Session", "floor", "ms, 1/s", ours,
                             {"local Session": local}, ratios, figures=figures)}


def map_curve(args) -> dict:
    curves = bench_map_curve.run_curves(args.calls, args.window)
    ours = {bench_map_curve.LABELS[a]: c for a, c in curves.items() if a != "mp_imap"}
    peer = {bench_map_curve.LABELS["mp_imap"]: curves["mp_imap"]}
    ratios = {}
    for name, c in ours.items():
        ratios[f"{name} / mp.Pool.imap calls/s"] = c["rate"] / curves["mp_imap"]["rate"]
        ratios[f"{name}: slowest window / median"] = c["rate_min_vs_median"]
        ratios[f"{name}: client RSS growth, bytes per call"] = c["rss_growth_bytes_per_call"]
    ratios["mp.Pool.imap: slowest window / median"] = curves["mp_imap"]["rate_min_vs_median"]
    return {"map_curve": figure(f"{args.calls:,} trivial calls through one map, on 2 workers", "peer", "calls/s, MB",
                                ours, peer, ratios)}


# ---------------------------------------------------------------- charts and Markdown
def draw(name: str, fig: dict, out: str) -> str:
    path = os.path.join(out, f"{name}.png")
    if name == "call_latency":
        _plots.percentiles(fig, path, fig["title"], "microseconds (log)")
    elif name in ("exec_latency", "start_latency"):
        _plots.percentiles(fig, path, fig["title"], "milliseconds (log)")
    elif name == "throughput":
        _plots.lines_by_x(fig, path, fig["title"], "workers (sandboxes) in the pool", "calls/s")
    elif name == "scale":
        _plots.scale(fig, path)
    elif name == "remote":
        _plots.remote_vs_local(fig, path)
    else:
        _plots.map_curve({c["api"]: c for c in {**fig["sandpool"], **fig["beside"]}.values()}, path,
                         bench_map_curve.LABELS)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(fig, f, indent=1)
    return os.path.basename(path)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def markdown_table(fig: dict, name: str) -> list[str]:
    """A table of every series (sandpool's first) by column, or of the scale rows."""
    if name == "scale":
        floor = fig["beside"]["N x python -S -c pass at once (s)"]
        lines = ["| N | up (start + exec) s | N x `python -S -c pass` s | per sandbox ms | exec in each s "
                 "| stop all s | USS median MiB | USS max MiB | leftovers |", "|---:" * 8 + "|---|"]
        for r in fig["sandpool"]["rows"]:
            lines.append(f"| {r['n']} | {r['up_s']:.2f} | {floor[str(r['n'])]:.2f} | {r['per_start_ms']:.2f} "
                         f"| {r['exec_s']:.2f} | {r['down_s']:.2f} | {r['uss_median_mib']:.2f} "
                         f"| {r['uss_max_mib']:.2f} "
                         f"| {r['leftovers'] or 'none'} |")
        idle = ", ".join(f"{k} {v:.1f} MiB" for k, v in fig["beside"]["idle worker USS (MiB)"].items())
        return lines + ["", f"Private memory (USS) beside: {idle}."]
    if name == "map_curve":
        curves = {c["api"]: c for c in {**fig["sandpool"], **fig["beside"]}.values()}
        return bench_map_curve.table(curves).splitlines()
    series = {**fig["sandpool"], **fig["beside"]}
    columns = list(dict.fromkeys(k for s in series.values() for k in s))
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, values in series.items():
        bold = "**" if label in fig["sandpool"] else ""
        cells = [_cell(values[c]) if c in values else "-" for c in columns]
        lines.append(f"| {bold}{label}{bold} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(record: dict, out: str) -> str:
    m = record["machine"]
    quick = " (--quick: a smoke run, not figures to quote)" if record["quick"] else ""
    lines = ["# sandpool beside its peers: one run", "",
             f"Python {m['python']}, {m['cpus']} cpus, kernel {m['kernel']}; load average {m['loadavg_start']:.1f} "
             f"before, {m['loadavg_end']:.1f} after; {record['wall_s']:.0f} s; "
             f"`{' '.join(record['argv'])}`{quick}.",
             "", "Every figure sets sandpool (bold rows, blue in the charts) beside its peers or its floor, "
             "measured in the same run on the same machine: read the ratios, not the absolute times. "
             "Raw data: `report.json`, and `NAME.json` beside each chart.", ""]
    if record.get("notes"):
        lines += [f"- {note}" for note in record["notes"]] + [""]
    for name, fig in record["figures"].items():
        lines += [f"## {fig['title']}", "", f"![{name}]({fig['png']})", "",
                  f"Unit: {fig['unit']}; beside: its {fig['beside_kind']}s ({', '.join(fig['beside'])}).", ""]
        lines += markdown_table(fig, name) + [""]
        if fig["ratios"]:
            lines += ["| ratio (same run) | value |", "|---|---:|"]
            lines += [f"| {k} | {v:.2f} |" if abs(v) < 100 else f"| {k} | {v:,.0f} |" for k, v in fig["ratios"].items()]
            lines.append("")
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ---------------------------------------------------------------- main
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts, under 3 minutes: a smoke run")
    p.add_argument("--out", default=os.path.join(HERE, "report"), help="the folder of REPORT.md, its PNGs and JSON")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    p.add_argument("--peers", help="bench_functions peers (default: all, and ray if installed, not with --quick)")
    p.add_argument("--reps", type=int, help="repetitions of the peers' measures (default 3, 1 with --quick)")
    p.add_argument("--conc", type=_ints, help="pool sizes of the throughput figure (default 1,2,4,8)")
    p.add_argument("--scale-n", type=_ints, help="numbers of sandboxes (default 10,50,100,200; quick 10,50,100)")
    p.add_argument("--scale-1000", action="store_true", help="add N=500 and N=1000 to the scale figure")
    p.add_argument("--isolation", default="namespaces", help="the scale figure's isolation level")
    p.add_argument("--exec-n", type=int, help="execs timed in a sandbox (default 1000; quick 200); "
                   "starts: a fifth of that")
    p.add_argument("--service-n", type=int, help="samples per latency through the server (default 200; quick 30)")
    p.add_argument("--calls", type=int, help="calls in the map curve (default 1,000,000; quick 100,000)")
    p.add_argument("--window", type=int, help="calls per window of the map curve (default 50,000; quick 10,000)")
    args = p.parse_args(argv)
    q = args.quick
    for flag in ("reps", "exec_n", "service_n", "calls", "window"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.only = [s for s in args.only.split(",") if s]
    if bad := [s for s in args.only if s not in SECTIONS]:
        p.error(f"--only: unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    if args.peers is None:
        args.peers = ",".join(bench_functions.PEERS + ([] if q or not _has("ray") else ["ray"]))
    args.peers = [x for x in args.peers.split(",") if x]
    if bad := [x for x in args.peers if x not in bench_functions.LABELS]:
        p.error(f"--peers: unknown peer(s) {bad}; choose from {','.join(bench_functions.LABELS)}")
    args.reps = args.reps or (1 if q else 3)
    args.conc = args.conc or ((1, 2, 4) if q else (1, 2, 4, 8))
    args.scale_n = args.scale_n or ((10, 50, 100) if q else (10, 50, 100, 200))
    if args.scale_1000:
        args.scale_n = tuple(sorted(set(args.scale_n) | {500, 1000}))
    args.exec_n = args.exec_n or (200 if q else 1000)
    args.service_n = args.service_n or (30 if q else 200)
    args.calls = args.calls or (100_000 if q else 1_000_000)
    args.window = args.window or min(args.calls, 10_000 if q else 50_000)
    return args


def _shown(argv: list[str]) -> list[str]:
    """The arguments as the report shows them: the output folder relative to this one (or DIR),
    so that no path of the machine it ran on ends up in the report."""
    def folder(path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), HERE)
        return "DIR" if rel.startswith("..") else rel

    shown: list[str] = []
    for arg in argv:
        if shown and shown[-1] == "--out":
            arg = folder(arg)
        elif arg.startswith("--out="):
            arg = "--out=" + folder(arg.split("=", 1)[1])
        shown.append(arg)
    return shown


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    began, load = time.perf_counter(), os.getloadavg()[0]
    notes = []
    if "ray" not in args.peers:
        notes.append("Ray: " + ("installed, left out of this run (--peers)" if _has("ray") else
                                "not installed here (`pip install ray` adds it to the next run)") + ".")
    figures: dict = {}
    peer_uss: dict = {}  # the peers' idle worker memory, drawn beside the scale figure's
    run = {"calls": calls, "exec": execs, "scale": lambda a: scale(a, peer_uss), "remote": remote,
           "map_curve": map_curve}
    section_s = {}
    for section in args.only:
        print(f"report: {section} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        got = run[section](args)
        section_s[section] = round(time.perf_counter() - t, 1)
        peer_uss.update(got.pop("_idle_uss", {}))
        figures.update(got)
    for name, fig in figures.items():
        fig["png"] = draw(name, fig, args.out)
    record = {"bench": "report", "sandpool": sandpool.__version__, "quick": args.quick,
              "argv": ["report.py"] + _shown(sys.argv[1:] if argv is None else argv), "notes": notes,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release(),
                          "loadavg_start": load, "loadavg_end": os.getloadavg()[0]},
              "wall_s": time.perf_counter() - began, "section_s": section_s, "figures": figures}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"report: {write_markdown(record, args.out)} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
