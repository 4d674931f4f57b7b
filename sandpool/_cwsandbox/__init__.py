"""cwsandbox's own wire protocol, served from sandpool sandboxes: unmodified cwsandbox programs run locally.

Standalone: ``python -m sandpool._cwsandbox --listen 127.0.0.1:PORT [--token-file F]``. Inside another
server's trio loop, for the sandboxes of a sandpool Session, on a listener of its own::

    async with open_cwsandbox_server(session, "127.0.0.1:50052", token=token) as address:
        ...

or on an existing sync ``grpc.server`` (before it starts)::

    async with open_backend(session) as backend:
        add_cwsandbox_servicer(grpc_server, backend, token=token)

The wire types come from descriptors vendored from the published client (``_descriptors``); they
need only the protobuf runtime (``pip install 'sandpool[cwsandbox]'``).
"""

from ._backend import CwsandboxBackend, open_backend
from ._servicer import add_cwsandbox_servicer
from ._server import open_cwsandbox_server, serve

__all__ = ["CwsandboxBackend", "add_cwsandbox_servicer", "open_backend", "open_cwsandbox_server", "serve"]
