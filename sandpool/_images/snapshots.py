"""The snapshot store: sandboxes' writable layers, kept like image layers, beside them.

Under ``<image store>/.oci/snapshots/`` (mode 0700: what sandboxes wrote, on the host's disk):
``layers/<hex>/`` (one captured layer per content digest, however many snapshots name it: ``upper``,
the sandbox's overlay upper layer, and ``root``, the host image's root tree; it appears there only
complete, by rename), ``records/<id>.json`` (one per snapshot id: its layers top first, the image
it was taken of, the base layers under them, the sandbox it came from, sizes) and ``tmp/`` (copies
in progress, swept by ``prune``). ``locks/<hex>.lock`` is held shared for every sandbox running on
a layer (by its runtime, in the client: never by the agent, whose descriptors the sandbox could
reopen), so ``delete`` removes a layer only when no record names it and no sandbox runs on it; a
later ``delete`` or ``prune`` removes what was busy.

A restore stacks the snapshot's layers over the image's lower layers, under a new upper layer of
its own: N restores store the snapshot once. Stdlib only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
from typing import Any
from collections.abc import Iterator

from .._ids import SNAPSHOT_ID as ID_PATTERN, check_snapshot_id as check_id
from .errors import ImageError
from .store import read_records

SNAPSHOTS_DIR = os.path.join(".oci", "snapshots")
_HEX = re.compile(r"[0-9a-f]{64}")


class SnapshotNotFound(ImageError):
    """No snapshot has this id (never taken, or deleted)."""


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """One snapshot: its layers (top first), what it was taken of, and what it cost."""

    snapshot_id: str
    layers: tuple[str, ...]
    image: str
    base_lower: str  # the image's lower dirs under the layers (":"-separated, top first)
    view: bool  # taken of the host image: each layer has a ``root`` part too
    source_sandbox_id: str
    trigger: str  # "manual" or "on_delete" (snapshot_on_stop)
    created: float
    size_bytes: int  # of its top layer (the others belong to the snapshots it was restored from)
    seconds: float  # how long the capture took

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


class SnapshotStore:
    def __init__(self, image_store: str) -> None:
        self.base = os.path.join(image_store, SNAPSHOTS_DIR)

    def __repr__(self) -> str:
        return f"<SnapshotStore {self.base}>"

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def ensure(self) -> None:
        os.makedirs(self.base, mode=0o700, exist_ok=True)
        os.chmod(self.base, 0o700)
        for sub in ("layers", "records", "tmp", "locks"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)

    # -- layers ----------------------------------------------------------------------------

    def layer_part(self, digest: str, part: str) -> str:
        """The ``upper`` or ``root`` directory of layer ``digest`` (hex)."""
        if not _HEX.fullmatch(digest):
            raise ValueError(f"a snapshot layer is 64 hex digits, got {digest!r}")
        return self.path("layers", digest, part)

    def lock_path(self, digest: str) -> str:
        return self.path("locks", f"{digest}.lock")

    def new_work_dir(self) -> str:
        self.ensure()
        return self.path("tmp", f"{os.getpid()}-{secrets.token_hex(6)}")

    def commit_layer(self, digest: str, work: str, size: int) -> None:
        """Move a finished copy ``work`` (holding ``upper`` and maybe ``root``) to layer ``digest``;
        if that layer is stored already, the copy is dropped (the same content, kept once)."""
        with open(os.path.join(work, "layer.json"), "w") as f:
            json.dump({"size": size}, f)
        with open(self.lock_path(digest), "a"):
            pass
        final = self.path("layers", digest)
        try:
            os.rename(work, final)
        except OSError:  # there already (ENOTEMPTY/EEXIST): same digest, same content
            shutil.rmtree(work, ignore_errors=True)

    def has_layer(self, digest: str) -> bool:
        return os.path.isdir(self.path("layers", digest, "upper"))

    # -- records ---------------------------------------------------------------------------

    def _record_path(self, snapshot_id: str) -> str:
        return self.path("records", check_id(snapshot_id) + ".json")

    def save(self, record: SnapshotRecord) -> None:
        self.ensure()
        path = self._record_path(record.snapshot_id)
        staging = f"{path}.{os.getpid()}.tmp"
        with open(staging, "w") as f:
            json.dump(record.to_json(), f, indent=1)
        os.rename(staging, path)

    def get(self, snapshot_id: str) -> SnapshotRecord:
        """The record of ``snapshot_id`` (ValueError if malformed, SnapshotNotFound if absent)."""
        try:
            with open(self._record_path(snapshot_id)) as f:
                record = _record(json.load(f))
        except FileNotFoundError:
            record = None
        except (OSError, ValueError) as exc:
            if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError):
                raise
            record = None
        if record is None:
            raise SnapshotNotFound(f"snapshot {snapshot_id!r} does not exist in {self.base} (deleted, or taken "
                                   f"with another image store); list them with 'sandpool snapshots ls'")
        return record

    def records(self) -> list[SnapshotRecord]:
        return sorted(read_records(self.path("records", "*.json"), _record), key=lambda r: r.created)

    def delete(self, snapshot_id: str) -> bool:
        """Remove the record (False if there was none) and the layers nothing uses any more."""
        try:
            os.unlink(self._record_path(snapshot_id))
        except FileNotFoundError:
            return False
        self.prune()
        return True

    def prune(self) -> list[str]:
        """Remove layers no record names and no sandbox runs on, and stale copies; their digests."""
        removed = []
        used = {d for r in self.records() for d in r.layers}
        for path in glob.glob(self.path("layers", "*")):
            digest = os.path.basename(path)
            if digest in used or not _HEX.fullmatch(digest):
                continue
            with _try_exclusive(self.lock_path(digest)) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(digest)
        self.sweep()
        return removed

    def sweep(self) -> None:
        """Remove copies in progress whose process is gone (a client killed during a snapshot)."""
        for stale in glob.glob(self.path("tmp", "*")):
            pid = os.path.basename(stale).split("-", 1)[0]
            if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(stale, ignore_errors=True)

    def layer_size(self, digest: str) -> int:
        try:
            with open(self.path("layers", digest, "layer.json")) as f:
                return int(json.load(f).get("size", 0))
        except (OSError, ValueError, TypeError):
            return 0


@contextlib.contextmanager
def _try_exclusive(path: str) -> Iterator[bool]:
    """Yield True while holding ``path``'s lock exclusively, False if a sandbox holds it shared."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


def new_id() -> str:
    return f"snap-{secrets.token_hex(8)}"


def _record(data: object) -> SnapshotRecord | None:
    if not isinstance(data, dict):
        return None
    try:
        record = SnapshotRecord(**{f.name: data[f.name] for f in dataclasses.fields(SnapshotRecord)})
    except (KeyError, TypeError):
        return None
    if not ID_PATTERN.fullmatch(str(record.snapshot_id)) or not all(_HEX.fullmatch(str(d)) for d in record.layers):
        return None
    return dataclasses.replace(record, layers=tuple(record.layers))
