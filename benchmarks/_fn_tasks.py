"""Worker-side functions of bench_functions.py: tiny and stdlib-only, so spawned peers import them fast."""

import os
import time


def inc(x):
    return x + 1


def identity(x):
    return x


def sleep_task(seconds):
    time.sleep(seconds)
    return os.getpid()


def whoami():
    """Which worker ran this: the sandbox id inside sandpool, the pid elsewhere."""
    return os.environ.get("SANDPOOL_SANDBOX_ID") or os.getpid()


def rendezvous(directory, n, timeout):
    """Drop a file named after this pid, then wait until n distinct workers have: N workers alive."""
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {n} workers arrived")
        time.sleep(0.001)
    return os.getpid()
