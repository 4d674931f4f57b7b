"""The ``network`` option of a sandbox, reduced to what a local sandbox can do: "none" or "host".

- ``"none"``: a network namespace of its own with only ``lo`` (up): loopback works inside, nothing
  else is reachable. The default of the namespaces and oci levels.
- ``"host"``: the host's network stack. The only choice at the process level, its default.

cwsandbox's ``NetworkOptions`` (or its dict form) maps where it can: ``deny_egress=True`` is "none";
an egress rule ``{"any": True}`` (or no rules and ``deny_egress`` false) is "host". Rules naming
CIDRs, DNS names, tenants or selectors have no local equivalent and are refused, saying so.
``True``/``False`` mean host/none. Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MODES = ("none", "host")
#: Prefix of named network namespaces (``ip netns``) sandpool would create, then ``cgroups.state_key``;
#: host-side veths would carry it (then the key) as their alias, so leak checks find them.
NETNS_PREFIX = "sandpool-"
NETNS_DIR = "/run/netns"


def _fields(value: object) -> dict | None:
    """A NetworkOptions-like object (any class with these attributes) or a mapping, as a dict."""
    names = ("deny_egress", "deny_ingress", "egress", "ingress")
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise ValueError(f"network has unknown keys {sorted(unknown)}; use network='none' or 'host', "
                             f"or a dict of {', '.join(names)}")
        return dict(value)
    if any(hasattr(value, n) for n in names):
        return {n: getattr(value, n, None) for n in names}
    return None


def _rule_is_any(rule: object) -> bool:
    if isinstance(rule, Mapping):
        return bool(rule.get("any")) and not any(rule.get(k) for k in ("cidr", "dns_name", "tenant", "selector"))
    return bool(getattr(rule, "any", False)) and not any(
        getattr(rule, k, None) for k in ("cidr", "dns_name", "tenant", "selector"))


def resolve(value: object, level: str) -> str:
    """"none" or "host" for the ``network`` option at isolation ``level``; ValueError if it cannot map."""
    if value is None:
        return "host" if level == "process" else "none"
    if isinstance(value, bool):
        mode = "host" if value else "none"
    elif isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"network={value!r} is not a local network mode; use 'none' (loopback only) "
                             f"or 'host' (the host's network)")
        mode = value
    else:
        fields = _fields(value)
        if fields is None:
            raise TypeError(f"network must be 'none', 'host', a bool or a NetworkOptions/dict, got "
                            f"{type(value).__name__} {value!r}")
        mode = _from_options(fields)
    if mode == "none" and level == "process":
        raise ValueError("network='none' needs a network namespace, which the process level does not have; "
                         "use isolation='namespaces' (as root or rootless) or network='host'")
    return mode


def _from_options(fields: dict) -> str:
    egress = list(fields.get("egress") or ())
    if fields.get("deny_egress"):
        if egress:
            raise ValueError("network: deny_egress=True cannot be combined with egress rules")
        return "none"
    if not egress or any(_rule_is_any(rule) for rule in egress):
        return "host"
    raise ValueError(f"network egress rules {egress!r} have no local equivalent (a local sandbox has either "
                     f"no network or the host's); use network='none', network='host', or an egress rule "
                     f"{{'any': True}}")


def named_namespaces(state_dir: str) -> list[str]:
    """Named network namespaces of ``state_dir``'s sandboxes that exist (leak checks).

    The levels here name none (a sandbox's netns lives and dies with its processes), so this finds
    only what a future veth/bridge setup, or a crashed one, would leave in ``/run/netns``.
    """
    from _sandpool_agent.confine.cgroups import state_key

    prefix = NETNS_PREFIX + state_key(state_dir)
    try:
        return sorted(os.path.join(NETNS_DIR, n) for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except OSError:
        return []
