"""What of the host a namespaces (or oci) sandbox sees: decided here, in the client, per start.

Two decisions, both plain data for the sandbox side (``namespaces.mount_root`` and ``enter``):

- ``host_view()``: the ``host`` image is an allow-list of the host's system directories
  (``SYSTEM_DIRS``, through an overlay) on a tmpfs with empty ``/root``, ``/home`` and
  ``/var/tmp``; the secrets of ``/etc`` (``ETC_SECRETS``, and ``ssh/ssh_host_*``) are whited out.
  Everything else of the host's ``/`` is absent: data directories (``/work``, ``/srv``, ``/opt``,
  ``/var``, ...), homes, the state directories of every runtime and the image store wherever they
  live outside the system directories.
- ``python_binds()``: what the agent's interpreter needs of the host, bound read-only at the same
  paths: the interpreter's prefixes (stdlib and site-packages), sandpool's own package, other
  site-packages directories on ``sys.path``, and the client's own modules (``client_sources``):
  each imported top-level module outside those, file by file (with its cached bytecode), or its
  package directory, so a function pickled by reference imports in the sandbox as it does here.
  Never the rest of the client's directories (a ``secret.env`` beside a module stays outside).
  A module the client has not imported when a sandbox starts is not there.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import site
import sys
import sysconfig
import types
from collections.abc import Iterable
from typing import Any

import _sandpool_agent

#: Top-level entries of the host's ``/`` the host image shows (directories through an overlay,
#: symlinks such as ``/bin -> usr/bin`` as the same symlinks); the others, where present, are absent.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
#: Paths under ``/etc`` the host image never shows: password and group hashes, sudo rules, PAM's
#: old passwords, TLS private keys, Kerberos keytabs, IPsec/PPP/WireGuard/NetworkManager secrets,
#: ACME certificates' keys. With ``ssh/ssh_host_*`` (the host's SSH keys), found per start.
ETC_SECRETS = ("shadow", "shadow-", "gshadow", "gshadow-", "sudoers", "sudoers.d", "security/opasswd",
               "ssl/private", "krb5.keytab", "ipsec.secrets", "ppp/chap-secrets", "ppp/pap-secrets",
               "wireguard", "NetworkManager/system-connections", "letsencrypt")
#: Empty directories of the host image's root, with their modes: the sandbox's own home, /home,
#: /var with a world-writable /var/tmp (proc, sys, dev, tmp and run are mounted over later).
SKELETON_DIRS = (("root", 0o700), ("home", 0o755), ("var", 0o755), ("var/tmp", 0o1777))


#: ``os.path.realpath`` for the few paths asked per start (state dir, image store, sys.path
#: entries): an lstat per path component otherwise.
@functools.lru_cache(maxsize=256)
def realpath(path: str) -> str:
    return os.path.realpath(path)


def host_view(root: str = "/") -> dict[str, Any]:
    """The ``view`` of ``namespaces.mount_root`` for the host image (``root`` is the host's /),
    made again when ``root`` or its ``etc/ssh`` changed (two stats per start)."""
    key: list[int | None] = []
    for path in (root, os.path.join(root, "etc", "ssh")):
        try:
            key.append(os.stat(path).st_mtime_ns)
        except OSError:
            key.append(None)
    return _host_view(root, tuple(key))


@functools.lru_cache(maxsize=4)
def _host_view(root: str, _mtimes: tuple[int | None, ...]) -> dict[str, Any]:
    links: dict[str, str] = {}
    shown: list[str] = []
    for name in SYSTEM_DIRS:
        path = os.path.join(root, name)
        if os.path.islink(path):
            links[name] = os.readlink(path)
        elif os.path.isdir(path):
            shown.append(name)
    secrets = [f"etc/{p}" for p in ETC_SECRETS + _ssh_host_keys(os.path.join(root, "etc", "ssh"))]
    return {"links": links, "shown": shown, "dirs": [list(d) for d in SKELETON_DIRS], "whiteouts": secrets}


def _ssh_host_keys(ssh_dir: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(f"ssh/{n}" for n in os.listdir(ssh_dir) if n.startswith("ssh_host_")))
    except OSError:
        return ()


@functools.lru_cache(maxsize=1)
def visible_dirs() -> tuple[str, ...]:
    """Real paths of the host directories the host image shows as they are (its system dirs)."""
    return tuple(sorted({os.path.realpath(os.path.join("/", n)) for n in SYSTEM_DIRS
                         if os.path.isdir(os.path.join("/", n))}))


def _under(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


@functools.lru_cache(maxsize=1)
def interpreter_dirs() -> tuple[str, ...]:
    """The interpreter's prefixes, sandpool's and the sandbox side's packages and every site-packages
    directory on sys.path."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    agent_package = os.path.dirname(os.path.abspath(_sandpool_agent.__file__))
    sites = set(sysconfig.get_paths().get(k, "") for k in ("purelib", "platlib"))
    if sys.flags.no_site == 0:
        sites.update(site.getsitepackages())
        sites.add(site.getusersitepackages())
    on_path = [p for p in sys.path if p in sites or os.path.basename(p) in ("site-packages", "dist-packages")]
    candidates = [sys.base_prefix, sys.prefix, sys.exec_prefix, package, agent_package] + on_path
    chosen: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates if p and os.path.isdir(p)}, key=len):
        if path != "/" and not _under(path, chosen):
            chosen.append(path)
    return tuple(chosen)


_sources: dict[str, tuple[object, tuple[str, ...]]] = {}  # top-level name -> (module, its files or dirs)


def client_sources() -> tuple[str, ...]:
    """Real paths of the client's own imported top-level modules (files, with their cached
    bytecode) and packages (directories), outside the interpreter's directories. Cached per
    module: a start looks only at modules imported (or replaced) since the last one, and forgets
    removed ones."""
    tops = 0
    for name, module in list(sys.modules.items()):
        if "." not in name:
            tops += 1
            known = _sources.get(name)
            if known is None or known[0] is not module:
                _sources[name] = (module, _module_sources(name, module))
    if len(_sources) != tops:  # some were removed from sys.modules
        for name in [n for n in _sources if n not in sys.modules]:
            del _sources[name]
    return _paths_of(tuple(paths for _module, paths in _sources.values() if paths))


@functools.lru_cache(maxsize=16)
def _paths_of(groups: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    return tuple(sorted({p for paths in groups for p in paths}))


def _module_sources(name: str, module: types.ModuleType | None) -> tuple[str, ...]:
    if module is None or name in ("__main__", "__mp_main__"):  # the script: pickled by value
        return ()
    file = getattr(module, "__file__", None)
    if getattr(module, "__path__", None) is not None:  # a package: its directory (or a namespace's)
        dirs = [os.path.dirname(file)] if file else list(module.__path__)
        found = [os.path.realpath(d) for d in dirs if os.path.isdir(d)]
    elif file and os.path.isfile(file):
        found = [os.path.realpath(file)]
        cached = importlib.util.cache_from_source(file) if file.endswith(".py") else None
        if cached and os.path.isfile(cached):
            found.append(os.path.realpath(cached))
    else:  # built in, frozen, or from a zip archive
        return ()
    keep = interpreter_dirs()
    return tuple(p for p in found if not _under(p, keep))


def client_paths(binds: list[list[str]]) -> list[str]:
    """The entries of ``sys.path`` (now) that hold a bound source: the agent's import path gets
    those it lacks (it has the client's ``sys.path`` of when the runtime started)."""
    targets = [target for _source, target in binds]
    found = []
    for entry in sys.path:
        real = realpath(entry) if entry else ""
        if real and real != "/" and any(t.startswith(real + "/") for t in targets) and real not in found:
            found.append(real)
    return found


def python_binds(host_image: bool, state_dir: str, image_dir: str) -> list[list[str]]:
    """[source, target] read-only binds for the agent's interpreter and the client's modules.

    On the host image, sources inside its visible system directories need no bind. Never a source
    that holds (or lies in) the state directory or the image store: those would show other
    sandboxes' files again; nor a top-level directory (``/tmp`` holds other runtimes' state).
    """
    return _binds(host_image, realpath(state_dir), realpath(image_dir), interpreter_dirs(), client_sources())


@functools.lru_cache(maxsize=16)
def _binds(host_image: bool, state: str, images: str, dirs: tuple[str, ...],
           sources: tuple[str, ...]) -> list[list[str]]:
    chosen: list[str] = []
    for path in list(dirs) + [s for s in sources if not _under(s, dirs)]:
        if os.path.dirname(path) == "/" or _under(state, [path]) or _under(path, [state]) \
                or _under(images, [path]) or _under(path, [images]):  # (a top-level dir: /tmp, /home)
            continue
        if host_image and _under(path, visible_dirs()):
            continue
        if not _under(path, chosen):
            chosen.append(path)
    return [[p, p] for p in chosen]
