"""Basic usage from trio: ``async with Session(...)`` and ``await`` on every operation.

The async session runs in the caller's trio loop as a nursery of its own; leaving the block
stops every sandbox, as in the sync form. Blocking calls (``.result()``, ``sandbox.wait()``)
raise RuntimeError inside trio, naming the ``await`` form to use instead.
"""

import trio

from sandpool import SandboxDefaults, Session


async def square(session: Session, n: int, results: dict[int, str]) -> None:
    sandbox = session.sandbox()
    result = await sandbox.exec(["sh", "-c", f"echo $(({n} * {n}))"])
    results[n] = result.stdout.strip()


async def main() -> None:
    async with Session(defaults=SandboxDefaults(tags=("examples", "async"))) as session:
        sandbox = session.sandbox()
        result = await sandbox.exec(["echo", "hello from trio"])
        print(result.stdout, end="")

        await sandbox  # waits until RUNNING (already true here)
        process = sandbox.exec(["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.01; done"])
        async for chunk in process.stdout:  # output as it arrives
            print(f"streamed: {chunk!r}")
        print(f"exit code {(await process).returncode}")

        results: dict[int, str] = {}
        async with trio.open_nursery() as nursery:  # three more sandboxes, concurrently
            for n in range(1, 4):
                nursery.start_soon(square, session, n, results)
        print("squares:", [results[n] for n in sorted(results)])
        print(f"sandbox_count={session.sandbox_count}")
    print(f"after the block: {sandbox.status}, sandbox_count={session.sandbox_count}")


trio.run(main)
