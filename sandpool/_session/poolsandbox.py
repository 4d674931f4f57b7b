"""A session's sandbox as its remote-function pools see it: the functions layer's ``PoolSandbox``.

The functions layer does not know the Sandbox class (it sits below the session); the session's
sandbox factory hands it this view instead: request ids routed to handlers, frames sent to the
agent, stop, and the two ways to reach a direct worker (the bulk directory, a server's connector).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._functions import bulk as _bulk

if TYPE_CHECKING:
    from .sandbox import Sandbox


class PoolMember:
    """A started sandbox of a pool (``sandbox``), with the methods a pool's slot uses."""

    __slots__ = ("sandbox", "bulk_dir", "connect_worker", "register", "unregister", "send", "send_many")

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        link = sandbox.link
        record = link.record()
        self.bulk_dir = _bulk.host_dir(record)
        self.connect_worker: Any = record.connect_worker if record is not None else None
        # the sandbox's connection methods, bound once: a pool calls them per remote call
        self.register, self.unregister = link.register, link.unregister
        self.send, self.send_many = link.send, link.send_many

    def __repr__(self) -> str:
        return f"<PoolMember {self.sandbox!r}>"

    @property
    def sandbox_id(self) -> str | None:
        return self.sandbox.sandbox_id

    def stop(self, *, graceful_shutdown_seconds: float) -> Any:
        return self.sandbox.stop(graceful_shutdown_seconds=graceful_shutdown_seconds)
