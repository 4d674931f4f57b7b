"""``sandpool image ls | import | build | rm``: the local image store (see ``sandpool._isolation.images``)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser("image", help="list, import, build or remove local sandbox images",
                           description="Images are root filesystems for the namespaces level. 'host' (the host's "
                                       "own /) is built in; others are imported from a rootfs tarball or built "
                                       "from Debian packages.")
    image.add_argument("--store", help="the image store (default: $SANDPOOL_IMAGE_DIR, else /var/lib/sandpool/images "
                                       "for root)")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    p = isub.add_parser("ls", help="list the images")
    p.set_defaults(run=cmd_ls)
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
    p = isub.add_parser("rm", help="remove an image")
    p.add_argument("name")
    p.set_defaults(run=cmd_rm)


def _fail(exc: Exception) -> int:
    print(f"Error: {exc}", file=sys.stderr)
    return 1


def cmd_ls(args: argparse.Namespace) -> int:
    from .._isolation import images

    print(f"{'NAME':<24} {'SIZE':>12}  {'PYTHON':<12} SOURCE")
    print(f"{'host':<24} {'-':>12}  {'host':<12} built in: the host's / (home directories hidden)")
    for image in images.list_images(args.store):
        print(image.describe())
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .._isolation import images

    started = time.monotonic()
    try:
        image = images.import_tarball(args.name, args.tarball, args.store, replace=args.replace)
    except images.ImageError as exc:
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
    except images.ImageError as exc:
        progress.done()
        return _fail(exc)
    progress.done()
    how = "already built" if cached else f"built in {progress.elapsed():.0f} s"
    print(f"{image.name}: {how}, {image.size_bytes / 2**20:.0f} MiB, python {image.python or 'none'}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .._isolation import images

    try:
        images.remove(args.name, args.store)
    except images.ImageError as exc:
        return _fail(exc)
    print(f"removed {args.name}")
    return 0


#: debootstrap's status verbs, grouped into the phases a person cares about.
PHASES = {"Retrieving": "downloading", "Validating": "downloading", "Extracting": "extracting",
          "Unpacking": "unpacking", "Installing": "unpacking", "Configuring": "configuring"}


class Progress:
    """debootstrap's status lines as one updating line on a terminal, one line per phase otherwise."""

    def __init__(self, stream) -> None:
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
