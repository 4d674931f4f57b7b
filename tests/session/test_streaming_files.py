"""read_file_streaming / write_file_streaming: any size, one chunk in memory, same errors as read_file."""

import asyncio
import hashlib
import os
import tracemalloc

import pytest
import trio

from sandpool import SandboxFileError, Session
from sandpool._session.streamfiles import CHUNK_BYTES


@pytest.fixture
def sandbox():
    with Session() as s:
        yield s.sandbox()


def _blocks(count: int, size: int = 1 << 20):
    for i in range(count):
        yield hashlib.sha256(str(i).encode()).digest() * (size // 32)


def test_round_trip_of_a_file_larger_than_one_chunk(sandbox):
    """An iterable written in odd-sized parts reads back identical, in chunks of at most CHUNK_BYTES."""
    data = os.urandom(2 * CHUNK_BYTES + 12345)
    parts = [data[:1000], data[1000:CHUNK_BYTES + 7], data[CHUNK_BYTES + 7:]]
    sandbox.write_file_streaming("/dir/big.bin", parts).result()
    chunks = list(sandbox.read_file_streaming("/dir/big.bin"))
    assert b"".join(chunks) == data
    assert max(map(len, chunks)) <= CHUNK_BYTES and len(chunks) == 3
    assert sandbox.read_file("/dir/big.bin").result() == data


def test_bytes_and_empty_sources(sandbox):
    """bytes are one source; an empty source makes an empty file, which streams as nothing."""
    sandbox.write_file_streaming("/a", b"hello").result()
    assert b"".join(sandbox.read_file_streaming("/a")) == b"hello"
    sandbox.write_file_streaming("/empty", []).result()
    assert sandbox.read_file("/empty").result() == b""
    assert list(sandbox.read_file_streaming("/empty")) == []


def test_memory_stays_bounded_for_a_large_file(sandbox):
    """Streaming 48 MiB each way allocates a few chunks at most, not the file."""
    tracemalloc.start()
    try:
        sandbox.write_file_streaming("/large", _blocks(48)).result()
        digest = hashlib.sha256()
        for chunk in sandbox.read_file_streaming("/large"):
            digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256(b"".join(_blocks(48))).hexdigest()
    assert digest.hexdigest() == expected
    assert peak < 6 * CHUNK_BYTES, peak


def test_errors_are_file_errors(sandbox):
    """A missing file and a directory raise SandboxFileError with cwsandbox's reasons; a bad chunk TypeError."""
    with pytest.raises(SandboxFileError) as info:
        list(sandbox.read_file_streaming("/missing"))
    assert info.value.reason == "CWSANDBOX_FILE_NOT_FOUND"
    sandbox.write_file("/d/x", b"1").result()
    with pytest.raises(SandboxFileError) as info:
        list(sandbox.read_file_streaming("/d"))
    assert info.value.reason == "CWSANDBOX_FILE_IS_DIRECTORY"
    with pytest.raises(TypeError, match="must be bytes"):
        sandbox.write_file_streaming("/t", ["text"]).result()
    assert sandbox.exec(["true"]).result().returncode == 0  # the sandbox still works


def test_a_fifo_is_refused_not_waited_on(sandbox):
    """A FIFO in the sandbox is refused at once (reading it could block for good)."""
    sandbox.exec(["sh", "-c", 'mkfifo "$SANDPOOL_ROOT/fifo" 2>/dev/null || mkfifo /fifo']).result()
    with pytest.raises(SandboxFileError) as info:
        list(sandbox.read_file_streaming("/fifo"))
    assert info.value.reason == "CWSANDBOX_FILE_NOT_REGULAR"


def test_async_forms_under_trio_and_asyncio(sandbox):
    """async for over a streamed read works from trio and asyncio; trio may write from an async iterable."""
    async def chunks():
        for block in _blocks(3, 4096):
            yield block

    async def under_trio():
        await sandbox.write_file_streaming("/async", chunks())
        return b"".join([c async for c in sandbox.read_file_streaming("/async")])

    async def under_asyncio():
        return b"".join([c async for c in sandbox.read_file_streaming("/async")])

    expected = b"".join(_blocks(3, 4096))
    assert trio.run(under_trio) == expected
    assert asyncio.run(under_asyncio()) == expected
