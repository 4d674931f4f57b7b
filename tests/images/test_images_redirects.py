"""A registry's redirects are followed only to where they say: one to a URL with no host is refused
with an ImageError naming it (not a TypeError from inside http.client), and nothing else is asked."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from sandpool._images import endpoints, reference, registry
from sandpool._images.errors import ImageError


class _Server:
    """A loopback HTTP server answering every GET with ``status`` and ``location``; ``seen`` holds
    the paths asked."""

    def __init__(self, status: int, location: str = "") -> None:
        self.seen: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.seen.append(self.path)
                self.send_response(status)
                if location:
                    self.send_header("Location", location.format(port=server.victim_port))
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.victim_port = 0
        self.http = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[tuple[_Server, _Server]]:
    """(a registry that redirects to ``request.param``, a server on loopback it must not reach)."""
    victim, front = _Server(404), _Server(302, request.param)
    front.victim_port = victim.port
    try:
        yield front, victim
    finally:
        front.close()
        victim.close()


@pytest.mark.parametrize("servers", ["http://:{port}/v2/elsewhere", "https:///v2/elsewhere"], indirect=True)
def test_a_redirect_to_a_url_without_a_host_is_an_image_error(servers: tuple[_Server, _Server]) -> None:
    """The pull fails at the redirect, naming the URL; nothing is asked of this machine's other ports."""
    front, victim = servers
    client = registry.Client(reference.parse("test.local/busybox:1"),
                             endpoint=endpoints.parse_url(f"http://127.0.0.1:{front.port}", "test"), timeout=5.0)
    with pytest.raises(ImageError, match="names no host; check the registry's redirects"):
        client.manifest("1")
    assert front.seen == ["/v2/busybox/manifests/1"]
    assert victim.seen == []
