"""sandpool through ``sandpool serve`` beside the same operations locally, in one run.

    python benchmarks/bench_service.py [--quick] [--json PATH]

Starts a real server subprocess on a loopback port, then measures each operation twice, with a
local Session and with ``Session(address=...)``, in the same process and run:

- exec round trip:  ``sb.exec(["true"]).result()`` one after another in a running sandbox (p50/p99).
- call round trip:  ``f.remote(i).result()`` of a trivial remote function, one after another.
- call throughput:  ``f.map`` of N trivial calls (pipelined over the pool's sandboxes), calls/s.
                    Target: remote >= 50% of local (frames are batched on the gRPC stream).
- file op throughput: N concurrent ``read_file`` of a tiny file in one sandbox (trivial agent
                    round trips, pipelined on one data-plane stream), ops/s.

Latencies are p50/p99 (nearest rank). Prints a Markdown table with remote/local ratios and writes
every figure as JSON (default ``benchmarks/results/bench_service.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time

import sandpool
from _measure import latency, map_calls_per_s, timed
from sandpool import Session


def start_server(workdir: str) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "sandpool", "serve", "--listen", "127.0.0.1:0",
            "--record-file", os.path.join(workdir, "record.jsonl")]
    env = {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if "listening on" not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].split()[0]


def trivial(x):
    return x


def measure(session: Session, n: int) -> dict:
    results: dict = {}
    sb = session.sandbox()
    sb.wait()
    results["exec_rtt"] = latency(timed(n, lambda: sb.exec(["true"]).result()))

    sb.write_file("/tiny", b"x").result()
    began = time.perf_counter()
    refs = [sb.read_file("/tiny") for _ in range(n * 10)]
    sandpool.results(refs)
    results["file_ops_per_s"] = n * 10 / (time.perf_counter() - began)

    if hasattr(session, "function"):
        f = session.function(max_concurrency=2)(trivial)
        f.map([(i,) for i in range(200)])  # warm the pool: both sandboxes up, the function shipped
        sandpool.results(f.map([(i,) for i in range(200)]))
        results["call_rtt"] = latency(timed(n, lambda: f.remote(1).result()))
        results["calls_per_s"] = map_calls_per_s(f, n * 100)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_service.json"))
    args = parser.parse_args()
    n = 50 if args.quick else 200
    workdir = tempfile.mkdtemp(prefix="sandpool-bench-service-")
    server, address = start_server(workdir)
    try:
        with Session() as local:
            figures = {"local": measure(local, n)}
        with Session(address=address) as remote:
            figures["remote"] = measure(remote, n)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    rows = [("exec round trip p50 (ms)", "exec_rtt", "p50_ms"), ("exec round trip p99 (ms)", "exec_rtt", "p99_ms"),
            ("call round trip p50 (ms)", "call_rtt", "p50_ms"), ("call round trip p99 (ms)", "call_rtt", "p99_ms"),
            ("trivial calls/s (map, 2 sandboxes)", "calls_per_s", None),
            ("read_file ops/s (one sandbox, pipelined)", "file_ops_per_s", None)]
    print(f"\nsandpool service benchmark ({platform.node()}, {os.cpu_count()} cpus, n={n})\n")
    print("| measure | local | remote | remote/local |\n|---|---|---|---|")
    ratios = {}
    for label, key, sub in rows:
        if key not in figures["local"]:
            continue
        local, remote = figures["local"][key], figures["remote"][key]
        if sub:
            local, remote = local[sub], remote[sub]
        ratios[label] = remote / local
        print(f"| {label} | {local:.2f} | {remote:.2f} | {remote / local:.2f} |")
    figures["ratios"] = ratios
    figures["machine"] = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
