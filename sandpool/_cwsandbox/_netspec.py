"""A cwsandbox spec's network and services as sandpool's options, and the services' status back.

``SandboxSpec.network`` (ingress and egress rules, ``deny_*``) becomes sandpool's ``network=`` in
its dict form and ``SandboxSpec.services`` its ``services=`` (docs/network.md says what each means
locally: a bridge sandbox, nftables rules, public ports mapped to the server host's loopback). The
rules' own checks (a selector rule, a non-IPv4 CIDR, a share-token endpoint...) fail the create
with INVALID_ARGUMENT naming the rule. ``service_statuses`` reports the services as the client
reads them (``service_urls``, ``service_endpoints``, ``service_addresses``, ``exposed_ports``).
"""

from __future__ import annotations

from typing import Any

from ._proto import pb

_EGRESS_EXCEPT = "https_hostname_except"


def _enum(value: int, enum: Any, prefix: str) -> str:
    """A proto enum number as sandpool's lower-case name ("" for the unspecified value)."""
    name = enum.Name(value).removeprefix(prefix).lower()
    return "" if name == "unspecified" else name


def _rule(rule: Any, egress: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.any:
        out["any"] = True
    if rule.HasField("cidr"):
        out["cidr"] = {"cidr": rule.cidr.cidr, "except_cidrs": list(getattr(rule.cidr, "except"))}
    if rule.tenant:
        out["tenant"] = _enum(rule.tenant, pb.TenantScope, "TENANT_SCOPE_")
    if egress and rule.https_hostname:
        out["dns_name"] = rule.https_hostname
    if egress and rule.HasField("selector"):
        out["selector"] = True  # refused by the rules' own check, which names the fix
    if rule.ports:
        out["ports"] = [{"protocol": p.protocol or "tcp", "port": p.port, "end_port": p.end_port or None}
                        for p in rule.ports]
    return out


def network_options(spec: Any) -> dict[str, Any]:
    """``network`` and ``services`` options of a SandboxSpec (only those it sets). ValueError for
    what has no local meaning at all (excepted host names of an egress rule)."""
    options: dict[str, Any] = {}
    if spec.HasField("network"):
        net = spec.network
        for i, rule in enumerate(net.egress):
            if getattr(rule, _EGRESS_EXCEPT):
                raise ValueError(f"network egress[{i}]: https_hostname_except needs an HTTPS proxy that reads "
                                 f"host names, which a local sandbox does not run; allow the names you want "
                                 f"with https_hostname rules instead")
        network: dict[str, Any] = {"deny_egress": net.deny_egress, "deny_ingress": net.deny_ingress,
                                   "egress": [_rule(r, True) for r in net.egress],
                                   "ingress": [_rule(r, False) for r in net.ingress]}
        if any(network.values()):
            options["network"] = network
    if spec.services:
        options["services"] = [_service(s) for s in spec.services]
    return options


def _service(service: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"port": service.port, "name": service.name,
                           "protocol": _enum(service.protocol, pb.ServiceProtocol, "SERVICE_PROTOCOL_") or "tcp",
                           "visibility": _enum(service.visibility, pb.Visibility, "VISIBILITY_") or "unspecified"}
    if service.HasField("endpoint"):
        endpoint = service.endpoint
        out["endpoint"] = {"kind": _enum(endpoint.kind, pb.EndpointKind, "ENDPOINT_KIND_"),
                           "auth": _enum(endpoint.auth, pb.EndpointAuth, "ENDPOINT_AUTH_") or "open",
                           "request_timeout_seconds": endpoint.request_timeout_seconds or None}
    return out


def service_statuses(spec: Any, sandbox: Any) -> list[Any]:
    """``ServiceStatus`` rows of the spec's services from what the sandpool sandbox reports (its
    ``service_urls``, ``service_endpoints``, ``service_addresses``); none before it has a network."""
    if not spec.services:
        return []
    urls = {(port, name): url for port, name, url in sandbox.service_urls}
    https = {(e.port, e.name): e for e in sandbox.service_endpoints}
    tls = {(a.port, a.name): a for a in sandbox.service_addresses}
    if not urls:
        return []
    rows = []
    for service in spec.services:
        key = (service.port, service.name)
        row = pb.ServiceStatus(port=service.port, name=service.name, protocol=service.protocol,
                               visibility=service.visibility)
        if key in https:
            row.endpoint.CopyFrom(pb.EndpointStatus(kind=service.endpoint.kind, auth=service.endpoint.auth,
                                                    url=https[key].url, request_timeout_seconds=int(
                                                        https[key].request_timeout_seconds or 15)))
        elif key in tls:
            row.endpoint.CopyFrom(pb.EndpointStatus(kind=service.endpoint.kind, address=tls[key].address))
        elif key in urls:
            row.url = urls[key]
        rows.append(row)
    return rows
