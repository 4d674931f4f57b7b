"""Where a registry is reached: its API URL (``SANDPOOL_REGISTRY_MIRRORS``) and its TLS context
(``SANDPOOL_REGISTRY_CA``)."""

from __future__ import annotations

import dataclasses
import os
import ssl
import urllib.parse

from .errors import ImageError
from .reference import DOCKER_HUB, DOCKER_HUB_API

ENV_MIRRORS = "SANDPOOL_REGISTRY_MIRRORS"
ENV_CA = "SANDPOOL_REGISTRY_CA"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    mirror: bool = False

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_url(url: str, where: str) -> Endpoint:
    parts = urllib.parse.urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/"):
        raise ImageError(f"{where}: {url!r} is not a registry URL; use http://HOST[:PORT] or https://HOST[:PORT]")
    return Endpoint(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), mirror=True)


def mirrors(value: str | None = None) -> dict[str, Endpoint]:
    """``registry=URL`` pairs of ``SANDPOOL_REGISTRY_MIRRORS`` (comma-separated); ImageError naming a bad one."""
    value = os.environ.get(ENV_MIRRORS, "") if value is None else value
    found: dict[str, Endpoint] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        registry, sep, url = pair.partition("=")
        if not sep or not registry.strip():
            raise ImageError(f"{ENV_MIRRORS}: {pair!r} is not 'registry=URL'; use e.g. "
                             f"{ENV_MIRRORS}='docker.io=http://127.0.0.1:5000,ghcr.io=https://mirror:443'")
        registry = registry.strip()
        found[DOCKER_HUB if registry in ("index.docker.io", DOCKER_HUB_API) else registry] = parse_url(url, ENV_MIRRORS)
    return found


def endpoint(registry: str, table: dict[str, Endpoint] | None = None) -> Endpoint:
    """The API endpoint of ``registry``: its mirror if one is named (the mirror replaces it), else https."""
    table = mirrors() if table is None else table
    if registry in table:
        return table[registry]
    if registry == DOCKER_HUB:
        return Endpoint("https", DOCKER_HUB_API, 443)
    host, port = registry, 443
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 443
    elif ":" in registry:
        host, _, p = registry.rpartition(":")
        port = int(p)
    return Endpoint("https", host, port)


def tls_context() -> ssl.SSLContext:
    """The system's trust store, plus ``SANDPOOL_REGISTRY_CA`` (a PEM file or directory) when set."""
    context = ssl.create_default_context()
    ca = os.environ.get(ENV_CA)
    if ca:
        try:
            if os.path.isdir(ca):
                context.load_verify_locations(capath=ca)
            else:
                context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ImageError(f"{ENV_CA}={ca!r}: cannot load CA certificates ({exc}); point it at a PEM file") from None
    return context
