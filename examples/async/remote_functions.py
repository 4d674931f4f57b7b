"""Remote functions from asyncio: ``await f.remote(...)`` and ``asyncio.gather`` over many calls.

Each call runs in a warm sandbox of the session's pool; the awaiting task is free meanwhile.
"""

import asyncio

from sandpool import Session


async def main() -> None:
    async with Session() as session:
        @session.function()
        def cube(x: int) -> int:
            return x ** 3

        print(f"cube(3) = {await cube.remote(3)}")
        values = await asyncio.gather(*(cube.remote(i) for i in range(6)))
        print(f"cubes: {values}")


asyncio.run(main())
