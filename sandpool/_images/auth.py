"""Registry credentials (explicit, or ``~/.docker/config.json`` ``auths``) and the challenge parser."""

from __future__ import annotations

import base64
import json
import os
import re

from .errors import ImageError

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """('bearer'|'basic'|..., params) of a ``WWW-Authenticate`` header."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                            for m in _PARAM.finditer(rest)}


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def from_docker_config(*hosts: str, path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for the first of ``hosts`` found in the docker config's ``auths``, or None."""
    path = path or docker_config_path()
    try:
        with open(path) as f:
            auths = json.load(f).get("auths") or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageError(f"cannot read registry credentials from {path}: {exc}; fix or remove that file") from None
    by_host = {}
    for key, entry in auths.items():
        host = re.sub(r"^https?://", "", key).split("/", 1)[0]
        by_host.setdefault(host, entry)
        by_host.setdefault(key, entry)
    for host in hosts:
        keys = DOCKER_HUB_KEYS if host == "docker.io" else (host,)
        for key in keys:
            entry = by_host.get(key)
            if isinstance(entry, dict):
                found = _entry(entry, path, key)
                if found:
                    return found
    return None


def _entry(entry: dict, path: str, key: str) -> tuple[str, str] | None:
    if entry.get("username") and entry.get("password"):
        return str(entry["username"]), str(entry["password"])
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            user, sep, password = "", "", ""
        if not sep:
            raise ImageError(f"{path}: auths[{key!r}].auth is not base64 of 'user:password'; run 'docker login' again")
        return user, password
    return None


def basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
