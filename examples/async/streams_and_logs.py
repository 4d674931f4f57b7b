"""Streams under asyncio: a command's output as it comes (``async for``), the main command's log
(``stream_logs``), and a file written and read in chunks (``write_file_streaming`` /
``read_file_streaming``), in constant memory whatever its size.

Only the import differs from cwsandbox code. Every stream ends: with the command, with the sandbox
(``follow=True``), or at the end of the file.
"""

import asyncio

from sandpool import Sandbox


async def main() -> None:
    async with Sandbox.run("sh", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.1; done") as ticker:
        log = [line.strip() async for line in ticker.stream_logs(follow=True)]  # ends with the command
        print(f"main command's log: {log}")
    async with Sandbox.run() as sb:
        proc = sb.exec(["sh", "-c", "for i in 1 2 3; do echo line $i; done"])
        pieces = [chunk async for chunk in proc.stdout]  # text chunks as they arrive
        print(f"output: {''.join(pieces).splitlines()}")
        chunks = (b"x" * (1 << 20) for _ in range(16))  # 16 MiB, never all in memory at once
        await sb.write_file_streaming("/tmp/big", chunks)
        size = 0
        async for chunk in sb.read_file_streaming("/tmp/big"):
            size += len(chunk)
        print(f"streamed back: {size >> 20} MiB")


asyncio.run(main())
