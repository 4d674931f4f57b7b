"""The cwsandbox listener's exec round trip beside local exec and beside its floor, in one run.

    python benchmarks/bench_cwsandbox.py [--quick] [--json PATH]

``sb.exec(["true"]).result()`` one after another in one running sandbox, timed by the published
cwsandbox client (each client a process of its own) against:

- **floor**: a trivial gRPC server of cwsandbox's SandboxService (a sync ``grpc.server`` in a
  process of its own, like the listener) that answers every StreamExec at once with the same
  messages the listener sends for ``true`` (``ready``, ``exit``), with no sandbox behind it: what
  the published client and gRPC cost by themselves;
- **standalone**: ``python -m sandpool._cwsandbox`` (the listener over a local Session);
- **serve**: ``sandpool serve --cwsandbox`` (the listener beside sandpool's own API, over the
  same fleet);

and ``sb.exec(["true"]).result()`` through sandpool's own sync API in this process (**local**, the
same sandbox kind: the default isolation level). Rounds take a few execs from each in turn, so a
change in the machine's load weighs on all alike. Printed per listener at p50: listener/local
(the target: <= 1.5x), listener/floor, listener/(floor + local) (floor + local is what a listener
would take if it added nothing to the client and gRPC but the sandbox's own exec), the listener's
own share, (listener - floor) / listener, and the CPU time its serving process spends per exec
(the floor server's and this process's beside it). Also printed: floor/local, what the client and
gRPC alone cost against a whole local exec. The floor server counts what the client sends per exec
(RPCs, request messages) and what it answers, printed below the table.
Writes every figure as JSON (default ``benchmarks/results/bench_cwsandbox.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from _measure import latency, timed
from bench_service import CwsandboxClient  # the published client in a process of its own, timing execs

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the floor: a trivial SandboxService in a process of its own ----------------------------------

def serve_floor() -> None:
    """``--serve-floor``: answer cwsandbox's RPCs at once with canned messages; print the port, then
    serve until stdin closes; then print what was counted (JSON)."""
    import grpc
    from google.protobuf import message_factory

    from sandpool._cwsandbox._proto import SERVICE, SERVICE_DESCRIPTOR, pb

    running, terminated = pb.State.Value("STATE_RUNNING"), pb.State.Value("STATE_TERMINATED")
    stopped: set[str] = set()
    counts = {"rpcs": {}, "exec_requests": 0, "exec_responses": 0}
    lock = threading.Lock()

    def sandbox(sandbox_id: str) -> object:
        state = terminated if sandbox_id in stopped else running
        status = pb.SandboxStatus(state=state, exit_code=0 if state == terminated else None)
        return pb.Sandbox(sandbox_id=sandbox_id, status=status)

    def count(name: str) -> None:
        with lock:
            counts["rpcs"][name] = counts["rpcs"].get(name, 0) + 1

    def unary(name: str):
        def answer(request, context):
            count(name)
            if name == "CreateSandbox":
                return sandbox("floor-1")
            if name == "GetSandbox":
                return sandbox(request.sandbox_id)
            if name == "DeleteSandbox":
                stopped.add(request.sandbox_id)
                return pb.DeleteSandboxResponse(sandbox=sandbox(request.sandbox_id))
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not part of the floor")
        return answer

    def stream_exec(requests, context):
        count("StreamExec")
        first = next(requests)
        assert first.WhichOneof("message") == "init", first
        with lock:
            counts["exec_requests"] += 1
            counts["exec_responses"] += 2
        yield pb.ExecStreamResponse(ready=pb.ExecStreamReady())
        yield pb.ExecStreamResponse(exit=pb.ExecStreamExit(exit_code=0))

    handlers = {}
    for method in SERVICE_DESCRIPTOR.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        codec = {"request_deserializer": request_type.FromString,
                 "response_serializer": response_type.SerializeToString}
        if method.name == "StreamExec":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(stream_exec, **codec)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary(method.name), **codec)
    server = grpc.server(ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"floor on 127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    server.stop(1).wait()
    print(json.dumps(counts), flush=True)


# -- the servers and clients ------------------------------------------------------------------------

def _read_lines(proc: subprocess.Popen, count: int) -> list[str]:
    lines = []
    for _ in range(count):
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        lines.append(proc.stdout.readline() if ready else "")
    return lines


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("SANDPOOL_ADDRESS", "SANDPOOL_TOKEN")}


def _client_env(address: str, key: str) -> dict:
    return {**_environment(), "CWSANDBOX_BASE_URL": f"http://{address}", "CWSANDBOX_API_KEY": key,
            "GRPC_VERBOSITY": "ERROR"}


def _server_env(workdir: str) -> dict:
    # the client names an image; with an empty image store it runs on the host's, as the local
    # sandboxes it is compared with do
    return {**_environment(), "SANDPOOL_IMAGE_FALLBACK": "host", "SANDPOOL_IMAGE_DIR": os.path.join(workdir, "images")}


class Server:
    """A server subprocess and the environment of a cwsandbox client of it."""

    def __init__(self, argv: list[str], env: dict, lines: int, *, ends_with_stdin: bool = False) -> None:
        self.ends_with_stdin = ends_with_stdin
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.lines = _read_lines(self.proc, lines)

    def fail(self, what: str) -> None:
        self.proc.kill()
        sys.exit(f"the {what} did not start: {self.lines!r}")

    def close(self) -> str:
        """Stop it; what it printed at the end."""
        if self.proc.poll() is None and not self.ends_with_stdin:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.stdin.close()
        rest = self.proc.stdout.read()
        self.proc.wait(30)
        return rest


def start_floor() -> tuple[Server, dict]:
    server = Server([sys.executable, os.path.abspath(__file__), "--serve-floor"], _environment(), 1, ends_with_stdin=True)
    if not server.lines[0].startswith("floor on "):
        server.fail("floor server")
    return server, _client_env(server.lines[0].split("floor on ", 1)[1].strip(), "floor")


def start_standalone(workdir: str) -> tuple[Server, dict]:
    token_file = os.path.join(workdir, "token")
    with open(token_file, "w") as f:
        f.write("bench-token")
    server = Server([sys.executable, "-m", "sandpool._cwsandbox", "--listen", "127.0.0.1:0",
                     "--token-file", token_file], _server_env(workdir), 2)
    if "cwsandbox API on" not in server.lines[0]:
        server.fail("standalone listener")
    address = server.lines[0].split(" on ", 1)[1].split(";")[0]
    return server, _client_env(address, "bench-token")


def start_serve(workdir: str) -> tuple[Server, dict]:
    server = Server([sys.executable, "-m", "sandpool", "serve", "--listen", "127.0.0.1:0", "--cwsandbox",
                     "127.0.0.1:0", "--record-file", os.path.join(workdir, "record.jsonl")], _server_env(workdir), 2)
    if "listening on" not in server.lines[0] or "cwsandbox API on" not in server.lines[1]:
        server.fail("sandpool serve --cwsandbox")
    address = server.lines[1].split("cwsandbox API on ", 1)[1].split(";")[0]
    with open(server.lines[1].split("$(cat ", 1)[1].split(")")[0]) as f:
        key = f.read().strip()
    return server, _client_env(address, key)


class LocalClient:
    """sandpool's own sync API in this process: a running sandbox of a local Session."""

    def __init__(self, session) -> None:
        self.sb = session.sandbox()
        self.sb.wait()
        timed(20, lambda: self.sb.exec(["true"]).result(), warm=0)

    def exec_samples(self, count: int) -> list[float]:
        return timed(count, lambda: self.sb.exec(["true"]).result(), warm=0)

    def close(self) -> None:
        pass


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n: int, rounds: int, listeners: list[str]) -> dict:
    """``n`` exec samples from each client, taken in ``rounds`` rounds; the figures by client, and the
    floor server's counts."""
    from sandpool import Session

    workdir = tempfile.mkdtemp(prefix="sandpool-bench-cwsandbox-")
    servers: dict = {}
    clients: dict = {}
    try:
        with contextlib.ExitStack() as stack:
            servers["floor"], floor_env = start_floor()
            envs = {"floor": floor_env}
            if "standalone" in listeners:
                servers["standalone"], envs["standalone"] = start_standalone(workdir)
            if "serve" in listeners:
                servers["serve"], envs["serve"] = start_serve(workdir)
            clients["local"] = LocalClient(stack.enter_context(Session()))
            for name, env in envs.items():
                clients[name] = CwsandboxClient(env)
            samples: dict = {name: [] for name in clients}
            cpu = {name: 0.0 for name in clients}  # seconds of CPU the serving process spent
            pids = {name: servers[name].proc.pid if name in servers else os.getpid() for name in clients}
            for _ in range(rounds):
                for name, client in clients.items():
                    before = _cpu_seconds(pids[name])
                    samples[name] += client.exec_samples(max(1, n // rounds))
                    cpu[name] += _cpu_seconds(pids[name]) - before
            for client in clients.values():
                client.close()
    finally:
        ends = {name: server.close() for name, server in servers.items()}
        shutil.rmtree(workdir, ignore_errors=True)
    figures = {name: {**latency(values), "server_cpu_ms_per_exec": cpu[name] / len(values) * 1000}
               for name, values in samples.items()}
    counted = json.loads(ends["floor"].strip().splitlines()[-1])
    figures["floor_counts"] = counted
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--listeners", default="standalone,serve",
                        help="which listeners to measure beside the floor (comma-separated: standalone, serve)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "bench_cwsandbox.json"))
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor()
        return
    n = 100 if args.quick else 600
    load_before = os.getloadavg()
    figures = run(n, rounds=20, listeners=[name for name in args.listeners.split(",") if name])
    local, floor = figures["local"]["p50_ms"], figures["floor"]["p50_ms"]
    print(f"\ncwsandbox listener benchmark ({platform.node()}, {os.cpu_count()} cpus, n={n}, "
          f"load {load_before[0]:.2f})\n")
    print("| exec round trip | p50 (ms) | p99 (ms) | /local (p50) | /floor (p50) | /(floor + local) | "
          "listener's own share | server CPU per exec (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    ratios = {"floor/local": floor / local}
    for name in ("local", "floor", "standalone", "serve"):
        if name not in figures:
            continue
        p50, p99, cpu = figures[name]["p50_ms"], figures[name]["p99_ms"], figures[name]["server_cpu_ms_per_exec"]
        listener = name not in ("local", "floor")
        own = f"{(p50 - floor) / p50:.0%}" if listener else ""
        bound = f"{p50 / (floor + local):.2f}" if listener else ""
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {p50 / local:.2f} | {p50 / floor:.2f} | {bound} | {own} | {cpu:.2f} |")
        if listener:
            ratios[f"{name}/local"], ratios[f"{name}/floor"] = p50 / local, p50 / floor
            ratios[f"{name}/(floor+local)"] = p50 / (floor + local)
            ratios[f"{name} own share"] = (p50 - floor) / p50
    print(f"\nthe floor alone is {floor / local:.2f}x local exec: a listener that added nothing but the sandbox's "
          f"own exec would be (floor + local) / local = {(floor + local) / local:.2f}x local")
    counts = figures["floor_counts"]
    execs = counts["rpcs"].get("StreamExec", 0)
    if execs:
        once = {name: count for name, count in counts["rpcs"].items() if name != "StreamExec"}
        print(f"\nper exec, counted by the floor server over {execs} execs: "
              f"{counts['rpcs']['StreamExec'] / execs:.2f} StreamExec RPC, {counts['exec_requests'] / execs:.2f} "
              f"request messages (init, then the client half-closes), {counts['exec_responses'] / execs:.2f} "
              f"responses (ready, exit); for the sandbox, once: {once}")
    machine = {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_before": load_before, "load_after": os.getloadavg()}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**figures, "ratios": ratios, "machine": machine}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
