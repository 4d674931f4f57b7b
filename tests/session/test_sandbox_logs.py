"""Sandbox.stream_logs: the main command's output, line by line, bounded, after the end too."""

import asyncio
import datetime
import re

import pytest
import trio

from sandpool import Session
from sandpool._session.logs import MAX_LINE_BYTES

WAIT_FOR = 'while [ ! -e "$SANDPOOL_ROOT/{0}" ] && [ ! -e /{0} ]; do sleep 0.01; done'


@pytest.fixture
def session():
    with Session() as s:
        yield s


def _finished(session, script):
    """A sandbox whose main command runs ``script`` once the test lets it (so it cannot end before
    its start is reported), run to its end."""
    sb = session.sandbox(command="sh", args=["-c", f"{WAIT_FOR.format('go')}; {script}"])
    sb.write_file("/go", b"").result()
    sb.wait_until_complete(timeout=30).result()
    return sb


def test_logs_of_a_finished_sandbox(session):
    """After the main command ended, its whole output is still readable, stdout and stderr alike."""
    sb = _finished(session, "echo one; echo two >&2; printf 'no newline'")
    assert list(sb.stream_logs()) == ["one\n", "two\n", "no newline"]


def test_tail_and_timestamps(session):
    """tail_lines gives the last N lines; timestamps prefix each with ISO 8601 UTC and a space."""
    sb = _finished(session, "for i in $(seq 1 100); do echo line$i; done")
    assert list(sb.stream_logs(tail_lines=3)) == ["line98\n", "line99\n", "line100\n"]
    assert list(sb.stream_logs(tail_lines=0)) == []
    [stamped] = list(sb.stream_logs(tail_lines=1, timestamps=True))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z line100\n", stamped)


def test_follow_streams_until_the_sandbox_ends_and_since_time_filters(session):
    """follow yields lines as the main command writes them and ends when it exits; since_time skips
    what sandpool had read before that time."""
    script = f"echo first; {WAIT_FOR.format('go')}; echo second"
    sb = session.sandbox(command="sh", args=["-c", script])
    stream = sb.stream_logs(follow=True)
    assert next(stream) == "first\n"
    cut = datetime.datetime.now(datetime.timezone.utc)
    sb.write_file("/go", b"").result()
    assert list(stream) == ["second\n"]
    assert list(sb.stream_logs(since_time=cut)) == ["second\n"]
    assert list(sb.stream_logs()) == ["first\n", "second\n"]


def test_a_long_line_comes_in_bounded_pieces(session):
    """A line longer than MAX_LINE_BYTES is streamed in pieces of that size, nothing lost."""
    size = 2 * MAX_LINE_BYTES + 10
    sb = _finished(session, f"head -c {size} /dev/zero | tr '\\0' a; echo")
    pieces = list(sb.stream_logs())
    assert [len(p) for p in pieces] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 11]
    assert "".join(pieces) == "a" * size + "\n"


def test_async_iteration_under_trio_and_asyncio(session):
    """async for works from trio and from asyncio over a sandbox of a sync session."""
    sb = _finished(session, "echo a; echo b")

    async def collect():
        return [line async for line in sb.stream_logs()]

    assert trio.run(collect) == ["a\n", "b\n"]
    assert asyncio.run(collect()) == ["a\n", "b\n"]


def test_bad_arguments_are_refused(session):
    """A naive since_time, a negative tail and another container are ValueErrors naming the fix."""
    sb = session.sandbox()
    with pytest.raises(ValueError, match="timezone-aware"):
        sb.stream_logs(since_time=datetime.datetime.now())
    with pytest.raises(ValueError, match="tail_lines"):
        sb.stream_logs(tail_lines=-1)
    with pytest.raises(ValueError, match="no such container"):
        sb.stream_logs(container="sidecar")
