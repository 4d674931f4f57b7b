"""sandpool through ``sandpool serve`` beside the same operations locally, in one run.

    python benchmarks/bench_service.py [--quick] [--json PATH]

Starts a real server subprocess on a loopback port (also serving cwsandbox's API), then measures
each operation, round by round from each client in turn (so a change in the machine's load during
the run weighs on all alike), with a local Session, with ``Session(address=...)`` (a same-host client: the fast
data plane, see ``sandpool/_service/fastpath.py``) and with ``SANDPOOL_DATA_PLANE=grpc`` (the gRPC
data plane, what clients on other hosts get), in the same process and run:

- exec round trip:  ``sb.exec(["true"]).result()`` one after another in a running sandbox (p50/p99).
- call round trip:  ``f.remote(i).result()`` of a trivial remote function, one after another.
- call throughput:  ``f.map`` of N trivial calls (pipelined over the pool's sandboxes), calls/s.
                    Target: remote >= 50% of local (frames are batched on the gRPC stream).
- file op throughput: N concurrent ``read_file`` of a tiny file in one sandbox (trivial agent
                    round trips, pipelined on one data-plane stream), ops/s.

- cwsandbox exec round trip: ``sb.exec(["true"]).result()`` through the published cwsandbox
                    client (a subprocess) against the server's ``--cwsandbox`` listener; its ratio
                    is taken against the local sandpool exec of the same run (target <= 1.5x).

Targets: remote (fast plane) calls/s >= 0.5x local, remote exec p50 <= 1.3x local.
Latencies are p50/p99 (nearest rank). Prints a Markdown table with remote/local ratios and writes
every figure as JSON (default ``benchmarks/results/bench_service.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import sandpool
from _measure import latency, map_calls_per_s, timed
from sandpool import Session


def start_server(workdir: str) -> tuple[subprocess.Popen, str, dict]:
    """The server, its address, and the environment of a cwsandbox client of its --cwsandbox listener."""
    argv = [sys.executable, "-m", "sandpool", "serve", "--listen", "127.0.0.1:0", "--cwsandbox", "127.0.0.1:0",
            "--record-file", os.path.join(workdir, "record.jsonl")]
    env = {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}
    # the cwsandbox client names an image; with an empty image store it runs on the host's, as
    # the local sandboxes it is compared with do
    server_env = {**env, "SANDPOOL_IMAGE_FALLBACK": "host", "SANDPOOL_IMAGE_DIR": os.path.join(workdir, "images")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=server_env)
    lines = []
    for _ in range(2):
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        lines.append(proc.stdout.readline().decode() if ready else "")
    if "listening on" not in lines[0] or "cwsandbox API on" not in lines[1]:
        proc.kill()
        sys.exit(f"the server did not start: {lines!r}")
    address = lines[0].split("listening on ", 1)[1].split()[0]
    cw_address = lines[1].split("cwsandbox API on ", 1)[1].split(";")[0]
    token_file = lines[1].split("$(cat ", 1)[1].split(")")[0]
    with open(token_file) as f:
        key = f.read().strip()
    cw_env = {**env, "CWSANDBOX_BASE_URL": f"http://{cw_address}", "CWSANDBOX_API_KEY": key,
              "GRPC_VERBOSITY": "ERROR"}
    return proc, address, cw_env


CWSANDBOX_CLIENT = """
import json, sys, time
import cwsandbox
with cwsandbox.Session(defaults=cwsandbox.SandboxDefaults(container_image="python:3.11")) as session:
    sb = session.sandbox()
    for _ in range(5):
        sb.exec(["true"]).result()
    print("ready", flush=True)
    for line in sys.stdin:  # "k": time k more execs
        samples = []
        for _ in range(int(line)):
            began = time.perf_counter()
            sb.exec(["true"]).result()
            samples.append(time.perf_counter() - began)
        print(json.dumps(samples), flush=True)
"""


class CwsandboxClient:
    """The published cwsandbox client in a process of its own, timing execs when asked."""

    def __init__(self, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CWSANDBOX_CLIENT], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            sys.exit("the cwsandbox client did not start")

    def exec_samples(self, count: int) -> list[float]:
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)
        self.proc.stdout.close()


def trivial(x):
    return x


class Client:
    """One kind of client (local, remote, ...): a sandbox and a pooled function, warmed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.sb = session.sandbox()
        self.sb.wait()
        self.sb.write_file("/tiny", b"x").result()
        self.f = session.function(max_concurrency=2)(trivial)
        sandpool.results(self.f.map([(i,) for i in range(200)]))  # both sandboxes up, the function shipped

    def exec_samples(self, count: int) -> list[float]:
        return timed(count, lambda: self.sb.exec(["true"]).result(), warm=1)

    def call_samples(self, count: int) -> list[float]:
        return timed(count, lambda: self.f.remote(1).result(), warm=1)

    def file_ops_per_s(self, count: int) -> float:
        began = time.perf_counter()
        sandpool.results([self.sb.read_file("/tiny") for _ in range(count)])
        return count / (time.perf_counter() - began)

    def calls_per_s(self, count: int) -> float:
        return map_calls_per_s(self.f, count, reps=1)


def measure(clients: dict, n: int, rounds: int = 10) -> dict:
    """Every measure, taken round by round from each client in turn, so that a change in the
    machine's load during the run weighs on all of them alike."""
    samples: dict = {name: {"exec_rtt": [], "call_rtt": []} for name in clients}
    best: dict = {name: {"file_ops_per_s": 0.0, "calls_per_s": 0.0} for name in clients}
    for _ in range(rounds):
        for name, client in clients.items():
            samples[name]["exec_rtt"] += client.exec_samples(max(1, n // rounds))
            if isinstance(client, Client):
                samples[name]["call_rtt"] += client.call_samples(max(1, n // rounds))
    for _ in range(3):
        for name, client in clients.items():
            if isinstance(client, Client):
                best[name]["file_ops_per_s"] = max(best[name]["file_ops_per_s"], client.file_ops_per_s(n * 10))
                best[name]["calls_per_s"] = max(best[name]["calls_per_s"], client.calls_per_s(n * 100))
    figures = {}
    for name, client in clients.items():
        figures[name] = {key: latency(values) for key, values in samples[name].items() if values}
        if isinstance(client, Client):
            figures[name].update(best[name])
    return figures


def run(n: int, rounds: int = 10) -> dict:
    """A server subprocess, then every measure (``n`` samples of each latency, ``n * 100`` calls and
    ``n * 10`` file ops per throughput figure) from each client; the figures by client."""
    workdir = tempfile.mkdtemp(prefix="sandpool-bench-service-")
    server, address, cw_env = start_server(workdir)
    try:
        with contextlib.ExitStack() as stack:
            local, remote = stack.enter_context(Session()), stack.enter_context(Session(address=address))
            os.environ["SANDPOOL_DATA_PLANE"] = "grpc"  # read as it opens: what a client on another host gets
            try:
                over_grpc = stack.enter_context(Session(address=address))
            finally:
                del os.environ["SANDPOOL_DATA_PLANE"]
            clients: dict = {"local": Client(local), "remote": Client(remote), "grpc": Client(over_grpc)}
            try:
                import cwsandbox  # noqa: F401
                clients["cwsandbox"] = CwsandboxClient(cw_env)
            except ImportError:
                pass
            try:
                figures = measure(clients, n, rounds)
            finally:
                if "cwsandbox" in clients:
                    clients["cwsandbox"].close()
            figures["remote"]["data_plane"] = repr(remote._owned_runtime)
            figures["grpc"]["data_plane"] = repr(over_grpc._owned_runtime)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_service.json"))
    args = parser.parse_args()
    n = 50 if args.quick else 200
    figures = run(n)
    rows = [("exec round trip p50 (ms)", "exec_rtt", "p50_ms"), ("exec round trip p99 (ms)", "exec_rtt", "p99_ms"),
            ("call round trip p50 (ms)", "call_rtt", "p50_ms"), ("call round trip p99 (ms)", "call_rtt", "p99_ms"),
            ("trivial calls/s (map, 2 sandboxes)", "calls_per_s", None),
            ("read_file ops/s (one sandbox, pipelined)", "file_ops_per_s", None)]
    print(f"\nsandpool service benchmark ({platform.node()}, {os.cpu_count()} cpus, n={n})\n")
    print("| measure | local | remote (same host) | remote/local | gRPC (other hosts) | gRPC/local |\n"
          "|---|---|---|---|---|---|")
    ratios = {}
    for label, key, sub in rows:
        if key not in figures["local"]:
            continue
        local, remote, grpc_ = figures["local"][key], figures["remote"][key], figures["grpc"][key]
        if sub:
            local, remote, grpc_ = local[sub], remote[sub], grpc_[sub]
        ratios[label] = remote / local
        ratios[f"{label} gRPC"] = grpc_ / local
        print(f"| {label} | {local:.2f} | {remote:.2f} | {remote / local:.2f} | {grpc_:.2f} | {grpc_ / local:.2f} |")
    if "cwsandbox" in figures:
        print("\n| measure | sandpool local | cwsandbox client | cwsandbox/local |\n|---|---|---|---|")
        for sub in ("p50_ms", "p99_ms"):
            local, cw = figures["local"]["exec_rtt"][sub], figures["cwsandbox"]["exec_rtt"][sub]
            label = f"exec round trip {sub[:3]} (ms)"
            ratios[f"cwsandbox {label}"] = cw / local
            print(f"| {label} | {local:.2f} | {cw:.2f} | {cw / local:.2f} |")
    print(f"\nsame-host client: {figures['remote']['data_plane']}\ngRPC client: {figures['grpc']['data_plane']}")
    figures["ratios"] = ratios
    figures["machine"] = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
