"""Many sandboxes and processes at once, without deadlock."""

import trio

from sandpool import SandboxStatus, Session


def test_fifty_sandboxes_two_hundred_execs_streaming_at_once():
    """50 sandboxes start concurrently; 200 concurrent execs stream output; all complete correctly."""
    async def main():
        async with Session() as s:
            sbs = [s.sandbox() for _ in range(50)]
            async with trio.open_nursery() as n:
                for sb in sbs:
                    n.start_soon(_await, sb.start())
            assert all(sb.status == SandboxStatus.RUNNING for sb in sbs)
            results = {}

            async def one(i):
                proc = sbs[i % 50].exec(["sh", "-c", f"for j in 1 2 3 4 5; do echo {i}-$j; done; head -c 100000 /dev/zero"])
                text = "".join([chunk async for chunk in proc.stdout])
                results[i] = (text, (await proc).returncode)

            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    for i in range(200):
                        n.start_soon(one, i)
            for i, (text, code) in results.items():
                assert code == 0 and text.startswith("".join(f"{i}-{j}\n" for j in range(1, 6)))
                assert len(text) == len("".join(f"{i}-{j}\n" for j in range(1, 6))) + 100000
            assert len(results) == 200
    trio.run(main)


async def _await(ref):
    await ref
