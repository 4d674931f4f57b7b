"""cwsandbox's own wire protocol, served from sandpool sandboxes: unmodified cwsandbox programs run locally.

Standalone: ``python -m sandpool._cwsandbox --listen 127.0.0.1:PORT [--token-file F]``. Beside another
gRPC service, in a trio loop that holds a sandpool Session::

    async with open_backend(session) as backend:
        add_cwsandbox_servicer(grpc_server, backend, token=token)

The wire types come from descriptors vendored from the published client (``_descriptors``); they
need only the protobuf runtime (``pip install 'sandpool[cwsandbox]'``).
"""

from ._backend import CwsandboxBackend, open_backend
from ._servicer import add_cwsandbox_servicer
from ._server import serve

__all__ = ["CwsandboxBackend", "add_cwsandbox_servicer", "open_backend", "serve"]
