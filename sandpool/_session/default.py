"""The default sessions: the hidden owners of sandboxes made outside any session.

``Sandbox.run()``, ``Sandbox(...)``, and the lookups by id or tag without a session use one hidden
session per server address (``address``, else ``$SANDPOOL_ADDRESS``), and one for this machine.
Each holds a share of the background portal (``background``) like any sync session. They close,
stopping their sandboxes, at interpreter exit (:func:`close_all`, registered with atexit on first
use) or when called; a sandbox's ``with`` block stops it earlier. A process that ends without
running atexit hooks still takes its sandboxes with it (they notice their owner's death).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from .._core.opref import TaskHost
from . import background
from . import shared as _shared
from .session import Session

__all__ = ["close_all", "default_host", "default_session"]

_SESSIONS: dict[tuple[str | None, str | None], Session] = {}
_LOCK = threading.Lock()
_ATEXIT = [False]


def default_session(address: str | None = None, token: str | None = None) -> Session:
    """The hidden session for ``address`` (else ``$SANDPOOL_ADDRESS``, else this machine), made on first use,
    and again once the last one closed or lost its server."""
    key = (_shared.resolve_address(address), token)
    with _LOCK:
        session = _SESSIONS.get(key)
        if session is None or not session._reusable():
            session = _SESSIONS[key] = Session(address=key[0], token=token)
        if not _ATEXIT[0]:
            background.register_exit_hook()  # first, so that close_all runs before it at exit
            atexit.register(close_all)
            _ATEXIT[0] = True
        return session


def default_host(address: str | None = None, token: str | None = None) -> TaskHost:
    """The task host of the hidden session for ``address``, opening it if needed."""
    return default_session(address, token)._ensure_open()


def close_all() -> None:
    """Close every default session (stopping its sandboxes) and let the background portal go."""
    with _LOCK:
        sessions = list(_SESSIONS.values())
        _SESSIONS.clear()
    for session in sessions:
        try:
            session.__exit__(None, None, None)
        except Exception:  # one failed close must not keep the others open
            logging.getLogger("sandpool").warning("closing a default session failed", exc_info=True)


def _forget_after_fork() -> None:
    # A forked child does not own its parent's sandboxes, and the lock may have been held at the fork.
    global _LOCK
    _SESSIONS.clear()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
