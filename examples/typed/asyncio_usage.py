"""Typed asyncio use of sandpool, as cwsandbox users write it: the same ``await`` forms as trio.

Checked by ``mypy --strict`` and run by tests/test_typing.py.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

from sandpool import OperationRef, Process, ProcessResult, Sandbox, Session


def add(a: float, b: float) -> float:
    return a + b


async def main() -> None:
    async with Sandbox.run() as sandbox:
        proc = sandbox.exec(["cat"], stdin=True)
        assert_type(proc, Process)
        assert proc.stdin is not None
        await proc.stdin.write(b"typed\n")
        await proc.stdin.close()
        result = await proc
        assert_type(result, ProcessResult)
        assert_type(result.stdout_bytes, bytes)
        lines = [line async for line in sandbox.exec(["echo", "streamed"]).stdout]
        assert_type(lines, list[str])

    async with Session() as session:
        remote_add = session.function(add)
        ref = remote_add.remote(1.5, b=2.0)
        assert_type(ref, OperationRef[float])
        total = await ref
        assert_type(total, float)
        results = [x async for x in remote_add.starmap([(1, 2), (3, 4)])]
        assert_type(results, list[float])
        print(result.stdout.strip(), lines, total, results)
    print("typed asyncio ok")


if __name__ == "__main__":
    asyncio.run(main())
