"""ChunkStream: a reader of items an async generator produces in a sandbox's loop, for every host.

``for item in stream`` (threads), ``async for item in stream`` (trio or asyncio) and ``close()``.
Each step is one OperationRef in the sandbox's ``TaskHost``, so the generator always runs in the
loop that owns the sandbox, whichever host iterates; items are taken one at a time, so memory is
whatever the generator holds (the log and file-streaming readers hold one chunk). A step that
fails ends the stream with that error; a cancelled ``async for`` cancels the step and closes the
stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from .opref import OperationRef, TaskHost, check_not_in_trio

T = TypeVar("T")

__all__ = ["ChunkStream"]


class ChunkStream(Generic[T]):
    """Items of ``produce()`` (an async generator function), read one step at a time."""

    def __init__(self, host: Callable[[], TaskHost], produce: Callable[[], AsyncIterator[T]], what: str) -> None:
        self._host = host
        self._produce = produce
        self._gen: AsyncIterator[T] | None = None
        self._what = what
        self._done = False

    def __repr__(self) -> str:
        return f"<ChunkStream {self._what} {'ended' if self._done else 'open'}>"

    async def _step(self) -> tuple[T] | None:
        if self._done:
            return None
        if self._gen is None:
            self._gen = self._produce()
        try:
            return (await self._gen.__anext__(),)
        except StopAsyncIteration:
            self._done = True
            return None
        except BaseException:
            self._done = True
            await self._aclose()
            raise

    async def _aclose(self) -> None:
        self._done = True
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()  # type: ignore[attr-defined]  # produce() is an async generator function

    def __iter__(self) -> ChunkStream[T]:
        return self

    def __next__(self) -> T:
        check_not_in_trio(f"iterating {self._what}", f"'async for item in {self._what}'")
        item = OperationRef.spawn(self._host(), self._step).result()
        if item is None:
            raise StopIteration
        return item[0]

    def __aiter__(self) -> ChunkStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            item = await OperationRef.spawn(self._host(), self._step)
        except BaseException:
            if not self._done:
                self.close()
            raise
        if item is None:
            raise StopAsyncIteration
        return item[0]

    def close(self) -> OperationRef[None]:
        """End the stream early and release what its producer holds; idempotent."""
        if self._done and self._gen is None:
            return OperationRef.completed(None)
        self._done = True
        return OperationRef.spawn(self._host(), self._aclose)
