"""What the functions layer needs from the layers around it, as small protocols, and the registry of
a session's pools.

The functions layer sits below the session: it never imports it. A session hands its pools a
sandbox factory (``SandboxFactory``: makes and starts a sandbox for a spec, and returns it as a
``PoolSandbox``) and a task host (anything with ``start_soon``: the session's ``TaskHost``, or a
trio nursery in a test). Its remote functions reach the session through ``FunctionHost``, which
``Pools`` implements from three callables the session gives it.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from .._errors import SandboxError
from .pool import Pool, PoolStatistics

if TYPE_CHECKING:
    from .._config import SandboxDefaults, SandboxSpec
    from .._core.opref import TaskHost
    from .pool import PoolSandbox


class FunctionHost(Protocol):
    """What a RemoteFunction needs of its session."""

    @property
    def defaults(self) -> SandboxDefaults: ...

    def pool_for(self, spec: SandboxSpec, limit: int, reuse: bool) -> Pool:
        """The warm pool for this spec, limit and reuse flag; SandboxError once the session closed."""
        ...

    def loop(self) -> TaskHost:
        """The session's task host (opening the session on first use)."""
        ...


SandboxFactory: TypeAlias = Callable[["SandboxSpec"], Awaitable["PoolSandbox"]]


class Pools:
    """A session's warm pools, one per (spec, limit, reuse); its remote functions' ``FunctionHost``.

    ``loop()`` opens the session and returns its TaskHost; ``factory`` makes and starts a sandbox
    the session owns (and stops when it closes); ``closed()`` tells whether the session has closed.
    """

    def __init__(self, defaults: SandboxDefaults, loop: Callable[[], TaskHost], factory: SandboxFactory,
                 closed: Callable[[], bool]) -> None:
        self._defaults = defaults
        self._loop, self._factory, self._closed = loop, factory, closed
        self.pools: dict[tuple[Any, ...], Pool] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Pools {len(self.pools)} pools>"

    @property
    def defaults(self) -> SandboxDefaults:
        return self._defaults

    def loop(self) -> TaskHost:
        return self._loop()

    def pool_for(self, spec: SandboxSpec, limit: int, reuse: bool) -> Pool:
        if self._closed():
            raise SandboxError("this session is closed; open a new Session to call remote functions")
        key = (spec, limit, reuse)
        pool = self.pools.get(key)
        if pool is None:
            with self._lock:
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = Pool(self, self._factory, spec, limit, reuse)
        return pool

    def start_soon(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """The pools' task host: the session's, opened on first use (a pool may exist before)."""
        self._loop().start_soon(async_fn, *args)

    def statistics(self) -> PoolStatistics:
        """The counters of every pool, added up (safe from any thread)."""
        total = PoolStatistics()
        for pool in list(self.pools.values()):
            total = total + pool.statistics()
        return total

    def close(self) -> None:
        """The session is closing: every pool cancels its calls (loop thread)."""
        for pool in list(self.pools.values()):
            pool.close()
