"""Explicit start and wait, instead of letting the first exec start the sandbox.

``start()`` returns an OperationRef at once (idempotent: calling it twice starts one sandbox);
``wait()`` blocks until the sandbox is RUNNING and returns it. Starting several sandboxes and
then waiting for all of them overlaps their start-up.
"""

import time

from sandpool import SandboxDefaults, Session

with Session(defaults=SandboxDefaults(tags=("examples", "start-and-wait"))) as session:
    sandbox = session.sandbox(command="sleep", args=["infinity"])
    print(f"before start: status={sandbox.status}, sandbox_id={sandbox.sandbox_id}")

    began = time.perf_counter()
    sandbox.start().result()  # resolves once the sandbox runs
    sandbox.wait()  # returns at once now; wait(timeout=...) raises SandboxTimeoutError if too slow
    print(f"running after {(time.perf_counter() - began) * 1000:.1f} ms: {sandbox!r}")

    # Start three more without blocking, then wait for each: their start-ups overlap.
    more = [session.sandbox() for _ in range(3)]
    refs = [sb.start() for sb in more]
    for ref in refs:
        ref.result()
    print("all running:", all(sb.wait().status == "running" for sb in more))

    result = sandbox.exec(["uname", "-s"]).result()
    print(f"uname -s in {sandbox.sandbox_id}: {result.stdout.strip()}")
