"""Testing your own code with sandpool's FakeRuntime: no sandbox starts, no test waits.

The functions under test take a Session. The tests give them one on a FakeRuntime that scripts
what commands print, which files exist and what fails; the async test runs on trio's virtual
clock, so a 2-minute timeout passes at once. Run this file as a script, or with pytest:
``pytest examples/testing_with_fake_runtime.py``.
"""

from __future__ import annotations

import trio
import trio.testing

import sandpool
from sandpool.testing import FakeCall, FakeExec, FakeRuntime

# -- the code under test (yours) ---------------------------------------------------------------------


def word_count(session: sandpool.Session, text: str) -> int:
    """Count the words of ``text`` with ``wc`` in a sandbox."""
    sandbox = session.sandbox()
    sandbox.write_file("/tmp/input.txt", text.encode()).result()
    result = sandbox.exec(["wc", "-w", "/tmp/input.txt"], check=True).result()
    return int(result.stdout.split()[0])


async def build(session: sandpool.Session, budget_seconds: float) -> str:
    """Run ``make`` in a sandbox; give up after ``budget_seconds``."""
    sandbox = session.sandbox()
    try:
        return (await sandbox.exec(["make"], timeout_seconds=budget_seconds)).stdout
    except sandpool.SandboxTimeoutError:
        return "gave up"


def squares(session: sandpool.Session, numbers: list[int]) -> list[int]:
    """Square numbers in sandboxes, retrying a call whose sandbox dies under it."""

    @session.function(retries=2)
    def square(x: int) -> int:
        return x * x

    return [ref.result() for ref in square.map([(n,) for n in numbers])]


# -- the tests -----------------------------------------------------------------------------------------


def fake_wc(command):
    """What ``wc -w FILE`` prints, computed from the fake sandbox's files."""
    path = command.argv[-1]
    words = len(command.files[command.path(path)].split())
    return FakeExec(stdout=f"{words} {path}\n")


def test_word_count():
    """The sync API works on a FakeRuntime as on a real one."""
    with sandpool.Session(runtime=FakeRuntime(execs={"wc -w *": fake_wc})) as session:
        assert word_count(session, "one two three") == 3


def test_build_gives_up_at_its_budget():
    """A make that would take 10 minutes is abandoned after the 2-minute budget, in virtual time."""

    async def main():
        runtime = FakeRuntime(execs={("make",): FakeExec(stdout="built", delay=600)})
        async with sandpool.Session(runtime=runtime) as session:
            started = trio.current_time()
            assert await build(session, budget_seconds=120) == "gave up"
            assert trio.current_time() - started == 120
            assert runtime.sandboxes[0].execs == [["make"]]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_squares_survive_a_dying_sandbox():
    """The first call's sandbox dies under it; the retry on a fresh sandbox still gives every square."""
    deaths = []

    def first_call_dies(name, args, kwargs):
        if not deaths:
            deaths.append(args)
            return FakeCall(kill_sandbox=True)
        return None

    with sandpool.Session(runtime=FakeRuntime(calls=first_call_dies)) as session:
        assert squares(session, [1, 2, 3, 4]) == [1, 4, 9, 16]
        assert session.statistics().calls_retried == 1


if __name__ == "__main__":
    tests = [test_word_count, test_build_gives_up_at_its_budget, test_squares_survive_a_dying_sandbox]
    for test in tests:
        test()
    print(f"{len(tests)} tests passed on FakeRuntime")
