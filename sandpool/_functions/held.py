"""Large results held by the client as encoded bytes, decoded only when asked: the same-host
shortcut for references between calls.

A large result of a local sandbox arrives as a file in that sandbox's /tmp (see ``bulk``). When
its ref was passed to another call before the answer came (``CallRef.forwarded``), the client
copies the file (in the kernel) into a memfd of its own and seals it (no write, no resize, no
further seals), so nothing in any sandbox can change or name it, then maps the memfd read-only:
that mapping is the ``Held`` value its ref keeps. ``ref.result()`` decodes it there (plain data,
as always: see ``serialize``) and keeps the value. Passed as an argument to another call
(``g.remote(f.remote())``), a Held is not decoded here: it pickles as ``plain.decode(<its encoded
bytes>)``, its bytes taken from the mapping uncopied (``serialize``'s parts), so the consumer's
worker decodes it; into a local sandbox the argument file carries the bytes (``bulk.put_args``).
The value crosses the client as one kernel copy in and one write out, never as Python objects.

Only plain results are held; a function with ``unsafe_pickle_results`` decodes its results at once.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
from typing import Any

from _sandpool_agent import plain as _plain

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class SealedMap(mmap.mmap):
    """A read-only mapping of a sealed memfd of this process: its bytes cannot change, so they
    may be handed on without a copy."""


class Held:
    """A result's encoded bytes (plain codec), held in a sealed memfd's mapping."""

    __slots__ = ("mapping", "size", "__weakref__")

    def __init__(self, mapping: SealedMap, size: int) -> None:
        self.mapping, self.size = mapping, size

    def __repr__(self) -> str:
        return f"<Held result of {self.size} encoded bytes>"

    def decode(self) -> Any:
        """The value (``_plain.Malformed`` if the bytes are not a payload)."""
        return _plain.decode(memoryview(self.mapping))

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickled where the call runs: the sandbox's own plain decoder, over these bytes.
        return _plain.decode, (pickle.PickleBuffer(self.mapping),)


def hold(fd: int, size: int) -> Held:
    """Copy the ``size`` bytes of the regular file ``fd`` (a result file the client opened) into a
    new sealed memfd and map it. OSError if the copy fails or comes up short (the file's writer
    truncated it): the caller treats that as an unreadable result."""
    memfd = os.memfd_create("sandpool-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        copied = 0
        while copied < size:
            n = os.sendfile(memfd, fd, copied, size - copied)
            if n == 0:
                raise OSError(f"the result file ended after {copied} of {size} bytes")
            copied += n
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
        if size == 0:
            raise OSError("an empty result file")  # a payload is never empty
        # Populated now: handed on, the bytes are read at once in full (faulting them in page by
        # page cost more than the copy).
        return Held(SealedMap(memfd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ), size)
    finally:
        os.close(memfd)  # the mapping keeps what it maps


def is_sealed(buffer: pickle.PickleBuffer) -> bool:
    """Whether ``buffer`` (what a pickler hands its file) is a Held's bytes: unchangeable, so a
    pickle may keep it uncopied."""
    return type(buffer.raw().obj) is SealedMap
