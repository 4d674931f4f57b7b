"""``sandpool serve``: a LocalRuntime's sandboxes shared over gRPC (control plane + data plane).

Modules: ``messages`` (the protocol, shared with the client in ``_runtime/_remote.py``),
``auth`` (token and TLS), ``control`` (sandboxes, leases, the orphan grace rule), ``journal`` (the
on-disk record), ``dataplane`` (relaying frames between clients and agents), ``server`` (gRPC
handlers and ``serve()``). Nothing is imported here, so the client loads only ``messages``.
"""
