"""FakeRuntime: the in-memory runtime's own behaviour, and session, sandbox and pool logic tested on
it under trio's virtual clock (every scripted delay and timeout passes at once in real time)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import trio
import trio.testing

import sandpool
from sandpool import (
    OperationCancelled,
    SandboxDiedError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxStatus,
    SandboxTimeoutError,
    SandboxUnavailableError,
    SerializationError,
    Session,
)
from sandpool._runtime.fake.runtime import FakeCall, FakeExec, FakeRuntime
from sandpool._runtime.local import LocalRuntime


def run_virtual(async_fn, *args):
    """Run ``async_fn`` under a virtual clock that jumps whenever every task waits; bounded in real time."""
    started = time.perf_counter()
    result = trio.run(async_fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))
    assert time.perf_counter() - started < 5.0, "a virtual-clock test must not wait in real time"
    return result


def elapsed_since(t0: float) -> float:
    return trio.current_time() - t0


# -- scripted commands ---------------------------------------------------------------------------------


def test_exec_table_exact_glob_handlers_builtins_and_missing_programs():
    """Exact argvs win over globs; handlers (plain and async) see argv, cwd and env; built-ins work;
    an unknown program exits 127 with the real agent's message."""

    def greet(cmd):
        return FakeExec(stdout=f"{cmd.argv[1]} in {cmd.cwd} as {cmd.env['WHO']}")

    async def count(cmd):
        await cmd.write("1\n")
        return 3

    execs = {("git", "status"): FakeExec(stdout="clean"), "git *": FakeExec(stderr="nope", exit_code=2),
             ("greet", "x"): greet, "count*": count, ("ok",): 0}

    async def main():
        async with Session(runtime=FakeRuntime(execs=execs)) as session:
            sb = session.sandbox(working_dir="/work", environment_variables={"WHO": "me"})
            assert (await sb.exec(["git", "status"])).stdout == "clean"
            other = await sb.exec(["git", "push", "--force"])
            assert (other.stderr, other.returncode) == ("nope", 2)
            assert (await sb.exec(["greet", "x"])).stdout == "x in /work as me"
            counted = await sb.exec(["count", "-n"])
            assert (counted.stdout, counted.returncode) == ("1\n", 3)
            assert (await sb.exec(["ok"])).returncode == 0
            assert (await sb.exec(["echo", "a", "b"])).stdout == "a b\n"
            assert (await sb.exec(["false"])).returncode == 1
            missing = await sb.exec(["nosuch", "arg"])
            assert missing.returncode == 127
            assert "cannot run 'nosuch'" in missing.stderr

    run_virtual(main)


def test_fake_exec_rejects_bad_values_naming_the_field():
    """FakeExec and FakeRuntime arguments are validated with the field, the value and the fix."""
    with pytest.raises(ValueError, match="exit_code"):
        FakeExec(exit_code=300)
    with pytest.raises(ValueError, match="delay"):
        FakeExec(delay=-1)
    with pytest.raises(TypeError, match="chunk"):
        FakeExec(chunks=["x"])
    with pytest.raises(TypeError, match="glob pattern"):
        FakeRuntime(execs={42: 0})
    with pytest.raises(ValueError, match="absolute"):
        FakeRuntime(files={"rel.txt": "x"})
    with pytest.raises(ValueError, match="fail_starts"):
        FakeRuntime(fail_starts=-1)


def test_streamed_chunks_arrive_at_their_virtual_times():
    """Chunks of a scripted command reach ``async for chunk in proc.stdout`` one by one, each
    after its delay, before the process exits."""
    script = FakeExec(chunks=[(1, "a\n"), (2, "b\n"), (3, "c\n")], delay=4)

    async def main():
        async with Session(runtime=FakeRuntime(execs={("tail",): script})) as session:
            sb = session.sandbox()
            await sb
            t0 = trio.current_time()
            proc = sb.exec(["tail"])
            seen = [(chunk, elapsed_since(t0)) async for chunk in proc.stdout]
            assert seen == [("a\n", 1.0), ("b\n", 3.0), ("c\n", 6.0)]
            assert (await proc).returncode == 0
            assert elapsed_since(t0) == 10.0

    run_virtual(main)


def test_stdin_reaches_a_handler_and_signals_end_a_process():
    """Data written to stdin is what a handler reads; a signal ends a process with 128+N."""

    async def main():
        async with Session(runtime=FakeRuntime(execs={("serve",): FakeExec(delay=1000)})) as session:
            sb = session.sandbox()
            proc = sb.exec(["cat"], stdin=True)
            await proc.stdin.write(b"hello ")
            await proc.stdin.writeline("world")
            await proc.stdin.close()
            assert (await proc).stdout == "hello world\n"
            server = sb.exec(["serve"])
            await server.send_signal(signal.SIGINT)
            assert (await server).returncode == 128 + signal.SIGINT

    run_virtual(main)


# -- files -----------------------------------------------------------------------------------------------


def test_files_are_seeded_per_sandbox_and_errors_carry_cwsandbox_reasons():
    """Every sandbox starts with its own copy of ``files``; writes land in that sandbox only
    (relative paths from the working dir); missing files and directories are SandboxFileErrors."""
    runtime = FakeRuntime(files={"/data/in.txt": "input"})

    async def main():
        async with Session(runtime=runtime) as session:
            one, two = session.sandbox(working_dir="/work"), session.sandbox()
            assert await one.read_file("/data/in.txt") == b"input"
            await one.write_file("out.txt", b"result")
            assert (await one.exec(["cat", "/work/out.txt"])).stdout == "result"
            with pytest.raises(SandboxFileError) as missing:
                await two.read_file("/work/out.txt")
            assert missing.value.reason == "CWSANDBOX_FILE_NOT_FOUND"
            with pytest.raises(SandboxFileError) as directory:
                await two.read_file("/data")
            assert directory.value.reason == "CWSANDBOX_FILE_IS_DIRECTORY"
            assert runtime.sandbox(one.sandbox_id).files["/work/out.txt"] == b"result"
            assert "/work/out.txt" not in runtime.sandbox(two.sandbox_id).files

    run_virtual(main)


# -- starting --------------------------------------------------------------------------------------------


def test_sandboxes_start_lazily_and_take_their_scripted_start_delay():
    """``session.sandbox()`` creates nothing; the first exec starts it, after ``start_delay``; a
    wait shorter than the start is a SandboxTimeoutError at that virtual moment."""
    runtime = FakeRuntime(start_delay=30)

    async def main():
        async with Session(runtime=runtime) as session:
            sb = session.sandbox()
            assert runtime.sandboxes == [] and sb.status is None
            t0 = trio.current_time()
            with pytest.raises(SandboxTimeoutError, match="within 10"):
                await sb.wait_until_complete(timeout=10)
            assert elapsed_since(t0) == 10.0
            assert len(runtime.sandboxes) == 1
            await sb.exec(["true"])
            assert elapsed_since(t0) == 30.0
            assert sb.status == SandboxStatus.RUNNING

    run_virtual(main)


def test_scripted_start_failures_fail_that_sandbox_only():
    """``fail_starts=1``: the first start fails (status FAILED, SandboxFailedError naming the
    script); the next sandbox starts."""

    async def main():
        async with Session(runtime=FakeRuntime(fail_starts=1)) as session:
            first = session.sandbox()
            with pytest.raises(SandboxFailedError, match="scripted start failure"):
                await first.exec(["true"])
            assert first.status == SandboxStatus.FAILED
            second = session.sandbox()
            assert (await second.exec(["echo", "up"])).stdout == "up\n"

    run_virtual(main)


def test_a_closed_fake_runtime_refuses_further_use():
    """A session closes the runtime it was given; reusing that runtime is a clear error."""
    runtime = FakeRuntime()

    async def main():
        async with Session(runtime=runtime) as session:
            await session.sandbox().exec(["true"])
        with pytest.raises(SandboxUnavailableError, match="create a new FakeRuntime"):
            async with Session(runtime=runtime):
                pass
        assert [box.alive for box in runtime.sandboxes] == [False]

    run_virtual(main)


# -- timeouts, stopping, idleness, death -------------------------------------------------------------------


def test_exec_timeout_fires_at_virtual_time_and_kills_the_process():
    """A command longer than ``timeout_seconds`` raises SandboxTimeoutError exactly then; the
    sandbox stays usable."""

    async def main():
        async with Session(runtime=FakeRuntime(execs={"build*": FakeExec(delay=3600)})) as session:
            sb = session.sandbox()
            await sb
            t0 = trio.current_time()
            with pytest.raises(SandboxTimeoutError, match="timed out after 90"):
                await sb.exec(["build", "all"], timeout_seconds=90)
            assert elapsed_since(t0) == 90.0
            assert (await sb.exec(["echo", "still", "here"])).stdout == "still here\n"

    run_virtual(main)


def test_stop_waits_its_grace_only_for_processes_that_ignore_sigterm():
    """Stop sends SIGTERM: a process that exits on it ends the stop at once; one that ignores
    it is SIGKILLed after exactly the grace period. Both sandboxes end TERMINATED."""
    execs = {("polite",): FakeExec(delay=1000), ("stubborn",): FakeExec(delay=1000, ignore_sigterm=True)}
    runtime = FakeRuntime(execs=execs)

    async def main():
        async with Session(runtime=runtime) as session:
            for argv, expected in ((["polite"], 0.0), (["stubborn"], 25.0)):
                sb = session.sandbox()
                proc = sb.exec(argv)
                await sb
                await trio.testing.wait_all_tasks_blocked()
                t0 = trio.current_time()
                await sb.stop(graceful_shutdown_seconds=25)
                assert elapsed_since(t0) == expected
                assert sb.status == SandboxStatus.TERMINATED
                with pytest.raises(SandboxNotRunningError):
                    await proc
        assert [box.escalated for box in runtime.sandboxes] == [[], [["stubborn"]]]

    run_virtual(main)


def test_idle_timeout_and_max_lifetime_end_sandboxes_at_their_virtual_times():
    """A sandbox with nothing running ends after ``idle_timeout_seconds`` (a long exec keeps it
    alive); ``max_lifetime_seconds`` ends one whatever it does, failing its exec with SandboxDiedError
naming the reason. Both end TERMINATED."""

    async def main():
        async with Session(runtime=FakeRuntime()) as session:
            idle = session.sandbox(idle_timeout_seconds=60)
            t0 = trio.current_time()
            await idle.exec(["sleep", "200"])
            await idle.wait_until_complete(raise_on_termination=False)
            assert elapsed_since(t0) == 260.0
            assert idle.status == SandboxStatus.TERMINATED
            assert "idle_timeout" in idle.status_reason
            short = session.sandbox(max_lifetime_seconds=100)
            t0 = trio.current_time()
            with pytest.raises(SandboxDiedError, match="max_lifetime_seconds elapsed"):  # as a real agent's end
                await short.exec(["sleep", "500"])
            assert elapsed_since(t0) == 100.0
            assert short.status == SandboxStatus.TERMINATED

    run_virtual(main)


@pytest.mark.parametrize("how", ["kill_sandbox", "kill", "die_after"])
def test_a_sandbox_dying_mid_exec_fails_the_exec_with_sandbox_died_error(how):
    """A sandbox that dies under a running command (a scripted command, ``FakeSandbox.kill()``,
    or ``die_after``) fails it with SandboxDiedError carrying SIGKILL, as a real OOM kill does,
    and ends FAILED; later operations fail with SandboxFailedError."""
    runtime = FakeRuntime(execs={("crash",): FakeExec(delay=5, kill_sandbox=True)},
                          die_after=7 if how == "die_after" else None)

    async def main():
        async with Session(runtime=runtime) as session:
            sb = session.sandbox()
            await sb
            t0 = trio.current_time()
            proc = sb.exec(["crash"] if how == "kill_sandbox" else ["sleep", "1000"])
            if how == "kill":
                await trio.sleep(3)
                runtime.sandbox(sb.sandbox_id).kill()
            with pytest.raises(SandboxDiedError) as died:
                await proc
            assert died.value.signal == signal.SIGKILL
            assert elapsed_since(t0) == {"kill_sandbox": 5.0, "kill": 3.0, "die_after": 7.0}[how]
            with pytest.raises(SandboxFailedError):
                await sb.wait_until_complete()
            assert sb.status == SandboxStatus.FAILED
            assert "SIGKILL" in sb.status_reason
            with pytest.raises(SandboxFailedError):  # a dead sandbox is never used again
                await sb.exec(["true"])

    run_virtual(main)


def test_wait_until_complete_follows_the_main_command():
    """A sandbox with a main command completes when it exits (COMPLETED, returncode 0), or fails
    with its exit code; ``wait_until_complete`` resolves at that virtual moment."""
    runtime = FakeRuntime(execs={("train",): FakeExec(delay=300, stdout="done"), ("broken",): FakeExec(exit_code=3)})

    async def main():
        async with Session(runtime=runtime) as session:
            good, bad = session.sandbox(command="train"), session.sandbox(command="broken")
            t0 = trio.current_time()
            await good.wait_until_complete()
            assert elapsed_since(t0) == 300.0
            assert (good.status, good.returncode) == (SandboxStatus.COMPLETED, 0)
            with pytest.raises(SandboxFailedError):
                await bad.wait_until_complete()
            assert (bad.status, bad.returncode) == (SandboxStatus.FAILED, 3)
        assert bytes(runtime.sandbox(good.sandbox_id).main_log) == b"done"

    run_virtual(main)


def test_operations_finish_in_the_order_of_their_scripted_delays():
    """Execs finish in the order their delays dictate, whatever order they were started in
    (trio-side: completion order observed from tasks, on the virtual clock)."""
    delays = {"a": 30, "b": 10, "c": 20}
    runtime = FakeRuntime(execs={(name,): FakeExec(delay=d) for name, d in delays.items()})

    async def main():
        finished = []
        async with Session(runtime=runtime) as session:
            sb = session.sandbox()

            async def one(name):
                await sb.exec([name])
                finished.append((name, trio.current_time()))

            async with trio.open_nursery() as nursery:
                for name in delays:
                    nursery.start_soon(one, name)
        assert [name for name, _ in finished] == ["b", "c", "a"]

    run_virtual(main)


def test_as_completed_orders_by_scripted_delays_in_a_sync_session():
    """``sandpool.as_completed`` (a blocking helper, so real time in the session's thread) yields
    execs in the order of their scripted delays (a tenth of a second apart)."""
    # 100 ms apart: far more than the few ms the test thread may take to issue the three execs
    runtime = FakeRuntime(execs={("a",): FakeExec(delay=0.2), ("b",): FakeExec(delay=0.0),
                                 ("c",): FakeExec(delay=0.1)})
    with Session(runtime=runtime) as session:
        sb = session.sandbox()
        sb.start().result()
        procs = [sb.exec([name]) for name in "abc"]
        order = [proc.command[0] for proc in sandpool.as_completed(procs, timeout=10)]
    assert order == ["b", "c", "a"]


def test_a_sandbox_can_be_killed_from_the_test_thread_of_a_sync_session():
    """``FakeSandbox.kill()`` from a thread other than the session's loop kills the sandbox there:
    the running command fails with SandboxDiedError at once (no real waiting on its 30 s)."""
    runtime = FakeRuntime()
    with Session(runtime=runtime) as session:
        sb = session.sandbox()
        proc = sb.exec(["sleep", "30"])
        sb.write_file("/tmp/ready", b"").result()  # answered: the exec sent before it has started
        started = time.perf_counter()
        runtime.sandbox(sb.sandbox_id).kill()
        with pytest.raises(SandboxDiedError):
            proc.result(timeout=10)
        assert time.perf_counter() - started < 5
        with pytest.raises(SandboxFailedError):
            sb.wait_until_complete().result(timeout=10)
        assert sb.status == SandboxStatus.FAILED


# -- remote functions ------------------------------------------------------------------------------------


def test_map_keeps_input_order_when_calls_finish_out_of_order():
    """``.map`` returns refs in input order although the scripted delays make later calls finish
    first; every call ran through a cloudpickle round trip in a fake sandbox."""
    runtime = FakeRuntime(calls=lambda name, args, kwargs: FakeCall(delay=10 - args[0]))

    async def main():
        async with Session(runtime=runtime) as session:
            @session.function(max_concurrency=3)
            def square(x):
                return x * x

            t0 = trio.current_time()
            refs = square.map([(i,) for i in range(10)])
            assert [await ref for ref in refs] == [i * i for i in range(10)]
            assert 0 < elapsed_since(t0) < sum(10 - i for i in range(10))  # three sandboxes worked at once
        assert sum(len(box.calls) for box in runtime.sandboxes) == 10
        assert len(runtime.sandboxes) <= 3

    run_virtual(main)


def test_an_infra_failure_is_retried_on_a_fresh_sandbox_within_retries():
    """A call whose sandbox dies under it is retried (``retries=1``) on a fresh sandbox and
    succeeds; without retries it fails with SandboxDiedError saying how to retry. A worker's
    death is retried the same way, in the same sandbox."""
    attempts: dict[str, int] = {}

    def hook(name, args, kwargs):
        attempts[args[0]] = attempts.get(args[0], 0) + 1
        if attempts[args[0]] == 1:
            return FakeCall(delay=2, kill_sandbox=args[0] == "sandbox", kill_worker=args[0] == "worker")
        return None

    runtime = FakeRuntime(calls=hook)

    async def main():
        async with Session(runtime=runtime) as session:
            @session.function(retries=1)
            def echo(x):
                return x

            @session.function(retries=0)
            def fragile(x):
                return x

            assert await echo.remote("sandbox") == "sandbox"
            assert await echo.remote("worker") == "worker"
            assert session.statistics().calls_retried == 2
            assert [box.alive for box in runtime.sandboxes[:2]] == [False, True]
            attempts.clear()
            with pytest.raises(SandboxDiedError, match="retries=N"):
                await fragile.remote("worker")

    run_virtual(main)


def test_call_timeout_cancellation_and_serialization_errors():
    """A call slower than ``timeout_seconds`` fails at that virtual time; a cancelled call is
    interrupted; a result that does not pickle is a SerializationError; the user's own exception
    comes back as itself. The sandbox keeps serving afterwards."""
    runtime = FakeRuntime(calls=lambda name, args, kwargs: FakeCall(delay=args[0] if args else 0))

    async def main():
        async with Session(runtime=runtime) as session:
            @session.function(timeout_seconds=30, max_concurrency=1)
            def slow(seconds):
                return seconds

            @session.function(max_concurrency=1)
            def unpicklable():
                return threading.Lock()

            @session.function(max_concurrency=1)
            def fails():
                raise KeyError("missing")

            t0 = trio.current_time()
            with pytest.raises(SandboxTimeoutError):
                await slow.remote(100)
            assert elapsed_since(t0) == 30.0
            ref = slow.remote(20)
            with trio.move_on_after(5):
                await ref
            with pytest.raises(OperationCancelled):
                await ref
            with pytest.raises(SerializationError, match="is not plain data"):
                await unpicklable.remote()
            with pytest.raises(KeyError, match="missing"):
                await fails.remote()
            t1 = trio.current_time()
            assert await slow.remote(1) == 1
            assert elapsed_since(t1) == 1.0  # the cancelled call no longer holds the only sandbox
        assert len(runtime.sandboxes) == 1

    run_virtual(main)


# -- the fake against a real sandbox ----------------------------------------------------------------------


async def _observe(runtime, kill) -> dict:
    """What a client sees of a few commands, a file error, a signal, a death, a stop and a failing
    main command. A file write's answer proves that the exec sent before it has started."""
    seen = {}
    async with Session(runtime=runtime) as session:
        sb = session.sandbox()
        echo = await sb.exec(["echo", "hi"])
        missing = await sb.exec(["nosuchprog"])
        seen["execs"] = (echo.stdout, echo.returncode, missing.stderr, missing.returncode)
        with pytest.raises(SandboxFileError) as error:
            await sb.read_file("/nope.txt")
        seen["file"] = error.value.reason
        proc = sb.exec(["sleep", "30"])
        await proc.send_signal(signal.SIGTERM)
        seen["signalled"] = (await proc).returncode
        proc = sb.exec(["sleep", "30"])
        await sb.write_file("/tmp/ready", b"")
        kill(sb)
        with pytest.raises(SandboxDiedError) as died:
            await proc
        with pytest.raises(SandboxFailedError):
            await sb.wait_until_complete()
        seen["died"] = (died.value.signal, died.value.exit_code, sb.status, sb.returncode, sb.status_reason)
        stopped = session.sandbox()
        proc = stopped.exec(["sleep", "30"])
        await stopped.write_file("/tmp/ready", b"")
        await stopped.stop(graceful_shutdown_seconds=1)
        with pytest.raises(SandboxNotRunningError, match="was stopped"):
            await proc
        seen["stopped"] = (stopped.status, stopped.returncode, stopped.status_reason)
        main = session.sandbox(command="sh", args=["-c", "exit 3"])
        with pytest.raises(SandboxFailedError):
            await main.wait_until_complete()
        seen["main"] = (main.status, main.returncode, main.status_reason)
    return seen


def test_the_fake_and_a_real_local_sandbox_look_the_same_to_a_client():
    """The same scenario on LocalRuntime (real processes) and on FakeRuntime gives the same
    results, errors, statuses, return codes and reasons: the fake answers as the real agent does."""
    fake = FakeRuntime(execs={("sh", "-c", "exit 3"): 3})
    real = trio.run(_observe, LocalRuntime(), lambda sb: os.kill(sb._record.agent_pid, signal.SIGKILL))
    faked = trio.run(_observe, fake, lambda sb: fake.sandbox(sb.sandbox_id).kill())
    assert faked == real
    assert real["died"][:2] == (signal.SIGKILL, 128 + signal.SIGKILL)
