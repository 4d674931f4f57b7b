"""Actors beside remote functions and Ray's actor figures.

Each run is a fresh child process (this script with ``--run``), printing one JSON line; the
parent runs it ``--runs`` times (default 3) and prints each run and the medians. In every run:

- actor round trip: 2,000 sequential ``handle.inc(x)`` (sync) after 200 warm-up calls, p50/p99,
  and the same as ``await handle.inc.remote(x)`` inside trio;
- function round trip: the same with ``inc(x)`` of ``@session.function`` in the same run, in
  blocks of 100 interleaved with the actor's (a busy moment of the machine falls on both);
- the floor: the same round trips over a bare socket pair to a forked Python process that
  answers each message (two socket hops and two wake-ups, no sandpool), from sync code and from
  trio, in the same run;
- ordered calls/s: 20,000 ``handle.inc.remote(i)`` on one actor, every result checked in order;
- 100 MB by reference: ``size.remote(make.remote())`` (the result is held here as its encoded
  bytes and goes on as those: see docs/functions.md) against fetching ``make.remote().result()``
  here and passing the value, and the producer alone (``make.remote()`` until its answer is in);
  3 interleaved repetitions of each, medians; the same for a structured value (a list of 2M
  floats), which the client would otherwise decode and pickle object by object.

``--profile`` instead prints where the microseconds of one trio round trip go (client stages).

Ray is not installed here: its figures (actor round trip p50 809 us for ActorPool, 802 us for a
direct ``ray.get(actor.inc.remote(x))``) are quoted from shared/reference/peer_benchmarks.md,
measured on this machine kind.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

RAY_ACTOR_RTT_US = 809.0
ROUND_TRIPS = 2000
WARM = 200
ORDERED_CALLS = 20000
BIG_BYTES = 100 * 1024 * 1024
FLOATS = 2_000_000  # a structured value: a list of floats (18 MB as plain data)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


def _rtt_pair(calls: dict) -> dict:
    """Round trips of each of ``calls`` (name -> call(i)), measured in interleaved blocks of 100 so
    that a busy moment of the machine falls on both alike; p50/p99 in us per name."""
    for call in calls.values():
        for i in range(WARM):
            call(i)
    samples: dict = {name: [] for name in calls}
    for _ in range(ROUND_TRIPS // 100):
        for name, call in calls.items():
            for i in range(100):
                began = time.perf_counter()
                call(i)
                samples[name].append(time.perf_counter() - began)
    return {name: {"p50_us": _pct(v, 50) * 1e6, "p99_us": _pct(v, 99) * 1e6} for name, v in samples.items()}


class Inc:
    def inc(self, x):
        return x + 1


def _echo_child() -> tuple[socket.socket, int]:
    """A forked process answering every message on a socket pair with a short one (the floor)."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        while True:
            data = theirs.recv(65536)
            if not data:
                os._exit(0)
            theirs.sendall(b"r" * 24)
    theirs.close()
    return ours, pid


def floor_sync() -> dict:
    sock, pid = _echo_child()
    try:
        def echo(i: int) -> None:
            sock.sendall(b"c" * 48)
            sock.recv(65536)

        return _rtt_pair({"floor_sync": echo})["floor_sync"]
    finally:
        sock.close()
        os.waitpid(pid, 0)


async def floor_trio() -> dict:
    import trio

    sock, pid = _echo_child()
    sock.setblocking(False)
    samples = []
    try:
        for n in range(WARM + ROUND_TRIPS):
            began = time.perf_counter()
            sock.send(b"c" * 48)
            await trio.lowlevel.wait_readable(sock)
            sock.recv(65536)
            if n >= WARM:
                samples.append(time.perf_counter() - began)
    finally:
        sock.close()
        os.waitpid(pid, 0)
    return {"p50_us": _pct(samples, 50) * 1e6, "p99_us": _pct(samples, 99) * 1e6}


def one_run() -> dict:
    import cloudpickle
    import trio

    import sandpool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out: dict = {"floor_sync": floor_sync()}
    with sandpool.Session() as session:
        @session.function(max_concurrency=1)
        def inc(x):
            return x + 1

        @session.function(max_concurrency=1)
        def make():
            return b"x" * BIG_BYTES

        @session.function(max_concurrency=1)
        def size(value):
            return len(value)

        @session.function(max_concurrency=1)
        def make_floats():
            return [i * 0.5 for i in range(FLOATS)]

        actor = session.cls(Inc).remote()
        out.update(_rtt_pair({"actor_sync": actor.inc, "function_sync": inc}))
        began = time.perf_counter()
        refs = [actor.inc.remote(i) for i in range(ORDERED_CALLS)]
        values = [r.result() for r in refs]
        out["ordered_calls_per_s"] = ORDERED_CALLS / (time.perf_counter() - began)
        assert values == list(range(1, ORDERED_CALLS + 1))
        size(b"")  # warm
        ways = {"big_by_ref_ms": lambda: size.remote(make.remote()).result(),
                "big_through_client_ms": lambda: size.remote(make.remote().result()).result(),
                "big_producer_ms": lambda: make.remote().exception() or BIG_BYTES,
                "floats_by_ref_ms": lambda: size.remote(make_floats.remote()).result() * BIG_BYTES // FLOATS,
                "floats_through_client_ms": lambda: size.remote(make_floats.remote().result()).result()
                * BIG_BYTES // FLOATS}
        times: dict = {name: [] for name in ways}
        for _ in range(3):
            for name, way in ways.items():
                began = time.perf_counter()
                assert way() == BIG_BYTES
                times[name].append((time.perf_counter() - began) * 1e3)
        out.update({name: statistics.median(values) for name, values in times.items()})

    async def in_trio() -> None:
        async with sandpool.Session() as s:
            handle = s.cls(Inc).remote()
            fn = s.function(max_concurrency=1)(lambda x: x + 1)
            calls = {"actor_trio": handle.inc.remote, "function_trio": fn.remote}
            for call in calls.values():
                for i in range(WARM):
                    await call(i)
            samples: dict = {name: [] for name in calls}
            for _ in range(ROUND_TRIPS // 100):
                for name, call in calls.items():
                    for i in range(100):
                        began = time.perf_counter()
                        await call(i)
                        samples[name].append(time.perf_counter() - began)
            for name, values in samples.items():
                out[name] = {"p50_us": _pct(values, 50) * 1e6, "p99_us": _pct(values, 99) * 1e6}

    async def floor() -> None:
        out["floor_trio"] = await floor_trio()

    trio.run(floor)
    trio.run(in_trio)
    return out


def profile() -> None:
    """Where the microseconds of one actor round trip from trio go: timestamps at the client's
    stages (pickling and sending; the send itself, which lets the worker run at once on a busy
    machine; the wait for the answer; handling it; resuming the awaiting task)."""
    import cloudpickle
    import trio

    import sandpool
    from sandpool._functions import actor_link, direct

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marks: dict = {}

    def timed(cls: type, name: str, before: str, after: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args: object) -> object:
            marks[before] = time.perf_counter()
            result = original(*args)
            marks[after] = time.perf_counter()
            return result

        setattr(cls, name, wrapper)

    timed(direct.DirectChannel, "send_now", "send", "sent")
    timed(actor_link.ActorLink, "on_answer", "answer", "settled")
    original_receive = direct.DirectChannel.receive_batch

    async def receive(self: direct.DirectChannel) -> object:
        batch = await original_receive(self)
        marks["received"] = time.perf_counter()
        return batch

    direct.DirectChannel.receive_batch = receive  # type: ignore[method-assign]

    async def main() -> None:
        async with sandpool.Session() as s:
            handle = s.cls(Inc).remote()
            rows = []
            for i in range(WARM + ROUND_TRIPS):
                began = time.perf_counter()
                await handle.inc.remote(i)
                done = time.perf_counter()
                m = marks
                rows.append((m["send"] - began, m["sent"] - m["send"], m["received"] - m["sent"],
                             m["answer"] - m["received"], m["settled"] - m["answer"], done - m["settled"], done - began))
            names = ("pickle the call, reach the link", "send (the worker may run meanwhile)",
                     "until the answer is read", "route it", "decode, settle the ref",
                     "resume the awaiting task", "round trip")
            for name, column in zip(names, zip(*rows[WARM:])):
                print(f"  {name:38s} p50 {statistics.median(column) * 1e6:7.1f} us")

    trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run", action="store_true", help="one run, in this process (JSON on stdout)")
    parser.add_argument("--profile", action="store_true", help="where one trio round trip's time goes")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    if args.run:
        print(json.dumps(one_run()))
        return
    runs = []
    for n in range(args.runs):
        done = subprocess.run([sys.executable, __file__, "--run"], check=True, capture_output=True, text=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"run {n + 1}: " + _line(run))
    med = {key: statistics.median(r[key]["p50_us"] for r in runs) for key in
           ("actor_sync", "function_sync", "floor_sync", "actor_trio", "function_trio", "floor_trio")}
    print("\nmedians of the runs' p50 (us), and ratios in each run:")
    for key, value in med.items():
        print(f"  {key:14s} {value:8.1f}")
    for n, run in enumerate(runs, 1):
        print(f"  run {n}: actor/Ray sync {run['actor_sync']['p50_us'] / RAY_ACTOR_RTT_US:.3f}x, "
              f"trio {run['actor_trio']['p50_us'] / RAY_ACTOR_RTT_US:.3f}x (target <= 0.25x); "
              f"actor/function sync {run['actor_sync']['p50_us'] / run['function_sync']['p50_us']:.2f}x, "
              f"trio {run['actor_trio']['p50_us'] / run['function_trio']['p50_us']:.2f}x; "
              f"over the floor sync {run['actor_sync']['p50_us'] / run['floor_sync']['p50_us']:.2f}x, "
              f"trio {run['actor_trio']['p50_us'] / run['floor_trio']['p50_us']:.2f}x; "
              f"ordered {run['ordered_calls_per_s']:,.0f} calls/s (target 10,000); 100 MB by ref / through "
              f"client {run['big_by_ref_ms'] / run['big_through_client_ms']:.2f}x, 2M floats "
              f"{run['floats_by_ref_ms'] / run['floats_through_client_ms']:.2f}x")


def _line(run: dict) -> str:
    return (f"actor sync p50 {run['actor_sync']['p50_us']:.0f} us (p99 {run['actor_sync']['p99_us']:.0f}), "
            f"function sync p50 {run['function_sync']['p50_us']:.0f} us, "
            f"actor trio p50 {run['actor_trio']['p50_us']:.0f} us, function trio p50 "
            f"{run['function_trio']['p50_us']:.0f} us, floor sync {run['floor_sync']['p50_us']:.0f} us, "
            f"trio {run['floor_trio']['p50_us']:.0f} us, ordered {run['ordered_calls_per_s']:,.0f}/s, "
            f"100 MB by ref {run['big_by_ref_ms']:.0f} ms vs through client {run['big_through_client_ms']:.0f} ms "
            f"(producer alone {run['big_producer_ms']:.0f} ms); 2M floats by ref {run['floats_by_ref_ms']:.0f} ms "
            f"vs through client {run['floats_through_client_ms']:.0f} ms")


if __name__ == "__main__":
    main()
