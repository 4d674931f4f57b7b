"""A Session under asyncio: several sandboxes at once with ``asyncio.gather``, live output with
``async for``, stdin, files, and ``await session.close()``-style cleanup by ``async with``.

The same code runs under trio with ``trio.run`` and a nursery in place of ``gather``.
"""

import asyncio

from sandpool import SandboxDefaults, Session


async def square(session: Session, n: int) -> str:
    result = await session.sandbox().exec(["sh", "-c", f"echo $(({n} * {n}))"])
    return result.stdout.strip()


async def main() -> None:
    async with Session(defaults=SandboxDefaults(tags=("examples", "asyncio"))) as session:
        squares = await asyncio.gather(*(square(session, n) for n in range(1, 4)))
        print("squares:", squares)

        sb = session.sandbox()
        process = sb.exec(["sh", "-c", "for i in 1 2 3; do echo line $i; done"])
        async for chunk in process.stdout:  # output as it arrives
            print(f"streamed: {chunk!r}")
        print(f"exit code {(await process).returncode}")

        cat = sb.exec(["cat"], stdin=True)
        await cat.stdin.writeline("through stdin")
        await cat.stdin.close()
        print(f"cat said: {(await cat).stdout.strip()}")

        await sb.write_file("/data/notes.txt", b"kept in the sandbox")
        print(f"read back: {(await sb.read_file('/data/notes.txt')).decode()}")
        print(f"sandbox_count={session.sandbox_count}")
    print(f"after the block: {sb.status}, sandbox_count={session.sandbox_count}")


asyncio.run(main())
