"""What `make run` shows: a pool of local sandboxes sharing out one job, then cleaning up.

Four sandboxes (the embedded default: local process trees, no server, no container registry)
each receive a small prime sieve with ``write_file``, run it on their own slice of the numbers
with ``exec``, and report back. Leaving the session block stops all of them.
"""

import time

import sandpool
from sandpool import SandboxDefaults, Session

LIMIT = 10_000_000
EXPECTED = 664_579  # the number of primes below ten million
WORKERS = 4

SIEVE = """\
import math, sys, time
began = time.perf_counter()
lo, hi = int(sys.argv[1]), int(sys.argv[2])
root = math.isqrt(hi) + 1
small = bytearray([1]) * (root + 1)
small[:2] = b"\\0\\0"
for i in range(2, math.isqrt(root) + 1):
    if small[i]:
        small[i * i::i] = bytes(len(range(i * i, root + 1, i)))
segment = bytearray([1]) * (hi - lo)
for p in (i for i in range(2, root + 1) if small[i]):
    first = max(p * p, (lo + p - 1) // p * p)
    segment[first - lo::p] = bytes(len(range(first - lo, hi - lo, p)))
for n in range(lo, min(2, hi)):
    segment[n - lo] = 0
print(sum(segment), time.perf_counter() - began)
"""


def main() -> None:
    began = time.perf_counter()
    print(f"sandpool {sandpool.__version__}: {WORKERS} sandboxes count the primes below {LIMIT:,}\n")
    step = LIMIT // WORKERS
    slices = [(i * step, LIMIT if i == WORKERS - 1 else (i + 1) * step) for i in range(WORKERS)]

    with Session(defaults=SandboxDefaults(tags=("demo",))) as session:
        pool = [session.sandbox() for _ in slices]
        uploads = [sandbox.write_file("/job/sieve.py", SIEVE.encode()) for sandbox in pool]  # starts them
        for upload in uploads:
            upload.result()
        jobs = [sandbox.exec(["python3", "sieve.py", str(lo), str(hi)], cwd="/job", check=True)
                for sandbox, (lo, hi) in zip(pool, slices)]
        rows = []
        for sandbox, (lo, hi), job in zip(pool, slices, jobs):
            count, seconds = job.result().stdout.split()
            rows.append((sandbox.sandbox_id, f"{lo:,} .. {hi:,}", int(count),
                         (sandbox.started_at - sandbox.created_at) * 1000, float(seconds) * 1000))
        isolation = pool[0].isolation
        ran = time.perf_counter() - began
        closing = time.perf_counter()

    closed_ms = (time.perf_counter() - closing) * 1000
    total = sum(row[2] for row in rows)
    print(f"  {'sandbox':<12} {'numbers':<26} {'primes':>9} {'start':>9} {'sieve':>9}")
    for sandbox_id, span, count, start_ms, sieve_ms in rows:
        print(f"  {sandbox_id:<12} {span:<26} {count:>9,} {start_ms:>6.1f} ms {sieve_ms:>6.0f} ms")
    print(f"  {'total':<12} {'':<26} {total:>9,}   {'(correct)' if total == EXPECTED else '(WRONG!)'}")
    print()
    print(f"isolation level: {isolation}; start = created to RUNNING; sieve = time inside the sandbox")
    print(f"work done in {ran * 1000:.0f} ms; leaving the block stopped all {len(pool)} sandboxes"
          f" in {closed_ms:.0f} ms: {sorted({sandbox.status.value for sandbox in pool})}")
    print(f"sandboxes still running in this process: {len(sandpool.Sandbox.list().result())}")


if __name__ == "__main__":
    main()
