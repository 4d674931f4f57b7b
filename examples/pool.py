"""A pool of 5 sandboxes working in parallel.

Every exec returns at once with a Process (an OperationRef of a ProcessResult), so issuing all of
them before waiting for any runs the five sandboxes, and their start-ups, concurrently.
"""

import time

from sandpool import SandboxDefaults, Session

with Session(defaults=SandboxDefaults(tags=("examples", "pool"))) as session:
    pool = [session.sandbox() for _ in range(5)]

    began = time.perf_counter()
    processes = [
        sandbox.exec(["sh", "-c", f"echo worker {i} squares {i}: $(({i} * {i}))"])
        for i, sandbox in enumerate(pool)
    ]
    for process in processes:
        print(process.result().stdout, end="")
    elapsed = (time.perf_counter() - began) * 1000

    print(f"5 sandboxes started and ran one command each in {elapsed:.0f} ms")
    print(f"distinct sandboxes: {len({sandbox.sandbox_id for sandbox in pool})}")

print("pool stopped:", [sandbox.status.value for sandbox in pool])
