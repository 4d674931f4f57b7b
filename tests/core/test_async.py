"""The async API inside trio: the Session is a nursery of the calling task."""

import pytest
import trio

import sandpool
from sandpool import SandboxStatus, Session


def test_async_session_exec_stream_and_close():
    """async with Session: await exec, async for over stdout, await stdin writes; exit stops all."""
    async def main():
        async with Session() as s:
            sb = s.sandbox()
            await sb
            assert sb.status == SandboxStatus.RUNNING
            assert (await sb.exec(["echo", "hi"])).stdout == "hi\n"
            proc = sb.exec(["sh", "-c", "echo a; sleep 0.1; echo b"])
            chunks = [c async for c in proc.stdout]
            assert "".join(chunks) == "a\nb\n"
            cat = sb.exec(["cat"], stdin=True)
            await cat.stdin.write(b"xyz")
            await cat.stdin.close()
            assert (await cat).stdout == "xyz"
            await sb.write_file("/f", b"1")
            assert await sb.read_file("/f") == b"1"
            kept = sb
        assert kept.status == SandboxStatus.TERMINATED
    trio.run(main)


def test_leaving_a_cancel_scope_kills_the_remote_command():
    """A trio timeout around an awaited exec cancels it and kills the process in the sandbox."""
    async def main():
        async with Session() as s:
            sb = s.sandbox()
            proc = sb.exec(["sh", "-c", "echo $$; sleep 600; echo x > $SANDPOOL_ROOT/late"])
            pid = (await proc.stdout.__anext__()).strip()  # it runs (no clock decides when to cancel)
            with trio.move_on_after(0) as scope:
                await proc
            assert scope.cancelled_caught
            with trio.fail_after(30):  # a bound for a hang: the kill takes milliseconds
                while (await sb.exec(["test", "-e", f"/proc/{pid}"])).returncode == 0:
                    await trio.sleep(0.01)
            with pytest.raises(sandpool.SandboxFileError):  # and it is gone before it could write
                await sb.read_file("/late")
    trio.run(main)


def test_exception_in_async_block_propagates_unchanged_and_stops_sandboxes():
    """An exception inside 'async with Session' is not wrapped in an ExceptionGroup."""
    seen = []

    async def main():
        async with Session() as s:
            sb = s.sandbox()
            seen.append(sb)
            await sb
            raise KeyError("k")
    with pytest.raises(KeyError):
        trio.run(main)
    assert seen[0].status == SandboxStatus.TERMINATED


def test_wait_inside_trio_names_the_fix():
    """Sandbox.wait() inside trio raises RuntimeError telling to use 'await sandbox'."""
    async def main():
        async with Session() as s:
            with pytest.raises(RuntimeError, match="await sandbox"):
                s.sandbox().wait()
    trio.run(main)


def test_sync_session_awaited_from_trio():
    """A sync session's refs can be awaited from a trio loop running in another thread."""
    with Session() as s:
        sb = s.sandbox()

        async def main():
            result = await sb.exec(["echo", "cross"])
            return result.stdout

        assert trio.run(main) == "cross\n"
