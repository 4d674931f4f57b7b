"""``list_runners()`` reports the service visibilities this machine gives sandboxes, and the claim
holds: each one it reports starts a sandbox with such a service, reported back; when it reports
none, a sandbox with a service does not start."""

from __future__ import annotations

import pytest

import sandpool
from sandpool import SandboxFailedError, Service, ServiceVisibility, Session


def test_the_runner_reports_the_visibilities_sandboxes_here_get():
    """The runner's visibilities are public and private or none; the service_visibility filter keeps
    the runner for exactly those (a str or the enum); and each one reported really works."""
    [runner] = sandpool.list_runners()
    claimed = runner.supported_service_visibilities
    assert claimed in ((), ("public", "private"))
    for visibility in ("public", "private", "custom", ServiceVisibility.PUBLIC):
        found = sandpool.list_runners(service_visibility=visibility)
        assert (found != []) == (str(getattr(visibility, "value", visibility)) in claimed), visibility
    with Session() as session:
        if not claimed:
            with pytest.raises((SandboxFailedError, ValueError)):
                session.sandbox(services=[Service(port=8400, visibility="private")]).start().result()
            return
        sb = session.sandbox(services=[Service(port=8400 + i, name=v, visibility=v) for i, v in enumerate(claimed)])
        sb.start().result()
        assert sb.exposed_ports == tuple((8400 + i, v) for i, v in enumerate(claimed))
        urls = {name: url for _port, name, url in sb.service_urls}
        assert urls["public"].startswith("tcp://127.0.0.1:") and not urls["private"].startswith("tcp://127.0.0.1:")
