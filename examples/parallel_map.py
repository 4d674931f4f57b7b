"""A parallel map over a warm pool of sandboxes: count primes in chunks, then stream word lengths.

The decorated function runs in sandboxes (forked on first use, then reused); ``map`` takes a list
of argument tuples and returns one OperationRef per item, ``imap`` streams results as they come.
Functions defined in ``__main__`` travel by value, with the globals and imports they use.
"""

import math

from sandpool import SandboxDefaults, Session

CHUNK = 10_000


def is_prime(n):
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


with Session(defaults=SandboxDefaults(tags=("examples", "parallel-map"))) as session:

    @session.function(max_concurrency=2)
    def count_primes(start, stop):
        return sum(1 for n in range(start, stop) if is_prime(n))

    refs = count_primes.map([(lo, lo + CHUNK) for lo in range(0, 50_000, CHUNK)])
    counts = [ref.result() for ref in refs]
    print(f"primes below 50,000 by chunk: {counts}")
    print(f"primes below 50,000: {sum(counts):,} (counted in {len(counts)} chunks)")

    words = "the quick brown fox jumps over the lazy dog".split()
    lengths = session.function(len)  # any picklable callable works, builtins too
    print("word lengths:", list(lengths.imap(words)))
    print(session)
