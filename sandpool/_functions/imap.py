"""Streaming maps: ``f.imap`` / ``f.starmap`` results, pulled lazily with bounded work in flight.

A ``ResultStream`` is both a sync iterator (``for``; blocks the consuming thread) and an async one
(``async for`` inside trio). Inputs are pulled from the source only to keep the window full: when
half of ``max_in_flight`` is free it is refilled in one go, so a stream over ``itertools.count()``
pulls at most ``max_in_flight`` inputs beyond what the consumer took. The window's pickled
arguments are bounded too (``MAX_IN_FLIGHT_BYTES``): pulling stops once they reach it. Stopping early (``break``,
``close()``, an exception, leaving a cancel scope) cancels every call still in flight.
"""

from __future__ import annotations

import collections
import queue
import sys
from collections.abc import AsyncIterable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._core.hosts import HostEvent, checkpoint
from .._core.opref import OperationCancelled, OperationRef, check_not_in_trio
from .pool import MAX_IN_FLIGHT_BYTES, Call, CallRef, in_flight_bound

if TYPE_CHECKING:
    from .function import Caller

R = TypeVar("R")


class ResultStream(Generic[R]):
    """Results of ``f.imap``/``f.starmap``. ``pulled`` counts the inputs taken from the source."""

    def __init__(self, calls: Caller, source: Iterable[Any] | AsyncIterable[Any], *, star: bool, ordered: bool,
                 max_in_flight: int | None, return_exceptions: bool, progress: bool) -> None:
        if max_in_flight is not None and (isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
                                          or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an int >= 1 or None, got {max_in_flight!r}")
        if not (hasattr(source, "__iter__") or hasattr(source, "__aiter__")):
            raise TypeError(f"{calls.name}.{'starmap' if star else 'imap'}() needs an iterable, "
                            f"got {type(source).__name__} {source!r}")
        self._calls = calls
        self._pool = calls.pool()
        calls.payload()  # an unpicklable function fails here, before any input is pulled
        self._source: Any = source  # sync or async: which one is asked with hasattr
        self._iter: Any = None
        self._star = star
        self._ordered = ordered
        self._limit = max_in_flight or in_flight_bound(calls.limit)
        self._return_exceptions = return_exceptions
        self._window: collections.deque[CallRef] = collections.deque()  # submitted, not yet yielded
        self._sizes: dict[CallRef, int] = {}  # argument bytes of the window's calls
        self._bytes = 0  # their sum
        self._events = _Events(keep=not ordered)  # what the refs' done callbacks see: never the stream itself
        self._exhausted = False
        self._closed = False
        self.pulled = 0
        self._bar = _progress_bar(calls.name, _length(source)) if progress else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "exhausted" if self._exhausted else "open"
        return f"<ResultStream of {self._calls.name} {state} pulled={self.pulled} in_flight={len(self._window)}>"

    # -- filling the window ----------------------------------------------------------------------

    def _wants_more(self) -> bool:
        return not self._exhausted and len(self._window) <= self._limit // 2 and self._has_room()

    def _has_room(self) -> bool:
        return len(self._window) < self._limit and (not self._window or self._bytes < MAX_IN_FLIGHT_BYTES)

    def _take(self, item: Any, calls: list[Call]) -> None:
        """Turn one pulled input into a call (into ``calls``, submitted by the caller) and its ref
        into the window."""
        maker = self._calls
        ref = maker.new_ref()
        call = None
        if self._star and not isinstance(item, (tuple, list)):
            ref.set_error(TypeError(f"each item of {maker.name}.starmap() is a tuple of arguments, "
                                    f"got {type(item).__name__} {item!r}; use imap() for single values"))
        else:
            call = maker.call(self._pool, ref, tuple(item) if self._star else (item,), {})
        if call is not None:
            calls.append(call)
            self._sizes[ref] = call.size
            self._bytes += call.size
        self.pulled += 1
        self._window.append(ref)
        ref.add_done_callback(self._events.on_done)

    def _fill_sync(self) -> None:
        if not self._wants_more():
            return
        if self._iter is None:
            self._iter = iter(self._source)
        calls: list[Call] = []
        try:
            while self._has_room():
                try:
                    item = next(self._iter)
                except StopIteration:
                    self._exhausted = True
                    break
                self._take(item, calls)
        finally:
            self._calls.submit(self._pool, calls)

    async def _fill_async(self) -> None:
        if not self._wants_more():
            return
        if self._iter is None:
            self._iter = aiter(self._source) if hasattr(self._source, "__aiter__") else iter(self._source)
        calls: list[Call] = []
        try:
            while self._has_room():
                try:
                    item = await anext(self._iter) if hasattr(self._iter, "__anext__") else next(self._iter)
                except (StopIteration, StopAsyncIteration):
                    self._exhausted = True
                    break
                self._take(item, calls)
        finally:
            self._calls.submit(self._pool, calls)

    # -- taking results --------------------------------------------------------------------------

    def _unwrap(self, ref: OperationRef[R]) -> R:
        """The finished ref's value; its exception is yielded (return_exceptions) or closes the stream."""
        try:
            value: Any = ref.result()  # finished: answers at once
        except Exception as exc:
            if not self._return_exceptions:
                self.close()
                raise
            value = exc
        if self._bar is not None:
            self._bar.update(1)
        return value  # type: ignore[no-any-return]  # an exception, with return_exceptions=True

    def _pop(self, ref: CallRef) -> None:
        if self._ordered:
            self._window.popleft()
        else:
            self._window.remove(ref)
        self._bytes -= self._sizes.pop(ref, 0)

    def __iter__(self) -> ResultStream[R]:
        return self

    def __next__(self) -> R:
        check_not_in_trio("iterating a ResultStream with 'for'", "'async for'")
        if self._closed:
            raise StopIteration
        try:
            self._fill_sync()
            if not self._window:
                self.close()
                raise StopIteration
            if self._ordered:
                ref = self._window[0]
                _block(ref)
            else:
                ref = self._events.get()
            self._pop(ref)
        except BaseException:
            self.close()
            raise
        return self._unwrap(ref)

    def __aiter__(self) -> ResultStream[R]:
        return self

    async def __anext__(self) -> R:
        if self._closed:
            raise StopAsyncIteration
        try:
            await self._fill_async()
            if not self._window:
                self.close()
                raise StopAsyncIteration
            if self._ordered:
                ref = self._window[0]
                await self._events.wait(ref.done)
            else:
                finished = self._events.finished
                await self._events.wait(lambda: not finished.empty())
                ref = finished.get_nowait()
            self._pop(ref)
        except BaseException:
            self.close()
            raise
        return self._unwrap(ref)

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel every call still in flight and stop pulling inputs. Idempotent, thread-safe."""
        if self._closed:
            return
        self._closed = True
        window, self._window = self._window, collections.deque()
        self._sizes.clear()
        for ref in window:
            ref.cancel()
        if self._bar is not None:
            self._bar.close()

    async def aclose(self) -> None:
        self.close()
        await checkpoint()

    def __enter__(self) -> ResultStream[R]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> ResultStream[R]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # a consumer that breaks out of its loop drops the stream: stop its calls
        try:
            self.close()
        except Exception:
            pass


class _Events:
    """Finished refs and the async waiter's wake-up: what done callbacks hold instead of the stream,
    so a stream dropped by its consumer is collected (and its calls cancelled) at once."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep  # queue finished refs (unordered streams take them in that order)
        self.finished: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.waiter: Any = None

    def get(self) -> Any:
        """The next finished ref, blocking this thread (in short slices, so Ctrl-C lands)."""
        while True:
            try:
                return self.finished.get(timeout=0.1)
            except queue.Empty:
                pass

    def on_done(self, ref: OperationRef[Any]) -> None:
        if self.keep:
            self.finished.put(ref)
        waiter = self.waiter
        if waiter is not None:
            waiter()

    async def wait(self, ready: Any) -> None:
        """Wait until ``ready()`` is true (checked after each finished call); from trio or asyncio."""
        while not ready():
            event = HostEvent()
            self.waiter = event.set
            try:
                if ready():
                    break
                await event.wait()
            finally:
                self.waiter = None
        await checkpoint()


def _block(ref: OperationRef[Any]) -> None:
    """Block this thread until ``ref`` finishes, however it ends."""
    try:
        ref.exception()
    except OperationCancelled:
        pass


def _length(source: object) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]  # any object: len() tells whether it has a length
    except TypeError:
        return None


def _progress_bar(name: str, total: int | None) -> Any:
    """A tqdm bar, or None (with one line of advice) when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]  # typed in some tqdm versions only
    except ImportError:
        print("sandpool: progress=True needs tqdm ('pip install sandpool[progress]'); "
              "running without a progress bar", file=sys.stderr)
        return None
    return tqdm(total=total, desc=name, unit="call")


def progress_for_refs(refs: list[CallRef], name: str) -> None:
    """Advance a progress bar as ``refs`` finish (callbacks run in the loop thread)."""
    bar = _progress_bar(name, len(refs))
    if bar is None:
        return
    left = [len(refs)]

    def on_done(_ref: OperationRef[Any]) -> None:
        bar.update(1)
        left[0] -= 1
        if not left[0]:
            bar.close()

    for ref in refs:
        ref.add_done_callback(on_done)
