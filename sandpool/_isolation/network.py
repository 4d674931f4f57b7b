"""The ``network`` option of a sandbox: "none", "host", or "bridge" (a network of its own).

- ``"none"``: a network namespace of its own with only ``lo`` (up): loopback works inside, nothing
  else is reachable. The default of the namespaces and oci levels.
- ``"host"``: the host's network stack. The only choice at the process level, its default.
- ``"bridge"``: a network namespace of its own with a veth to the host, an address of sandpool's
  range, NAT for egress and nftables rules from the ``NetworkOptions`` (``policy``); see
  docs/network.md. Namespaces level only.

cwsandbox's ``NetworkOptions`` (or its dict form): ``deny_egress=True`` without ingress rules is
"none"; no rules, or only an egress rule ``{"any": True}``, is "host" (as before bridge existed);
anything else (CIDR, DNS name or tenant egress rules, ingress rules) is "bridge" with those rules.
Selector rules have no local meaning and are refused. ``True``/``False`` mean host/none. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping

MODES = ("none", "host", "bridge")
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


def _get(rule: object, key: str, default: object = None) -> object:
    return rule.get(key, default) if isinstance(rule, Mapping) else getattr(rule, key, default)


def _rule_is_any(rule: object) -> bool:
    return bool(_get(rule, "any")) and not any(_get(rule, k) for k in ("cidr", "dns_name", "tenant", "selector",
                                                                       "ports"))


def resolve(value: object, level: str, services: object = None) -> str:
    """"none", "host" or "bridge" for the ``network`` option (and ``services``) at isolation
    ``level``; ValueError (naming the fix) if it cannot map there. Services need a bridge: with no
    network option they make one (that reaches nothing: egress denied); with "none" or "host" they
    are refused."""
    if services:
        mode = "bridge" if value is None else resolve(value, level)
        if mode != "bridge":
            raise ValueError(f"services need a network of the sandbox's own, not network={mode!r}; drop "
                             f"network (no egress then) or use network='bridge' or NetworkOptions rules")
        value = "bridge"
    if value is None:
        return "host" if level == "process" else "none"
    if isinstance(value, bool):
        mode = "host" if value else "none"
    elif isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"network={value!r} is not a local network mode; use 'none' (loopback only), "
                             f"'host' (the host's network) or 'bridge' (a network of its own, with NAT)")
        mode = value
    else:
        fields = _fields(value)
        if fields is None:
            raise TypeError(f"network must be 'none', 'host', 'bridge', a bool or a NetworkOptions/dict, got "
                            f"{type(value).__name__} {value!r}")
        mode = _from_options(fields)
    if mode != "host" and level == "process":
        raise ValueError(f"network={mode!r} needs a network namespace, which the process level does not have; "
                         f"use isolation='namespaces' (as root or rootless) or network='host'")
    return mode


def _from_options(fields: dict) -> str:
    egress = list(fields.get("egress") or ())
    ingress = list(fields.get("ingress") or ())
    if fields.get("deny_egress") and egress:
        raise ValueError("network: deny_egress=True cannot be combined with egress rules; drop one")
    policy(fields)  # refuses what has no local meaning, naming it
    if not ingress and fields.get("deny_egress"):
        return "none"
    if not ingress and (not egress or any(_rule_is_any(rule) for rule in egress)):
        return "host"
    return "bridge"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One allow rule: destinations (egress) or sources (ingress) by network, and ports.

    ``nets``: CIDRs ("10.1.0.0/16"); empty means any address. ``excepts``: CIDRs taken out of them.
    ``ports``: (protocol, first, last) triples, protocol "tcp" or "udp"; empty means every port.
    """

    nets: tuple[str, ...] = ()
    excepts: tuple[str, ...] = ()
    ports: tuple[tuple[str, int, int], ...] = ()
    dns_name: str | None = None  # an egress rule naming a host: its addresses fill ``nets`` at start
    peers: bool = False  # ingress only from the bridge sandboxes of the same client (private services)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A bridge sandbox's rules, as plain data. ``egress``/``ingress`` None: allow all / allow none
    of what they cover (egress: everything the sandbox sends; ingress: connections from other
    sandboxes and the host's other interfaces; the host itself always reaches a sandbox)."""

    egress: tuple[Rule, ...] | None = None  # None: any destination
    ingress: tuple[Rule, ...] = ()
    #: tcp ports of the sandbox mapped to a port on the host's 127.0.0.1 (exposed ports)
    expose: tuple[int, ...] = ()
    services: tuple = ()  # services.Port of each service

    @property
    def dns_names(self) -> tuple[str, ...]:
        return tuple(r.dns_name for r in self.egress or () if r.dns_name)


def policy(value: object, services: object = None) -> Policy:
    """The bridge rules of the ``network`` option (a mode string or bool means: egress anywhere, no
    ingress; None with services: no egress) and of ``services`` (see ``services``). Raises
    ValueError naming the rule and the fix for what has no local meaning."""
    from .. import _services

    ports = _services.parse(services)
    fields = _fields(value) if not isinstance(value, (str, bool)) and value is not None else None
    if fields is None:
        fields = {"deny_egress": value is None and bool(ports)}
    egress: tuple[Rule, ...] | None = None
    if fields.get("deny_egress"):
        egress = ()
    elif fields.get("egress") and not any(_rule_is_any(r) for r in fields["egress"]):
        egress = tuple(_rule(r, f"egress[{i}]", egress=True) for i, r in enumerate(fields["egress"]))
    ingress = () if fields.get("deny_ingress") else tuple(
        _rule(r, f"ingress[{i}]", egress=False) for i, r in enumerate(fields.get("ingress") or ()))
    expose = sorted({port for rule in ingress for proto, first, last in rule.ports if proto == "tcp"
                     for port in range(first, last + 1)} | {p.port for p in ports if p.public})
    ingress += tuple(Rule(ports=((p.protocol, p.port, p.port),), peers=True) for p in ports if not p.public)
    if len(expose) > MAX_EXPOSED:
        raise ValueError(f"network ingress rules expose {len(expose)} tcp ports; at most {MAX_EXPOSED} are "
                         f"mapped to the host: name single ports or short ranges")
    return Policy(egress=egress, ingress=ingress, expose=tuple(expose), services=ports)


#: At most this many tcp ports of one sandbox are mapped to host ports.
MAX_EXPOSED = 64


def _rule(rule: object, where: str, egress: bool) -> Rule:
    ports = tuple(_ports(_get(rule, "ports") or (), where))
    if _get(rule, "selector"):
        raise ValueError(f"network {where}: selector rules pick Kubernetes pods and have no local meaning; "
                         f"use a cidr rule (sandboxes are in {sandbox_range()})")
    if _get(rule, "any"):
        return Rule(ports=ports)
    if _get(rule, "tenant"):  # locally, every tenant scope is "the other sandboxes of this host"
        return Rule(nets=(str(sandbox_range()),), ports=ports)
    name = _get(rule, "dns_name") if egress else None
    if name:
        if not isinstance(name, str) or name.startswith("*"):
            raise ValueError(f"network {where}: dns_name {name!r} must be one host name (wildcards are not "
                             f"resolved locally: names are resolved once, when the sandbox starts)")
        return Rule(ports=ports or (("tcp", 443, 443),), dns_name=name)
    block = _get(rule, "cidr")
    if block is None:
        raise ValueError(f"network {where} {rule!r} names no cidr, any, tenant{', dns_name' if egress else ''}; "
                         f"use e.g. {{'cidr': '10.0.0.0/8'}}")
    cidr, excepts = (block, ()) if isinstance(block, str) else (_get(block, "cidr"), _get(block, "except_cidrs") or ())
    return Rule(nets=(_cidr(cidr, where),), excepts=tuple(_cidr(c, where) for c in excepts), ports=ports)


def _cidr(text: object, where: str) -> str:
    try:
        net = ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        raise ValueError(f"network {where}: {text!r} is not a CIDR; use e.g. '10.0.0.0/8'") from None
    if net.version != 4:
        raise ValueError(f"network {where}: {text!r} is IPv6; bridge sandboxes have IPv4 only")
    return str(net)


def _ports(ports: object, where: str):
    for port in ports:
        first = _get(port, "port") if not isinstance(port, int) else port
        last = (_get(port, "end_port") if not isinstance(port, int) else None) or first
        proto = (_get(port, "protocol") if not isinstance(port, int) else None) or "tcp"
        proto = getattr(proto, "value", proto)
        if proto not in ("tcp", "udp"):
            raise ValueError(f"network {where}: protocol {proto!r} is not filtered locally; use 'tcp' or 'udp'")
        if not (isinstance(first, int) and isinstance(last, int) and 1 <= first <= last <= 65535):
            raise ValueError(f"network {where}: port range {first!r}..{last!r} is not within 1..65535")
        yield proto, first, last


ENV_RANGE = "SANDPOOL_BRIDGE_CIDR"
DEFAULT_RANGE = "10.213.0.0/16"


def sandbox_range() -> ipaddress.IPv4Network:
    """The address range of bridge sandboxes: ``$SANDPOOL_BRIDGE_CIDR``, else 10.213.0.0/16; a
    /30 of it per sandbox (host end .1, sandbox .2)."""
    text = os.environ.get(ENV_RANGE) or DEFAULT_RANGE
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError:
        raise ValueError(f"${ENV_RANGE}={text!r} is not an IPv4 network; use e.g. {DEFAULT_RANGE}") from None
    if not 8 <= net.prefixlen <= 24:
        raise ValueError(f"${ENV_RANGE}={text!r} must be between a /8 and a /24; use e.g. {DEFAULT_RANGE}")
    return net


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
