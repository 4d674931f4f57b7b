"""``python -m sandpool._cwsandbox``: serve cwsandbox's API from local sandboxes (see ``_server``)."""

from ._server import main

main()
