"""Image references: ``python:3.11`` is ``docker.io/library/python:3.11``; any ``host[:port]/path``,
with a ``:tag`` and/or an ``@sha256:...`` digest."""

from __future__ import annotations

import dataclasses
import re

from .errors import ImageError

DOCKER_HUB = "docker.io"
#: Where Docker Hub's API lives (the name ``docker.io`` is not its API host).
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
MAX_REFERENCE = 512


@dataclasses.dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        return name + (f"@{self.digest}" if self.digest else "")

    @property
    def ref(self) -> str:
        """What to ask the manifests endpoint for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return dataclasses.replace(self, digest=digest)


def parse(name: str) -> Reference:
    """The full reference of ``name``; ImageError naming the name and the expected form."""
    if not isinstance(name, str) or not name or len(name) > MAX_REFERENCE or name != name.strip():
        raise ImageError(f"invalid image reference {name!r}; use e.g. 'python:3.11', 'ghcr.io/org/app:1.0' or "
                         f"'registry:5000/app@sha256:<64 hex digits>'")
    rest, digest = name, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST.fullmatch(digest):
            raise ImageError(f"invalid digest {digest!r} in image reference {name!r}; use 'sha256:' and 64 lowercase "
                             f"hex digits")
    registry, path = DOCKER_HUB, rest
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    tag = None
    last_slash = path.rfind("/")
    if ":" in path[last_slash + 1:]:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ImageError(f"invalid tag {tag!r} in image reference {name!r}; tags are letters, digits, '_', '.' "
                             f"and '-', at most 128")
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _HOST.fullmatch(registry) or not _PATH.fullmatch(path):
        raise ImageError(f"invalid image reference {name!r}: repository names are lowercase letters, digits and "
                         f"separators ('.', '_', '-', '/'), after an optional registry host[:port]")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)
