"""Start latency of a namespaces sandbox with each network mode, beside ``none`` in the same run.

    python benchmarks/bench_network.py [--n 30] [--runs 3] [--json PATH]     (as root)

Modes, taken round-robin within each run so that load from elsewhere falls on all alike:

- ``none``: a network namespace with ``lo`` only (the default; spares make it ahead of time);
- ``host``: the host's network stack;
- ``bridge``: a namespace made by the client with a veth pair, a /30 of sandpool's range, NAT and
  three nft chains (no spare can make it ahead of time);
- ``bridge + rules``: the same with an egress CIDR rule with ports and an exposed ingress port.

Each sample is ``start()`` until RUNNING plus a first ``exec(["true"])``; the stop is not timed.
Prints p50 per mode and its ratio to ``none`` for each run; JSON goes to
``benchmarks/results/bench_network.json`` unless ``--json`` says otherwise (``-`` is stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from _measure import latency
from sandpool import Session

MODES = {
    "none": {"network": "none"},
    "host": {"network": "host"},
    "bridge": {"network": "bridge"},
    "bridge + rules": {"network": {"egress": [{"cidr": "192.0.2.0/24", "ports": [{"port": 443}]}],
                                   "ingress": [{"any": True, "ports": [{"port": 8000}]}]}},
}


def one_start(session: Session, options: dict) -> float:
    sandbox = session.sandbox(**options)
    began = time.perf_counter()
    sandbox.start().result()
    sandbox.exec(["true"]).result()
    elapsed = time.perf_counter() - began
    sandbox.stop(graceful_shutdown_seconds=0).result()
    return elapsed


def one_run(n: int) -> dict:
    samples: dict = {name: [] for name in MODES}
    with Session(defaults={"isolation": "namespaces"}) as session:
        for i in range(n + 3):  # 3 warm-up rounds (spares appear, nft's table is made)
            for name, options in MODES.items():
                value = one_start(session, options)
                if i >= 3:
                    samples[name].append(value)
    out = {name: latency(values) for name, values in samples.items()}
    for name in MODES:
        out[name]["ratio_to_none"] = out[name]["p50_ms"] / out["none"]["p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_network.json"))
    args = parser.parse_args()
    runs = [one_run(args.n) for _ in range(args.runs)]
    print("| mode | " + " | ".join(f"run {i + 1} p50 (x none)" for i in range(len(runs))) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for name in MODES:
        cells = [f"{run[name]['p50_ms']:.2f} ms ({run[name]['ratio_to_none']:.2f}x)" for run in runs]
        print(f"| {name} | " + " | ".join(cells) + " |")
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg(),
              "n": args.n, "runs": runs}
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
