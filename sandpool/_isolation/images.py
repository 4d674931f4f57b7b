"""The local image store: root filesystem trees that sandboxes use as their overlay's lower layer.

``"host"`` is built in: the host's own ``/`` (nothing to download). Other names are directories of
the store, ``<store>/<slug>/rootfs`` plus ``image.json``, made by ``import_tarball`` (any rootfs
tarball, e.g. the output of ``docker export``) or ``build`` (Debian-based names, by debootstrap from
the Debian mirror; cached). Any other name is a registry reference, pulled on first use into the
content-addressed layer store (``sandpool._images``; its layers are the overlay's lower layers).
``SANDPOOL_IMAGE_FALLBACK=host`` is the explicit opt-out: an image not stored yet then runs on the
host image instead of being pulled, with a warning.

The store is ``$SANDPOOL_IMAGE_DIR``, else ``/var/lib/sandpool/images`` for root and
``$XDG_CACHE_HOME/sandpool/images`` (``~/.cache/sandpool/images``) for other users, whose layers
are unpacked in a user namespace (``sandpool._images.rootless``). Stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable

from .._images.errors import ImageError  # one error class for built, imported and pulled images

log = logging.getLogger("sandpool")

HOST = "host"
ENV_IMAGE_DIR = "SANDPOOL_IMAGE_DIR"
ENV_FALLBACK = "SANDPOOL_IMAGE_FALLBACK"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Debian releases by number; python:X.Y maps to the release whose python3 is X.Y.
DEBIAN_SUITES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
PYTHON_SUITES = {"3.9": "bullseye", "3.11": "bookworm", "3.13": "trixie"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")




@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    rootfs: str
    source: str
    created: float
    size_bytes: int
    python: str | None

    def describe(self) -> str:
        python = f"python {self.python}" if self.python else "no python"
        return f"{self.name:<24} {self.size_bytes / 2**20:8.0f} MiB  {python:<12} {self.source}"


def store_dir() -> str:
    explicit = os.environ.get(ENV_IMAGE_DIR)
    if explicit:
        return explicit
    if os.geteuid() == 0:
        return "/var/lib/sandpool/images"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sandpool", "images")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ImageError(f"invalid image name {name!r}; use letters, digits and . _ / : @ - such as 'debian:bookworm'")
    if name == HOST:
        raise ImageError("'host' is the built-in image (the host's own /); choose another name")


def slug(name: str) -> str:
    """The store directory of ``name``: '/' and ':' made safe, reversible enough to read."""
    return name.replace("/", "__").replace(":", "_")


def _load(path: str) -> Image | None:
    try:
        with open(os.path.join(path, "image.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return Image(rootfs=os.path.join(path, "rootfs"), **meta)


def list_images(store: str | None = None) -> list[Image]:
    """Every image of the store, by name (the built-in host image is not listed)."""
    store = store or store_dir()
    try:
        entries = sorted(os.listdir(store))
    except FileNotFoundError:
        return []
    return [image for e in entries if not e.startswith(".") and (image := _load(os.path.join(store, e)))]


def find(name: str, store: str | None = None) -> Image | None:
    image = _load(os.path.join(store or store_dir(), slug(name)))
    return image if image is not None and image.name == name else None


def how_to_get(name: str) -> str:
    build = f"'python -m sandpool image build {name}'" if build_recipe(name) else None
    ways = [f"import a rootfs tarball with 'python -m sandpool image import {name} rootfs.tar'"]
    if build:
        ways.insert(0, f"build it from Debian packages with {build}")
    return "; ".join(ways) + f", or set {ENV_FALLBACK}=host to run it on the host image"


def resolve(name: str, store: str | None = None, fetch: bool = True) -> str | None:
    """The overlay lower directories of image ``name`` (':'-separated, top first): '/' for host, a
    built or imported rootfs, else the layers of a registry image, pulled now if the store lacks it
    (blocking: call it from a thread), or None then if not ``fetch``. ImageError saying what to do
    when it cannot be had."""
    if name == HOST:
        return "/"
    image = find(name, store)
    if image is not None:
        return image.rootfs
    from .._images import pull, store as layers

    base = store or store_dir()
    record = pull.find(name, base)
    if record is None and os.environ.get(ENV_FALLBACK) == HOST:
        log.warning("image %r is not in the local store; using the host image instead of pulling it (%s=host)",
                    name, ENV_FALLBACK)
        return "/"
    if record is None or not all(layers.Store(base).has_layer(d) for d in record.layers):
        if not fetch:
            return None
        try:
            record = pull.pull(name, base, refresh=False)
        except ImageError as exc:
            raise ImageError(f"{exc}. To use {name!r} otherwise, {how_to_get(name)}") from None
    return layers.Store(base).lowerdir(record)


def settings(name: str, store: str | None = None) -> tuple[list[str], str]:
    """(Env as K=V strings, WorkingDir) of a pulled registry image; ([], '') for any other image."""
    if name == HOST:
        return [], ""
    from .._images import pull

    record = pull.find(name, store or store_dir())
    if record is None:
        return [], ""
    return [pair for pair in record.env if not pair.startswith("SANDPOOL_")], record.working_dir


def build_recipe(name: str) -> tuple[str, list[str]] | None:
    """(Debian suite, extra packages) for a Debian-based name, or None when it is not buildable."""
    repo, _, tag = name.partition(":")
    repo = repo.removeprefix("docker.io/").removeprefix("library/")
    tag = tag or "latest"
    if repo == "debian":
        suite = DEBIAN_SUITES.get(tag.split(".")[0], tag.removesuffix("-slim"))
        if tag == "latest":
            suite = "bookworm"
        return (suite, []) if suite in DEBIAN_SUITES.values() else None
    if repo == "python":
        version = re.match(r"(\d+\.\d+)", tag)
        python_suite = PYTHON_SUITES.get(version.group(1)) if version else None
        return (python_suite, ["python3", "python3-venv", "python3-pip"]) if python_suite else None
    return None


def _python_of(rootfs: str) -> str | None:
    found = [n[len("python"):] for n in os.listdir(os.path.join(rootfs, "usr", "bin"))
             if re.fullmatch(r"python3\.\d+", n)] if os.path.isdir(os.path.join(rootfs, "usr", "bin")) else []
    return max(found, key=lambda v: tuple(map(int, v.split(".")))) if found else None


def _size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _commit(name: str, store: str, staging: str, source: str) -> Image:
    """Move a finished rootfs from ``staging`` into place, with its metadata."""
    rootfs = os.path.join(staging, "rootfs")
    image = Image(name=name, rootfs="", source=source, created=time.time(), size_bytes=_size(rootfs),
                  python=_python_of(rootfs))
    meta = {"name": image.name, "source": image.source, "created": image.created, "size_bytes": image.size_bytes,
            "python": image.python}
    with open(os.path.join(staging, "image.json"), "w") as f:
        json.dump(meta, f, indent=1)
    final = os.path.join(store, slug(name))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(staging, final)
    return dataclasses.replace(image, rootfs=os.path.join(final, "rootfs"))


def _staging(store: str) -> str:
    os.makedirs(store, mode=0o755, exist_ok=True)
    path = os.path.join(store, f".tmp-{secrets.token_hex(4)}")
    os.makedirs(os.path.join(path, "rootfs"))
    return path


def import_tarball(name: str, tarball: str, store: str | None = None, replace: bool = False) -> Image:
    """Unpack a rootfs tarball (any compression tar detects) into the store as ``name``."""
    _check_name(name)
    store = store or store_dir()
    if find(name, store) and not replace:
        raise ImageError(f"image {name!r} already exists; remove it first ('python -m sandpool image rm {name}')")
    if not os.path.isfile(tarball):
        raise ImageError(f"no such tarball: {tarball}")
    staging = _staging(store)
    try:
        done = subprocess.run(["tar", "-x", "-p", "--numeric-owner", "-f", os.path.abspath(tarball),
                               "-C", os.path.join(staging, "rootfs")], capture_output=True, text=True)
        if done.returncode != 0:
            raise ImageError(f"tar could not unpack {tarball}: {done.stderr.strip()}")
        return _commit(name, store, staging, f"import {os.path.abspath(tarball)}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(name: str, store: str | None = None, progress: Callable[[str], None] | None = None,
          rebuild: bool = False, mirror: str = DEBIAN_MIRROR) -> Image:
    """Build a Debian-based image with debootstrap (cached: an existing image is returned as is).

    ``progress`` receives debootstrap's status lines ("Retrieving ...", "Configuring ...").
    Raises ImageError when the name is not Debian-based, debootstrap is missing or fails.
    """
    _check_name(name)
    store = store or store_dir()
    cached = find(name, store)
    if cached and not rebuild:
        return cached
    recipe = build_recipe(name)
    if recipe is None:
        raise ImageError(f"cannot build {name!r}: only Debian-based names are buildable here "
                         f"(debian:bookworm, debian:12, python:3.11, ...); import a rootfs tarball instead "
                         f"('python -m sandpool image import {name} rootfs.tar')")
    debootstrap = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.path.exists(p)), None)
    if debootstrap is None:
        raise ImageError("debootstrap is not installed; install it (apt-get install debootstrap) or import a "
                         "rootfs tarball instead")
    suite, packages = recipe
    staging = _staging(store)
    rootfs = os.path.join(staging, "rootfs")
    argv = [debootstrap, "--variant=minbase"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    argv += [suite, rootfs, mirror]
    try:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            tail: list[str] = []
            for line in proc.stdout:  # type: ignore[union-attr]  # stdout=PIPE: never None
                line = line.rstrip()
                tail = (tail + [line])[-20:]
                if progress and line.startswith(("I: ", "W: ", "E: ")):
                    progress(line[3:])
        if proc.returncode != 0:
            raise ImageError(f"debootstrap {suite} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in os.listdir(os.path.join(rootfs, junk)):
                path = os.path.join(rootfs, junk, entry)
                if os.path.isfile(path) and entry != "lock":
                    os.unlink(path)
        return _commit(name, store, staging, f"debootstrap {suite} {' '.join(packages)}".strip())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove(name: str, store: str | None = None) -> None:
    store = store or store_dir()
    if find(name, store) is None:
        raise ImageError(f"no image {name!r} in {store}")
    shutil.rmtree(os.path.join(store, slug(name)))
