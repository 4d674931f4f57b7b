"""asyncio's own cancellation reaches the sandbox: ``asyncio.timeout`` (or ``wait_for``) around an
exec, or ``task.cancel()``, kills the command's process tree inside the sandbox.

The awaiting task sees asyncio's TimeoutError / CancelledError, as with any other coroutine; the
sandbox itself keeps running and serves the next command.
"""

import asyncio

from sandpool import OperationCancelled, Session


async def main() -> None:
    async with Session() as session:
        sb = session.sandbox()
        slow = sb.exec(["sh", "-c", "echo $$; exec sleep 1000"])
        pid = int((await anext(aiter(slow.stdout))).strip())
        try:
            async with asyncio.timeout(0.5):
                await slow
        except TimeoutError:
            print("timed out after 0.5 s")
        try:
            await slow  # until its cleanup is done: the command was killed
        except OperationCancelled:
            print("the exec was cancelled")
        check = await sb.exec(["sh", "-c", f"test -e /proc/{pid} && echo alive || echo gone"])
        print(f"the command inside the sandbox: {check.stdout.strip()}")

        waiter = asyncio.create_task(wait_for_ever(sb))
        await asyncio.sleep(0)  # one turn of the loop: the task now awaits its exec
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            print("task cancelled; the sandbox still serves:", (await sb.exec(["echo", "yes"])).stdout.strip())


async def wait_for_ever(sb) -> None:
    await sb.exec(["sleep", "1000"])


asyncio.run(main())
