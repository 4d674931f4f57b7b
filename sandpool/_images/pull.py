"""Pull an image: resolve its reference to a manifest for this platform, fetch and unpack each layer
once into the layer store, and record the image. Blocking; safe to run from many threads and
processes at once (one fetch per reference and per layer)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import time

from . import manifest, reference
from .errors import ImageError
from .registry import Client
from .store import ImageRecord, Store

log = logging.getLogger("sandpool")
#: Layers fetched and unpacked at once.
PARALLEL_LAYERS = 3


class Progress:
    """What a pull reports; the default does nothing (the CLI draws bars)."""

    def layer(self, digest: str, size: int, cached: bool) -> None:
        """A layer of the image: ``cached`` when the store has it already."""

    def advance(self, digest: str, nbytes: int) -> None:
        """``nbytes`` more of ``digest`` downloaded."""

    def unpacking(self, digest: str) -> None:
        """``digest`` is downloaded and verified; unpacking it now."""

    def done(self, digest: str) -> None:
        """``digest`` is in the store."""


def pull(name: str, base: str, credentials: tuple[str, str] | None = None, progress: Progress | None = None,
         platform: tuple[str, str, str | None] | None = None, refresh: bool = True) -> ImageRecord:
    """Pull ``name`` into the store at ``base`` and return its record.

    ``refresh=False`` returns a stored record without asking the registry (what a sandbox start does);
    ``refresh=True`` asks the registry for the tag's current manifest (layers already stored are not
    fetched again). Raises ImageError saying what failed and what to do.
    """
    ref = reference.parse(name)
    store = Store(base)
    store.ensure()
    key = "ref-" + hashlib.sha256(str(ref).encode()).hexdigest()[:32]
    with store.lock("store", shared=True), store.lock(key):
        cached = store.record(str(ref))
        if cached is not None and not refresh and all(store.has_layer(d) for d in cached.layers):
            return cached
        started = time.monotonic()
        log.info("pulling image %s", ref)
        record, fetched = _pull(ref, name, store, credentials, progress or Progress(), platform)
        store.save(record)
        log.info("pulled image %s (%s, %d layers, %.1f MiB downloaded, %.1f MiB unpacked) in %.1f s", ref,
                 record.digest[:19], len(record.layers), fetched / 2**20, record.size_bytes / 2**20,
                 time.monotonic() - started)
        return record


def _pull(ref: reference.Reference, name: str, store: Store, credentials: tuple[str, str] | None, progress: Progress,
          platform: tuple[str, str, str | None] | None) -> tuple[ImageRecord, int]:
    client = Client(ref, credentials)
    document, digest = client.manifest(ref.ref)
    where = str(ref)
    if document["mediaType"] in manifest.INDEXES:
        chosen = manifest.pick(document, where, platform)
        document, _ = client.manifest(chosen.digest)
        if document["mediaType"] not in manifest.MANIFESTS:
            raise ImageError(f"{where}: the index entry {chosen.digest} is not an image manifest")
        digest = chosen.digest  # the image's own digest, what 'ref@digest' names on this platform
    config_descriptor, layers = manifest.layers(document, where)
    if not layers:
        raise ImageError(f"{where}: the image has no layers; sandpool needs at least one to build a root")
    config_blob = client.config(config_descriptor)
    settings = manifest.runtime_config(config_blob, where)
    expected = dict(zip(layers, manifest.diff_ids(config_blob, where, len(layers))))
    for layer in layers:
        progress.layer(layer.digest, layer.size, store.has_layer(layer.digest))
    fetched = 0
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_LAYERS, thread_name_prefix="sandpool-pull") as pool:
        futures = [pool.submit(_layer, client, store, layer, expected[layer], progress)
                   for layer in dict.fromkeys(layers)]
        for future in futures:
            fetched += future.result()
    sizes = tuple(store.unpacked_size(layer.digest) for layer in layers)
    record = ImageRecord(
        name=name, reference=str(ref), digest=digest, layers=tuple(layer.digest for layer in layers), sizes=sizes,
        env=tuple(settings.pop("env")), working_dir=settings.pop("working_dir"),
        config={**settings, "config_digest": config_descriptor.digest}, pulled=time.time())
    return record, fetched


def _layer(client: Client, store: Store, layer: manifest.Descriptor, diff_id: str, progress: Progress) -> int:
    """Fetch and unpack ``layer`` unless the store has it; the bytes downloaded. Its uncompressed
    digest must be ``diff_id`` (the config's); a layer that is not is removed before any image
    record names it."""
    with store.lock("layer-" + layer.digest.replace(":", "-")):
        if store.has_layer(layer.digest):
            stored = store.diff_id(layer.digest)
            if stored is not None and stored != diff_id:
                raise _mismatch(client, layer, diff_id, stored)
            progress.done(layer.digest)
            return 0
        blob = store.temp(layer.digest, "blob")
        unpacked = store.temp(layer.digest, "unpack")
        try:
            with open(blob, "wb") as out:
                client.blob(layer.digest, layer.size, out, lambda n: progress.advance(layer.digest, n))
            progress.unpacking(layer.digest)
            os.makedirs(os.path.join(unpacked, "root"), mode=0o755)
            try:
                size, got = store.unpack(blob, manifest.LAYERS[layer.media_type], os.path.join(unpacked, "root"))
            except ImageError as exc:
                raise ImageError(f"{client.ref}: layer {layer.digest}: {exc}") from None
            if got != diff_id:
                raise _mismatch(client, layer, diff_id, got)
            store.commit_layer(layer.digest, unpacked, {"digest": layer.digest, "media_type": layer.media_type,
                                                        "compressed": layer.size, "size": size, "diff_id": got})
        finally:
            store.remove_trees([unpacked, blob])
        progress.done(layer.digest)
        return layer.size


def _mismatch(client: Client, layer: manifest.Descriptor, expected: str, got: str) -> ImageError:
    return ImageError(f"{client.ref}: layer {layer.digest} unpacks to {got}, but the image config's rootfs.diff_ids "
                      f"says {expected}; the image is corrupt or forged, refusing it (nothing of it is kept)")


def find(name: str, base: str) -> ImageRecord | None:
    """The stored record of ``name`` (no network), or None."""
    try:
        ref = reference.parse(name)
    except ImageError:
        return None
    return Store(base).record(str(ref))

