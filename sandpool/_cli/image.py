"""``sandpool image pull | ls | inspect | rm | prune | import | build``: the local image store (see
``sandpool._isolation.images``; registry images live in its layer store, ``sandpool._images``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from .._images import pull
from .._images.errors import ImageError

if TYPE_CHECKING:
    from . import Subcommands


def register(sub: Subcommands) -> None:
    image = sub.add_parser("image", help="pull, list, inspect, remove or prune local sandbox images",
                           description="Images are root filesystems for the namespaces level. 'host' (the host's "
                                       "own /) is built in; others are pulled from container registries (Docker "
                                       "Hub by default; mirrors in $SANDPOOL_REGISTRY_MIRRORS), imported from a "
                                       "rootfs tarball or built from Debian packages.")
    image.add_argument("--store", help="the image store (default: $SANDPOOL_IMAGE_DIR, else /var/lib/sandpool/images "
                                       "for root)")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    p = isub.add_parser("pull", help="pull an image from its registry (python:3.11, ghcr.io/org/app:1, ...)")
    p.add_argument("name")
    p.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image (default: this machine)")
    p.add_argument("--username", help="registry user (default: ~/.docker/config.json, else anonymous)")
    p.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    _output(p)
    p.set_defaults(run=cmd_pull)
    p = isub.add_parser("ls", help="list the images")
    _output(p)
    p.set_defaults(run=cmd_ls)
    p = isub.add_parser("inspect", help="show an image's reference, digest, layers and config")
    p.add_argument("name")
    _output(p, default="json")
    p.set_defaults(run=cmd_inspect)
    p = isub.add_parser("prune", help="remove layers no pulled image uses, and leftovers of interrupted pulls")
    _output(p)
    p.set_defaults(run=cmd_prune)
    p = isub.add_parser("import", help="import a rootfs tarball (e.g. from 'docker export') as NAME")
    p.add_argument("name")
    p.add_argument("tarball")
    p.add_argument("--replace", action="store_true", help="replace an existing image of that name")
    p.set_defaults(run=cmd_import)
    p = isub.add_parser("build", help="build a Debian-based image (debian:bookworm, python:3.11) with debootstrap")
    p.add_argument("name")
    p.add_argument("--rebuild", action="store_true", help="build again even if the image exists")
    p.add_argument("--mirror", help="Debian mirror (default: http://deb.debian.org/debian)")
    p.set_defaults(run=cmd_build)
    p = isub.add_parser("rm", help="remove an image (a pulled image's layers stay until 'prune')")
    p.add_argument("name")
    _output(p)
    p.set_defaults(run=cmd_rm)


def _output(parser: argparse.ArgumentParser, default: str = "table") -> None:
    parser.add_argument("-o", "--output", choices=("table", "json"), default=default)


def _fail(exc: Exception) -> int:
    print(f"Error: {exc}", file=sys.stderr)
    return 1


def _base(args: argparse.Namespace) -> str:
    from .._isolation import images

    return args.store or images.store_dir()


def cmd_pull(args: argparse.Namespace) -> int:
    credentials = None
    if args.password_stdin:
        if not args.username:
            return _fail(ValueError("--password-stdin needs --username"))
        credentials = (args.username, sys.stdin.readline().rstrip("\n"))
    platform = None
    if args.platform:
        parts = args.platform.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            return _fail(ValueError(f"--platform {args.platform!r}: use OS/ARCH or OS/ARCH/VARIANT, e.g. linux/arm64"))
        platform = (parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    bars = PullProgress(sys.stderr)
    started = time.monotonic()
    try:
        record = pull.pull(args.name, _base(args), credentials=credentials, progress=bars, platform=platform)
    except ImageError as exc:
        bars.finish()
        return _fail(exc)
    bars.finish()
    if args.output == "json":
        print(json.dumps(record.to_json(), indent=2))
    else:
        print(f"{record.reference}: {record.digest}, {len(record.layers)} layers, "
              f"{record.size_bytes / 2**20:.1f} MiB, in {time.monotonic() - started:.1f} s")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .._images.store import Store
    from .._isolation import images

    built = images.list_images(args.store)
    pulled = Store(_base(args)).records()
    if args.output == "json":
        rows: list[dict[str, object]] = [{"name": "host", "source": "built in", "size_bytes": None}]
        rows += [{"name": i.name, "source": i.source, "size_bytes": i.size_bytes, "python": i.python} for i in built]
        rows += [{"name": r.reference, "source": "registry", "size_bytes": r.size_bytes, "digest": r.digest,
                  "layers": len(r.layers)} for r in pulled]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<40} {'SIZE':>12}  SOURCE")
    print(f"{'host':<40} {'-':>12}  built in: the host's / (home directories hidden)")
    for image in built:
        print(f"{image.name:<40} {image.size_bytes / 2**20:8.0f} MiB  {image.source}")
    for record in pulled:
        print(f"{record.reference:<40} {record.size_bytes / 2**20:8.0f} MiB  registry {record.digest[:19]} "
              f"({len(record.layers)} layers)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .._images import pull
    from .._images.store import Store
    from .._isolation import images

    base = _base(args)
    record = pull.find(args.name, base)
    if record is not None:
        info = {**record.to_json(), "layer_dirs": [Store(base).layer_root(d) for d in record.layers]}
    elif (image := images.find(args.name, args.store)) is not None:
        info = dataclasses.asdict(image)
    else:
        return _fail(ImageError(f"no image {args.name!r} in {base}; pull it first "
                                       f"('sandpool image pull {args.name}')"))
    if args.output == "json":
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key + ':':<14} {value}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .._images.store import Store

    removed = Store(_base(args)).prune()
    freed = sum(size for _, size in removed)
    if args.output == "json":
        print(json.dumps({"removed_layers": [d for d, _ in removed], "freed_bytes": freed}, indent=2))
    else:
        print(f"removed {len(removed)} unused layers, {freed / 2**20:.1f} MiB")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .._isolation import images

    started = time.monotonic()
    try:
        image = images.import_tarball(args.name, args.tarball, args.store, replace=args.replace)
    except ImageError as exc:
        return _fail(exc)
    print(f"imported {image.name} ({image.size_bytes / 2**20:.0f} MiB) in {time.monotonic() - started:.1f} s")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .._isolation import images

    progress = Progress(sys.stderr)
    options = {"mirror": args.mirror} if args.mirror else {}
    try:
        cached = None if args.rebuild else images.find(args.name, args.store)
        image = cached or images.build(args.name, args.store, progress=progress, rebuild=args.rebuild, **options)
    except ImageError as exc:
        progress.done()
        return _fail(exc)
    progress.done()
    how = "already built" if cached else f"built in {progress.elapsed():.0f} s"
    print(f"{image.name}: {how}, {image.size_bytes / 2**20:.0f} MiB, python {image.python or 'none'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .._images import reference
    from .._images.store import Store
    from .._isolation import images

    try:
        if images.find(args.name, args.store) is not None:
            images.remove(args.name, args.store)
        elif not Store(_base(args)).remove(str(reference.parse(args.name))):
            raise ImageError(f"no image {args.name!r} in {_base(args)} ('sandpool image ls' lists them)")
    except ImageError as exc:
        return _fail(exc)
    print(json.dumps({"removed": args.name}) if args.output == "json" else f"removed {args.name}")
    return 0


#: debootstrap's status verbs, grouped into the phases a person cares about.
PHASES = {"Retrieving": "downloading", "Validating": "downloading", "Extracting": "extracting",
          "Unpacking": "unpacking", "Installing": "unpacking", "Configuring": "configuring"}


class Progress:
    """debootstrap's status lines as one updating line on a terminal, one line per phase otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.phase = ""
        self.count = 0
        self.shown = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, line: str) -> None:
        verb, _, detail = line.partition(" ")
        phase = PHASES.get(verb, verb.lower())
        if phase != self.phase:
            self.phase, self.count = phase, 0
            if not self.tty:
                print(f"[{self.elapsed():5.1f}s] {phase}: {detail}", file=self.stream, flush=True)
        self.count += 1
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            text = f"[{self.elapsed():5.1f}s] {phase} ({self.count}) {detail}"
            self.stream.write("\r" + text[:width].ljust(width))
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.shown = False


@dataclasses.dataclass
class _Bar:
    """One layer's bar: its size, the bytes downloaded, its state, and the last quarter shown."""

    size: int
    got: int
    state: str
    quarter: int = 0


class PullProgress(pull.Progress):
    """A pull's layers as bars on a terminal (redrawn in place), or plain lines otherwise: each layer
    when it starts, at every quarter, and when it is stored. Called from the pull's threads."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.layers: dict[str, _Bar] = {}  # by digest
        self.drawn = 0

    def layer(self, digest: str, size: int, cached: bool) -> None:
        with self.lock:
            self.layers[digest] = _Bar(size, size if cached else 0, "cached" if cached else "waiting")
            self._show(digest)

    def advance(self, digest: str, nbytes: int) -> None:
        with self.lock:
            bar = self.layers[digest]
            bar.got += nbytes
            bar.state = "downloading"
            quarter = 4 * bar.got // max(bar.size, 1)
            if self.tty or quarter > bar.quarter:
                bar.quarter = quarter
                self._show(digest)

    def unpacking(self, digest: str) -> None:
        with self.lock:
            self.layers[digest].state = "unpacking"
            self._show(digest)

    def done(self, digest: str) -> None:
        with self.lock:
            bar = self.layers[digest]
            if bar.state != "cached":
                bar.got, bar.state = bar.size, "done"
                self._show(digest)

    def _line(self, digest: str) -> str:
        bar = self.layers[digest]
        size, got, state = bar.size, bar.got, bar.state
        fraction = got / size if size else 1.0
        filled = "#" * int(fraction * 30)
        return f"{digest[7:19]} [{filled:<30}] {got / 2**20:7.1f}/{size / 2**20:.1f} MiB {state}"

    def _show(self, digest: str) -> None:
        if not self.tty:
            print(self._line(digest), file=self.stream, flush=True)
            return
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}A")
        for key in self.layers:
            self.stream.write("\r" + self._line(key) + "\x1b[K\n")
        self.drawn = len(self.layers)
        self.stream.flush()

    def finish(self) -> None:
        self.stream.flush()
