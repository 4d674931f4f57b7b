"""cwsandbox's README quick start in its asyncio form: ``async with Sandbox.run(...)`` and ``await``.

Only the import differs from cwsandbox's. ``Sandbox.run()`` inside a running asyncio loop returns
at once; ``async with`` waits until the sandbox runs and stops it when the block ends, whatever
ends it. The work runs in sandpool's own trio thread, so the asyncio loop keeps serving other tasks.
"""

import asyncio

from sandpool import Sandbox


async def main() -> None:
    async with Sandbox.run("sleep", "infinity") as sb:
        result = await sb.exec(["python3", "-c", "print(2 + 2)"])
        print(f"2 + 2 = {result.stdout.strip()}")
    print(f"after the block: {sb.status}")


asyncio.run(main())
