"""The content-addressed layer store, shared by every image pulled from a registry.

Under ``<image store>/.oci/``: ``layers/<algorithm>/<hex>/root`` (one unpacked layer per digest,
however many images use it; a directory appears there only complete, by rename), ``images/<key>.json``
(one record per reference: manifest digest, layer digests bottom first, the config's Env and
WorkingDir), ``tmp/`` (downloads and unpacks in progress, swept by the next pull of the same layer) and
``locks/`` (``fcntl`` locks: one per layer and one per reference, so concurrent pulls of one image
fetch it once; pulls hold ``store.lock`` shared, ``prune`` exclusive).

An ordinary user's tree is ``.oci-rootless[-<id ranges>]/`` instead, one per id map, unpacked and
removed in a user namespace (see ``rootless``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import rootless
from .errors import ImageError

T = TypeVar("T")

OCI_DIR = ".oci"
#: Bytes of overlayfs mount options (one page); the lowerdir list must fit with upper and work.
MAX_LOWERDIR = 3500


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A pulled image: what ``resolve`` needs to mount it and ``inspect`` shows."""

    name: str
    reference: str
    digest: str
    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    env: tuple[str, ...]
    working_dir: str
    config: dict[str, Any]
    pulled: float

    @property
    def size_bytes(self) -> int:
        return sum(self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers), "sizes": list(self.sizes),
                "env": list(self.env), "size_bytes": self.size_bytes}


class Store:
    def __init__(self, base: str) -> None:
        self.rootless = rootless.active()
        self.base = os.path.join(base, OCI_DIR + rootless.variant())

    def __repr__(self) -> str:
        return f"<Store {self.base}>"

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def ensure(self) -> None:
        for sub in ("layers", "images", "tmp", "locks"):
            os.makedirs(self.path(sub), mode=0o755, exist_ok=True)

    # -- layers ----------------------------------------------------------------------------

    def layer_dir(self, digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        return self.path("layers", algorithm, hexdigest)

    def layer_root(self, digest: str) -> str:
        return os.path.join(self.layer_dir(digest), "root")

    def has_layer(self, digest: str) -> bool:
        return os.path.isdir(self.layer_root(digest))

    def temp(self, digest: str, kind: str) -> str:
        """A fresh path for work on ``digest`` (``kind``: 'blob' or 'unpack'), after sweeping stale ones.

        Call with the layer's lock held: any older path of the same digest is a killed pull's leftover.
        """
        hexdigest = digest.partition(":")[2]
        self.remove_trees(glob.glob(self.path("tmp", f"{hexdigest}.{kind}.*")))
        return self.path("tmp", f"{hexdigest}.{kind}.{os.getpid()}")

    def remove_trees(self, paths: list[str]) -> None:
        """Remove files and trees of the store (a rootless store's from inside its user namespace,
        where the files of subordinate ids are removable)."""
        paths = [p for p in paths if os.path.lexists(p)]
        if self.rootless and any(os.path.isdir(p) for p in paths):
            rootless.remove(*paths)
            return
        for path in paths:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)

    def unpack(self, blob: str, compression: str, dest: str) -> tuple[int, str]:
        """Unpack a downloaded layer into the empty ``dest`` (see ``extract``); (bytes, diff_id)."""
        if self.rootless:
            return rootless.extract(blob, compression, dest)
        from . import extract

        return extract.extract(blob, compression, dest)

    def diff_id(self, digest: str) -> str | None:
        """The diff_id recorded for the stored layer ``digest`` (None for layers stored before)."""
        found = _layer_meta(self.layer_dir(digest)).get("diff_id")
        return found if isinstance(found, str) else None

    def unpacked_size(self, digest: str) -> int:
        """Bytes the stored layer ``digest`` unpacked to (0 if unknown)."""
        return _layer_size(self.layer_dir(digest))

    def commit_layer(self, digest: str, unpacked: str, meta: dict[str, Any]) -> None:
        """Move a finished unpack (``unpacked`` holds ``root``) into place, atomically."""
        with open(os.path.join(unpacked, "layer.json"), "w") as f:
            json.dump(meta, f)
        os.chmod(unpacked, 0o755)
        final = self.layer_dir(digest)
        os.makedirs(os.path.dirname(final), mode=0o755, exist_ok=True)
        os.rename(unpacked, final)

    def lowerdir(self, record: ImageRecord) -> str:
        """overlayfs's ``lowerdir`` for ``record``: its layers top first, ':'-separated."""
        roots = [self.layer_root(d) for d in reversed(record.layers)]
        missing = [d for d in record.layers if not self.has_layer(d)]
        if missing:
            raise ImageError(f"image {record.name!r} lacks layer {missing[0]} in {self.base} (pruned or removed); "
                             f"pull it again ('sandpool image pull {record.name}')")
        joined = ":".join(roots)
        if any(c in self.base for c in ":,\\") or len(joined) > MAX_LOWERDIR:
            raise ImageError(f"image {record.name!r}: its {len(roots)} layers under {self.base} do not fit an "
                             f"overlay mount (at most {MAX_LOWERDIR} bytes, no ':' or ','); use a shorter "
                             f"SANDPOOL_IMAGE_DIR or an image with fewer layers")
        return joined

    # -- images ----------------------------------------------------------------------------

    def _record_path(self, reference: str) -> str:
        return self.path("images", hashlib.sha256(reference.encode()).hexdigest()[:32] + ".json")

    def record(self, reference: str) -> ImageRecord | None:
        try:
            with open(self._record_path(reference)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return _record(data)

    def records(self) -> list[ImageRecord]:
        return sorted(read_records(self.path("images", "*.json"), _record), key=lambda r: r.reference)

    def save(self, record: ImageRecord) -> None:
        path = self._record_path(record.reference)
        staging = f"{path}.{os.getpid()}.tmp"
        with open(staging, "w") as f:
            json.dump(record.to_json(), f, indent=1)
        os.rename(staging, path)

    def remove(self, reference: str) -> bool:
        try:
            os.unlink(self._record_path(reference))
            return True
        except FileNotFoundError:
            return False

    # -- locks and prune --------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str, shared: bool = False) -> Iterator[None]:
        """An fcntl lock on ``locks/<key>.lock`` (blocking), released when the block ends."""
        self.ensure()
        fd = os.open(self.path("locks", f"{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def prune(self) -> list[tuple[str, int]]:
        """Remove layers no image record names, and leftovers of killed pulls; (digest, bytes) removed."""
        removed = []
        with self.lock("store"):
            used = {d for r in self.records() for d in r.layers}
            unused = []
            for path in glob.glob(self.path("layers", "*", "*")):
                algorithm, hexdigest = os.path.basename(os.path.dirname(path)), os.path.basename(path)
                digest = f"{algorithm}:{hexdigest}"
                if digest not in used:
                    removed.append((digest, _layer_size(path)))
                    unused.append(path)
            self.remove_trees(unused + glob.glob(self.path("tmp", "*")))
            for lock in glob.glob(self.path("locks", "*.lock")):
                if not lock.endswith("/store.lock"):
                    _unlink(lock)
        return removed


def _record(data: object) -> ImageRecord | None:
    if not isinstance(data, dict):
        return None
    try:
        return ImageRecord(name=data["name"], reference=data["reference"], digest=data["digest"],
                           layers=tuple(data["layers"]), sizes=tuple(data["sizes"]), env=tuple(data["env"]),
                           working_dir=data["working_dir"], config=data["config"], pulled=data["pulled"])
    except (KeyError, TypeError):
        return None


def _layer_meta(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "layer.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _layer_size(path: str) -> int:
    try:
        return int(_layer_meta(path).get("size", 0))
    except (ValueError, TypeError):
        return 0


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_records(pattern: str, parse: Callable[[object], T | None]) -> list[T]:
    """The records in the JSON files matching ``pattern`` that ``parse`` accepts; unreadable or
    malformed files are skipped (a store's records are written by rename, a reader never sees half)."""
    found = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                record = parse(json.load(f))
        except (OSError, ValueError):
            continue
        if record is not None:
            found.append(record)
    return found
