"""Where the call worker pickles a result: memory, or a file once the result is large.

A result at least ``BULK_BYTES`` long, in a call that offers a ``bulk`` directory (see
``sandpool._functions.bulk``), is written to a file there and the answer names the file, so a large
result is not copied through the frames. Stdlib only.
"""

from __future__ import annotations

import os

#: A result at least this large goes to a file when the call offers a ``bulk`` directory.
BULK_BYTES = 512 * 1024


class Spool:
    """Where a result is pickled: memory, until it reaches BULK_BYTES in a call that offers a
    ``bulk`` directory; from then on a file there (large buffers are written to it uncopied)."""

    def __init__(self, directory: str | None, call_id: int) -> None:
        self.directory, self.call_id = directory, call_id
        self.chunks: list[bytes] = []
        self.size = 0
        self.fd: int | None = None
        self.path = ""

    def write(self, data) -> int:
        data = memoryview(data).cast("B")  # the pickler also hands over PickleBuffers (numpy arrays)
        n = data.nbytes
        if self.fd is None:
            if self.directory is None or self.size + n < BULK_BYTES:
                self.chunks.append(bytes(data))
                self.size += n
                return n
            try:
                self.path = os.path.join(self.directory, f".sandpool-r-{os.getpid()}-{self.call_id}")
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except OSError:  # no room or no directory: keep it in memory
                self.directory = None
                return self.write(data)
            for chunk in self.chunks:
                self._write_all(chunk)
            self.chunks = []
        self._write_all(data)
        return n

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]  # type: ignore[arg-type]

    def close(self) -> str:
        os.close(self.fd)  # type: ignore[arg-type]
        self.fd = -1  # closed; discard() still removes the file
        return self.path

    def discard(self) -> None:
        if self.fd is not None:
            if self.fd >= 0:
                os.close(self.fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass
