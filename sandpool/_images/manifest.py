"""Manifests: the media types we accept, and the choice of this machine's platform from an index."""

from __future__ import annotations

import dataclasses
import json
import platform
from typing import Any

from .errors import ImageError
from .reference import DIGEST

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join(INDEXES + MANIFESTS)
#: Layer media types and their compression.
LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
#: Go's names for this machine's architectures (what indexes use).
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
         "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_VARIANT = {"armv7l": "v7", "armv6l": "v6", "aarch64": "v8", "arm64": "v8"}


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, data: object, where: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageError(f"{where}: a descriptor must be an object, got {type(data).__name__}")
        digest, size, media = data.get("digest"), data.get("size"), data.get("mediaType", "")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ImageError(f"{where}: invalid digest {digest!r}")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{where}: invalid size {size!r}")
        return cls(str(media), digest, size)


def this_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine, in the names OCI indexes use."""
    machine = platform.machine().lower()
    return "linux", _ARCH.get(machine, machine), _VARIANT.get(machine)


def load(body: bytes, media_type: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ImageError(f"{where}: the manifest is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{where}: the manifest is not a JSON object")
    kind = data.get("mediaType") or media_type
    if kind not in INDEXES + MANIFESTS:
        kind = OCI_INDEX if "manifests" in data else OCI_MANIFEST if "layers" in data else kind
    if kind not in INDEXES + MANIFESTS:
        raise ImageError(f"{where}: unsupported manifest type {kind!r} (sandpool reads OCI and Docker v2 schema 2 "
                         f"manifests and indexes; schema 1 images must be re-pushed)")
    data["mediaType"] = kind
    return data


def pick(index: dict[str, Any], where: str, wanted: tuple[str, str, str | None] | None = None) -> Descriptor:
    """The manifest of ``wanted`` (default: this machine) in ``index``; ImageError listing what it has."""
    os_name, arch, variant = wanted or this_platform()
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{where}: the index has no manifests list")
    best: tuple[int, Descriptor] | None = None
    seen = []
    for i, entry in enumerate(entries):
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue
        seen.append("/".join(filter(None, (plat.get("os"), plat.get("architecture"), plat.get("variant")))))
        if plat.get("os") != os_name or plat.get("architecture") != arch:
            continue
        score = 2 if plat.get("variant") == variant else 1 if not plat.get("variant") else 0
        if arch == "arm" and score == 0:
            continue  # an armv7 image does not run on armv6
        if best is None or score > best[0]:
            best = (score, Descriptor.of(entry, f"{where} manifests[{i}]"))
    if best is None:
        have = ", ".join(seen) or "none"
        raise ImageError(f"{where} has no image for this machine's platform {os_name}/{arch} (it has: {have}); use "
                         f"an image built for {arch}")
    return best[1]


def layers(manifest: dict[str, Any], where: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config descriptor, layer descriptors bottom first) of an image manifest."""
    config = Descriptor.of(manifest.get("config"), f"{where} config")
    raw = manifest.get("layers")
    if not isinstance(raw, list) or len(raw) > 500:
        raise ImageError(f"{where}: the manifest's layers must be a list of at most 500 layers")
    found = [Descriptor.of(layer, f"{where} layers[{i}]") for i, layer in enumerate(raw)]
    for layer in found:
        if layer.media_type not in LAYERS:
            raise ImageError(f"{where}: layer {layer.digest} has media type {layer.media_type!r}, which sandpool "
                             f"cannot unpack (it reads {', '.join(sorted(LAYERS))})")
    return config, found


def runtime_config(config_blob: bytes, where: str) -> dict[str, Any]:
    """The parts of an image config a sandbox uses: Env (list of K=V), WorkingDir, and the rest for inspect."""
    try:
        data = json.loads(config_blob)
    except ValueError as exc:
        raise ImageError(f"{where}: the image config is not JSON ({exc})") from None
    conf = data.get("config") if isinstance(data, dict) else None
    conf = conf if isinstance(conf, dict) else {}
    env = [e for e in conf.get("Env") or [] if isinstance(e, str) and "=" in e]
    workdir = conf.get("WorkingDir") if isinstance(conf.get("WorkingDir"), str) else ""
    return {"env": env, "working_dir": workdir, "cmd": conf.get("Cmd"), "entrypoint": conf.get("Entrypoint"),
            "architecture": data.get("architecture"), "os": data.get("os"), "created": data.get("created")}


def diff_ids(config_blob: bytes, where: str, count: int) -> list[str]:
    """The config's ``rootfs.diff_ids`` (digests of the uncompressed layers, bottom first), one per
    layer of the manifest; ImageError when they are missing or do not match the layers in number."""
    try:
        rootfs = json.loads(config_blob).get("rootfs")
    except (ValueError, AttributeError):
        rootfs = None
    found = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(found, list) or not all(isinstance(d, str) and DIGEST.fullmatch(d) for d in found):
        raise ImageError(f"{where}: the image config has no valid rootfs.diff_ids, so its layers cannot be "
                         f"verified; rebuild or re-push the image with a standard tool")
    if len(found) != count:
        raise ImageError(f"{where}: the image config lists {len(found)} rootfs.diff_ids for the manifest's {count} "
                         f"layers; the image is inconsistent, re-push it")
    return found
