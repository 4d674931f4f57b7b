"""cwsandbox's ``services=[Service(...)]``, given a local meaning on the bridge network.

- ``public``: the port is mapped to a port on the host's ``127.0.0.1`` (``ports.Forwarder``) and
  listed in ``service_urls`` (``http://`` for an HTTPS endpoint: TLS is not terminated locally,
  ``tcp://`` otherwise; a TLS passthrough endpoint also in ``service_addresses``, the workload owns
  its certificates, as in the cloud). tcp only.
- ``private`` (and ``custom``, and no visibility): reachable from the other bridge sandboxes of the
  same client runtime (nft: the sender's egress chain marks its packets with its owner's mark, the
  receiver's ingress chain admits that mark on the service's port), listed in ``service_urls`` as
  ``tcp://<sandbox address>:<port>``, which those sandboxes (and the host) can use.
- every service with a visibility is in ``exposed_ports`` as ``(port, name)``, as cwsandbox reports.

What cwsandbox refuses is refused the same way (an endpoint needs ``public`` visibility and tcp);
share tokens need an HTTP proxy in front of the port, which sandpool does not run: refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ._cwtypes import EndpointAuth, EndpointKind, HttpsEndpointStatus, TlsPassthroughEndpointStatus


@dataclasses.dataclass(frozen=True)
class Port:
    """One service, as plain data."""

    port: int
    name: str = ""
    protocol: str = "tcp"
    visibility: str = "unspecified"  # public, private, custom, unspecified
    endpoint: str | None = None  # https, tls_passthrough
    timeout: float | None = None  # an HTTPS endpoint's request timeout (reported only)

    @property
    def public(self) -> bool:
        return self.visibility == "public"


def _get(item: object, key: str) -> Any:
    """Field ``key`` of a service (a Service or its dict form, as the user gave it: checked below)."""
    value = item.get(key) if isinstance(item, Mapping) else getattr(item, key, None)
    return getattr(value, "value", value)


def parse(services: Sequence[object] | None) -> tuple[Port, ...]:
    """The ``services`` option as Ports; ValueError naming the service and the fix."""
    out: dict[tuple[int, str], Port] = {}
    for i, service in enumerate(services or ()):
        port, name = _get(service, "port"), _get(service, "name") or ""
        protocol = _get(service, "protocol") or "tcp"
        protocol = "tcp" if protocol == "unspecified" else protocol
        visibility = _get(service, "visibility") or "unspecified"
        endpoint = _get(service, "endpoint")
        kind = _get(endpoint, "kind") if endpoint else None
        where = f"services[{i}] (port {port})"
        if kind is not None:  # cwsandbox's own rule (Service.__post_init__)
            if visibility != "public":
                raise ValueError(f"{where}: an endpoint needs visibility='public', got {visibility!r}")
            if protocol != "tcp":
                raise ValueError(f"{where}: an endpoint needs protocol tcp, got {protocol!r}")
            if _get(endpoint, "auth") == "share_token":
                raise ValueError(f"{where}: share-token endpoints need an HTTP proxy that checks the token, "
                                 f"which a local sandbox does not run; use auth='open' (the port is mapped on "
                                 f"the host's 127.0.0.1 only)")
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"{where}: protocol {protocol!r} is not carried locally; use tcp or udp")
        if visibility == "public" and protocol != "tcp":
            raise ValueError(f"{where}: only tcp ports are mapped to the host; use protocol tcp or "
                             f"visibility 'private'")
        if (port, protocol) in out:
            raise ValueError(f"{where}: two services name {protocol} port {port}; give each port once")
        timeout = _get(endpoint, "request_timeout_seconds") if endpoint else None
        out[port, protocol] = Port(port, name, protocol, visibility, kind, timeout)
    return tuple(out.values())


def surfaces(ports: tuple[Port, ...], mapped: Mapping[int, str], address: str) -> dict[str, Any]:
    """What the sandbox reports: ``exposed_ports``, ``service_urls``, ``service_endpoints`` and
    ``service_addresses`` (cwsandbox's shapes), from its services, the host addresses its public
    ports are mapped to (``{port: "127.0.0.1:N"}``) and its own address. Ports mapped by ingress
    rules (not services) are listed too, with name ""."""
    exposed, urls, endpoints, addresses = [], [], [], []
    named = {p.port for p in ports if p.public}
    for p in ports:
        if p.visibility != "unspecified":
            exposed.append((p.port, p.name))
        if p.public:
            host = mapped[p.port]
            urls.append((p.port, p.name, f"{'http' if p.endpoint == 'https' else 'tcp'}://{host}"))
            if p.endpoint == "https":
                endpoints.append(HttpsEndpointStatus(port=p.port, name=p.name, kind=EndpointKind.HTTPS, auth=EndpointAuth.OPEN,
                                                     url=f"http://{host}", request_timeout_seconds=p.timeout or 15.0))
            elif p.endpoint == "tls_passthrough":
                addresses.append(TlsPassthroughEndpointStatus(port=p.port, name=p.name, kind=EndpointKind.TLS_PASSTHROUGH,
                                                              address=host))
        else:
            urls.append((p.port, p.name, f"{p.protocol}://{address}:{p.port}"))
    for port, host in sorted(mapped.items()):
        if port not in named:
            exposed.append((port, ""))
            urls.append((port, "", f"tcp://{host}"))
    return {"exposed_ports": tuple(exposed), "service_urls": tuple(urls),
            "service_endpoints": tuple(endpoints), "service_addresses": tuple(addresses)}
