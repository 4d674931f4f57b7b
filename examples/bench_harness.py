"""A small benchmark harness: run commands across a pool of sandboxes and tabulate the timings.

Each run is a remote call that starts the command inside a sandbox and times it there, so the
table shows the command's own time; the pool spreads the runs over up to ``SANDBOXES`` sandboxes.
"""

import statistics
import subprocess
import sys
import time

from sandpool import SandboxDefaults, Session

SANDBOXES, RUNS = 2, 6
COMMANDS = {
    "true": ["true"],
    "python -c pass": [sys.executable, "-c", "pass"],
    "sum(range(10**6))": [sys.executable, "-c", "sum(range(10**6))"],
}


def timed(argv):
    import os

    began = time.perf_counter()
    code = subprocess.run(argv, stdout=subprocess.DEVNULL).returncode
    return (time.perf_counter() - began) * 1000, code, os.environ["SANDPOOL_SANDBOX_ID"]


with Session(defaults=SandboxDefaults(tags=("examples", "bench"))) as session:
    run = session.function(timed, max_concurrency=SANDBOXES)
    refs = {name: run.map([(argv,)] * RUNS) for name, argv in COMMANDS.items()}
    print("| command | runs | p50 ms | max ms | sandboxes | exit codes |")
    print("|---|---:|---:|---:|---:|---|")
    for name, runs in refs.items():
        results = [ref.result() for ref in runs]
        ms = [r[0] for r in results]
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {max(ms):.1f} "
              f"| {len({r[2] for r in results})} | {sorted({r[1] for r in results})} |")
