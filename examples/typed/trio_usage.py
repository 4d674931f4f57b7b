"""Typed trio use of sandpool: ``async with``, ``await`` on refs and processes, ``async for``.

Checked by ``mypy --strict`` and run by tests/test_typing.py.
"""

from __future__ import annotations

from typing import Any, assert_type

import trio

import sandpool
from sandpool import OperationRef, ProcessResult, Sandbox, Session


def cube(n: int) -> int:
    return n ** 3


class Store:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}

    def put(self, key: str, value: int) -> None:
        self.items[key] = value

    def get(self, key: str) -> int:
        return self.items[key]


async def main() -> None:
    async with Session() as session:
        sandbox = session.sandbox()
        assert_type(await sandbox, Sandbox)
        result = await sandbox.exec(["echo", "hello"])
        assert_type(result, ProcessResult)
        chunks: list[str] = []
        async for chunk in sandbox.exec(["seq", "3"]).stdout:
            assert_type(chunk, str)
            chunks.append(chunk)

        await sandbox.write_file("/tmp/n", b"7")
        raw = await sandbox.read_file("/tmp/n")
        assert_type(raw, bytes)

        remote_cube = session.function(cube)
        value = await remote_cube.remote(int(raw))
        assert_type(value, int)
        gathered = await sandpool.gather(remote_cube.map([(n,) for n in range(3)]))
        assert_type(gathered, list[int])
        streamed = [n async for n in remote_cube.imap(range(3))]
        assert_type(streamed, list[int])

        store = session.cls(Store).remote()
        await store.put.remote("a", 1)
        got = store.get.remote("a")
        assert_type(got, OperationRef[Any])
        print(result.stdout.strip(), "".join(chunks).split(), value, gathered, streamed, await got)

    async with Sandbox.run() as standalone:
        done = await standalone.exec(["true"])
        assert_type(done.returncode, int)
    print("typed trio ok")


if __name__ == "__main__":
    trio.run(main)
