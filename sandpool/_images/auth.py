"""Registry credentials (explicit, or docker's ``~/.docker/config.json``) and the challenge parser.

From the docker config, as docker reads it: a credential helper named for the host in
``credHelpers``, else the ``credsStore`` helper, else the ``auths`` entry. A helper is the program
``docker-credential-<name>`` on PATH, run as ``docker-credential-<name> get`` with the server's
name on stdin; it answers ``{"Username": ..., "Secret": ...}`` as JSON, or that it has none.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from typing import Any

from .errors import ImageError

_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")
#: Seconds a credential helper may take, and the bytes of its answer read.
HELPER_TIMEOUT_SECONDS = 30
MAX_HELPER_ANSWER = 64 * 1024
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
            config = json.load(f)
        auths = config.get("auths") or {}
        helpers = config.get("credHelpers") or {}
        store = config.get("credsStore")
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise ValueError("auths and credHelpers must be objects")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageError(f"cannot read registry credentials from {path}: {exc}; fix or remove that file") from None
    for host in hosts:
        keys = DOCKER_HUB_KEYS if host == "docker.io" else (host,)
        for key in keys:
            if isinstance(helpers.get(key), str):
                return _from_helper(helpers[key], key, path)
    if isinstance(store, str) and store:
        for host in hosts:
            key = DOCKER_HUB_KEYS[0] if host == "docker.io" else host
            found = _from_helper(store, key, path)
            if found:
                return found
    by_host: dict[str, object] = {}
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


def _entry(entry: dict[str, Any], path: str, key: str) -> tuple[str, str] | None:
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


def _from_helper(name: str, server: str, path: str) -> tuple[str, str] | None:
    """(user, secret) from ``docker-credential-<name> get`` for ``server``, or None if it has none."""
    if not _HELPER_NAME.fullmatch(name):
        raise ImageError(f"{path}: {name!r} is not a credential helper name; fix credHelpers/credsStore")
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        raise ImageError(f"{path} names the credential helper {name!r}, but docker-credential-{name} is not on PATH; "
                         f"install it, or remove it from credHelpers/credsStore")
    try:
        done = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                              timeout=HELPER_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"the credential helper docker-credential-{name} failed for {server} ({exc})") from None
    answer = done.stdout[:MAX_HELPER_ANSWER].decode(errors="replace").strip()
    if done.returncode != 0:
        if "credentials not found" in answer.lower():
            return None
        said = (answer or done.stderr[:1000].decode(errors="replace")).strip()
        raise ImageError(f"the credential helper docker-credential-{name} failed for {server} (exit "
                         f"{done.returncode}: {said}); log in again with it")
    try:
        data = json.loads(answer)
        user, secret = data["Username"], data["Secret"]
    except (ValueError, TypeError, KeyError):
        raise ImageError(f"the credential helper docker-credential-{name} gave no Username/Secret JSON for "
                         f"{server}") from None
    if not isinstance(user, str) or not isinstance(secret, str) or not secret:
        return None
    if user == "<token>":
        raise ImageError(f"the credential helper docker-credential-{name} holds an identity token for {server}, "
                         f"which sandpool does not exchange; log in with a user and password (or access token)")
    return user, secret


def basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
