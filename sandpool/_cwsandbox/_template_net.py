"""A stored template's ``network``, ``services`` and ``volumes`` (sandpool's option forms) as the
fields of a cwsandbox ``SandboxSpec``, which the listener maps back (``_netspec``, ``_spec.volumes``)
to the same sandbox.

- ``network``: a NetworkOptions dict becomes the spec's rules one for one. A mode has no field of
  its own, so it becomes the rules that mean it: ``"none"`` (or False) denies egress, ``"host"`` (or
  True) is an ``any`` egress rule, ``"bridge"`` (a network of its own, egress anywhere) an egress
  rule for every IPv4 address.
- ``services``: one spec service each (port, name, protocol, visibility, endpoint).
- ``volumes``: a named volume is a registered volume (``volume_id`` = its name), a scratch volume a
  scratch volume (a directory of the sandbox's own filesystem through the listener), each mounted
  on the primary container; a bind of a host directory is refused (the listener never mounts one
  for a client).

Each function raises ValueError/TypeError naming the entry and the fix; ``_specfrom`` reports it as
INVALID_ARGUMENT naming the template. Plain sync code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import _options_volumes
from ._proto import Message, pb

_NETWORK_KEYS = {"deny_egress", "deny_ingress", "egress", "ingress"}
_RULE_KEYS = {"any", "cidr", "tenant", "dns_name", "ports"}
#: The egress rule a "bridge" network means: every IPv4 address (and so its own namespace, not the host's).
EVERYWHERE = "0.0.0.0/0"


def _enum(enum: Any, prefix: str, value: object, field: str) -> int:
    name = f"{prefix}{str(getattr(value, 'value', value)).upper()}"
    if name not in enum.keys():
        choices = ", ".join(k.removeprefix(prefix).lower() for k in enum.keys() if not k.endswith("UNSPECIFIED"))
        raise ValueError(f"{field}={value!r} is not one of {choices}")
    number: int = enum.Value(name)
    return number


def _list(value: object, field: str) -> Iterable[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{field} must be a list, got {type(value).__name__} {value!r}")
    return value


def network(value: object) -> Message:
    """The spec's NetworkOptions for a template's ``network`` (module doc)."""
    out = pb.NetworkOptions()
    if isinstance(value, (bool, str)):
        mode = ("host" if value else "none") if isinstance(value, bool) else value
        if mode == "none":
            out.deny_egress = True
        elif mode == "host":
            out.egress.add(any=True)
        elif mode == "bridge":
            out.egress.add().cidr.cidr = EVERYWHERE
        else:
            raise ValueError(f"network={value!r} is not a network mode; use 'none', 'host' or 'bridge' or "
                             f"NetworkOptions rules")
        return out
    if not isinstance(value, Mapping):
        raise TypeError(f"network must be a mode or NetworkOptions, got {type(value).__name__} {value!r}")
    unknown = sorted(set(value) - _NETWORK_KEYS)
    if unknown:
        raise ValueError(f"network sets {unknown[0]!r}, which cwsandbox's spec cannot carry; leave it out")
    out.deny_egress = bool(value.get("deny_egress"))
    out.deny_ingress = bool(value.get("deny_ingress"))
    for side in ("egress", "ingress"):
        for i, rule in enumerate(_list(value.get(side) or (), f"network {side}")):
            _rule(getattr(out, side).add(), rule, f"network {side}[{i}]", side == "egress")
    return out


def _rule(out: Message, rule: object, field: str, egress: bool) -> None:
    if not isinstance(rule, Mapping):
        raise TypeError(f"{field} must be a rule (EgressRule/IngressRule as a dict), got {rule!r}")
    allowed = _RULE_KEYS if egress else _RULE_KEYS - {"dns_name"}
    unknown = sorted(k for k, v in rule.items() if v not in (None, False, (), []) and k not in allowed)
    if unknown:
        raise ValueError(f"{field} sets {unknown[0]!r}, which has no local meaning (docs/network.md); leave it out")
    if rule.get("any"):
        out.any = True
    if rule.get("dns_name"):
        out.https_hostname = str(rule["dns_name"])
    if rule.get("tenant"):
        out.tenant = _enum(pb.TenantScope, "TENANT_SCOPE_", rule["tenant"], f"{field}.tenant")
    block = rule.get("cidr")
    if isinstance(block, Mapping):
        out.cidr.cidr = str(block.get("cidr") or "")
        getattr(out.cidr, "except").extend(str(c) for c in _list(block.get("except_cidrs") or (), field))
    elif block:
        out.cidr.cidr = str(block)
    for port in _list(rule.get("ports") or (), f"{field}.ports"):
        if isinstance(port, int):
            out.ports.add(port=port)
        elif isinstance(port, Mapping):
            protocol = port.get("protocol")
            out.ports.add(port=port.get("port") or 0, end_port=port.get("end_port") or 0,
                          protocol=str(getattr(protocol, "value", protocol) or ""))
        else:
            raise TypeError(f"{field}.ports: {port!r} is not a port or PortRange")


def services(value: Iterable[Any]) -> list[Message]:
    """The spec's services for a template's ``services`` (module doc)."""
    out = []
    for i, service in enumerate(_list(value, "services")):
        field = f"services[{i}]"
        if not isinstance(service, Mapping):
            raise TypeError(f"{field} must be a Service (as a dict), got {service!r}")
        row = pb.Service(port=service.get("port") or 0, name=service.get("name") or "")
        if service.get("protocol"):
            row.protocol = _enum(pb.ServiceProtocol, "SERVICE_PROTOCOL_", service["protocol"], f"{field}.protocol")
        if service.get("visibility"):
            row.visibility = _enum(pb.Visibility, "VISIBILITY_", service["visibility"], f"{field}.visibility")
        endpoint = service.get("endpoint")
        if endpoint:
            row.endpoint.kind = _enum(pb.EndpointKind, "ENDPOINT_KIND_", endpoint.get("kind"), f"{field}.endpoint.kind")
            if endpoint.get("auth"):
                row.endpoint.auth = _enum(pb.EndpointAuth, "ENDPOINT_AUTH_", endpoint["auth"], f"{field}.endpoint.auth")
            row.endpoint.request_timeout_seconds = int(endpoint.get("request_timeout_seconds") or 0)
        out.append(row)
    return out


def volumes(spec: Message, value: object) -> None:
    """Add a template's ``volumes`` to ``spec`` (its volumes, and mounts on its primary container)."""
    entries: tuple[dict[str, Any], ...] = _options_volumes.normalise(value, dict) or ()
    if not spec.containers:
        spec.containers.add()  # the one container (its image the default) that mounts them
    marked = [c for c in spec.containers if c.HasField("primary") and c.primary]
    container = marked[0] if marked else spec.containers[0]
    for i, entry in enumerate(entries):
        name = entry.get("name") or f"volume-{i}"
        if entry["kind"] == "bind":
            raise ValueError(f"volumes[{i}] binds the host directory {entry['host_path']!r}, which the listener "
                             f"never mounts for a client; use a named volume ('sandpool volume create NAME', then "
                             f"RegisteredVolumeOptions(volume_id=NAME))")
        if entry["kind"] == "named":
            spec.volumes.add(name=name, volume_id=entry["volume"])
            container.volume_mounts.add(volume=name, mount_path=entry["mount_path"], read_only=entry["read_only"],
                                        sub_path=entry.get("sub_path") or "")
        else:
            spec.volumes.add(name=name).scratch.size = str(entry["size"])
            container.volume_mounts.add(volume=name, mount_path=entry["mount_path"], read_only=entry["read_only"])
