"""Snapshots, restores and forks at the namespaces level, each beside a floor from the same run.

    python benchmarks/bench_snapshots.py [--runs 3] [--json PATH]     (as root)

Per run, in an image store of its own (a temporary ``SANDPOOL_IMAGE_DIR``):

- snapshot vs changed bytes: a sandbox writes 1, 10, 50 and 200 MB of random data into its root,
  then ``sb.snapshot()`` is timed (freeze, copy into the store with hashing, unfreeze, record).
  Floor: ``cp -a`` of a file of the same size from a tmpfs (/dev/shm) to the same disk. Each side
  starts after an ``os.sync()``, so neither pays for the other's dirty pages.
- 20 restores vs 20 fresh: 20 sandboxes from one snapshot (of 50 MB) started at once, until each
  answered a first ``exec(["true"])``, beside 20 fresh host-image sandboxes the same way (target:
  restores <= 2x fresh).
- fork: ``sb.fork(n)`` of a sandbox with 10 MB of changes, n = 1, 4, 10: total and per fork.

Prints medians over the runs and the ratios; JSON goes to ``benchmarks/results/bench_snapshots.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SIZES_MB = (1, 10, 50, 200)
FORKS = (1, 4, 10)
RESTORES = 20


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _write(sb, mb: int) -> None:
    result = sb.exec(["sh", "-c", f"head -c {mb * 2**20} /dev/urandom > /root/data"]).result()
    assert result.returncode == 0, result.stderr


def _floor_copy(mb: int, disk_dir: str) -> float:
    src = tempfile.mkdtemp(dir="/dev/shm")
    try:
        with open(os.path.join(src, "data"), "wb") as f:
            f.write(os.urandom(mb * 2**20))
        dst = os.path.join(disk_dir, f"floor-{mb}")
        os.sync()
        seconds = _timed(lambda: subprocess.run(["cp", "-a", src, dst], check=True))
        shutil.rmtree(dst)
        return seconds
    finally:
        shutil.rmtree(src)


def _start_all(session, make) -> float:
    import sandpool

    began = time.perf_counter()
    boxes = [make() for _ in range(RESTORES)]
    sandpool.results([b.exec(["true"]) for b in boxes])
    seconds = time.perf_counter() - began
    sandpool.results([b.stop(graceful_shutdown_seconds=0) for b in boxes])
    return seconds


def one_run(work: str) -> dict:
    from sandpool import SandboxDefaults, Session

    out: dict = {"snapshot_s": {}, "floor_copy_s": {}, "fork_s": {}}
    with Session(defaults=SandboxDefaults(isolation="namespaces")) as session:
        for mb in SIZES_MB:
            sb = session.sandbox()
            _write(sb, mb)
            os.sync()  # each copy starts with no dirty pages of the one before (both sides)
            out["snapshot_s"][mb] = _timed(lambda: sb.snapshot().result())
            os.sync()
            out["floor_copy_s"][mb] = _floor_copy(mb, work)
            sb.stop(graceful_shutdown_seconds=0).result()
        src = session.sandbox()
        _write(src, 50)
        snapshot_id = src.snapshot().result()
        _start_all(session, session.sandbox)  # warm: spares for both plans
        _start_all(session, lambda: session.sandbox(restore_from_snapshot_id=snapshot_id))
        out["fresh_20_s"] = _start_all(session, session.sandbox)
        out["restore_20_s"] = _start_all(session, lambda: session.sandbox(restore_from_snapshot_id=snapshot_id))
        src.stop(graceful_shutdown_seconds=0).result()
        parent = session.sandbox()
        _write(parent, 10)
        for n in FORKS:
            began = time.perf_counter()
            forks = parent.fork(n).result()
            seconds = time.perf_counter() - began
            out["fork_s"][n] = seconds
            for f in forks:
                f.stop(graceful_shutdown_seconds=0).result()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_snapshots.json"))
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        work = tempfile.mkdtemp(prefix="bench-snapshots-", dir="/var/tmp")
        os.environ["SANDPOOL_IMAGE_DIR"] = os.path.join(work, "images")
        try:
            runs.append(one_run(work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)

    def med(get):
        return statistics.median(get(r) for r in runs)

    print("| measurement | sandpool (median) | floor (median) | ratio per run | target |")
    print("|---|---:|---:|---|---|")
    for mb in SIZES_MB:
        ratios = ", ".join(f"{r['snapshot_s'][mb] / r['floor_copy_s'][mb]:.2f}x" for r in runs)
        target = "<= 0.5 s" if mb == 50 else ""
        print(f"| snapshot of {mb} MB changed | {med(lambda r: r['snapshot_s'][mb]) * 1000:.0f} ms | "
              f"{med(lambda r: r['floor_copy_s'][mb]) * 1000:.0f} ms (`cp -a` tmpfs->disk) | {ratios} | {target} |")
    ratios = ", ".join(f"{r['restore_20_s'] / r['fresh_20_s']:.2f}x" for r in runs)
    print(f"| 20 restores at once (50 MB snapshot), to first exec | {med(lambda r: r['restore_20_s']) * 1000:.0f} ms | "
          f"{med(lambda r: r['fresh_20_s']) * 1000:.0f} ms (20 fresh) | {ratios} | <= 2x |")
    for n in FORKS:
        per = ", ".join(f"{r['fork_s'][n] / n * 1000:.0f} ms" for r in runs)
        print(f"| fork({n}) of 10 MB changed | {med(lambda r: r['fork_s'][n]) * 1000:.0f} ms | | per fork: {per} | |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"runs": runs, "load": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
