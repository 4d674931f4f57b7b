"""The guide "python:3.11 from a registry mirror" (docs/images.md), run as written: an empty store,
``SANDPOOL_REGISTRY_MIRRORS=docker.io=<the test registry>``, and the Session guide's
``container_image="python:3.11"``; as root here, and through ``sandpool serve --cwsandbox`` with the
published cwsandbox client. (As an ordinary user: tests/isolation/test_rootless.py.) The image is
images_helpers' python:3.11-like one: its own python at /usr/local/bin/python."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from images_helpers import PYTHON_IMAGE, image_env, python_image, registries
from sandpool import SandboxDefaults, Session
from sandpool._grpc import endpoint
from sandpool._images import pull
from sandpool._isolation import probe
from service_helpers import REPO, ServerProcess, wait_until
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)

__all__ = ["image_env", "python_image", "registries"]  # fixtures
needs_namespaces = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                      reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")
SCRIPT = b"import os, sys; print(sys.executable, sys.version_info[:2], os.getcwd())"


@needs_namespaces
def test_the_session_guide_runs_python_3_11_from_a_mirror(registries, image_env, python_image, monkeypatch):
    """With an empty store, the guide's first sandbox pulls python:3.11 through the docker.io mirror;
    a file written with write_file runs under the image's own python, in the image's WorkingDir."""
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", registries.hub_mirrors())
    assert pull.find(python_image, image_env) is None
    defaults = SandboxDefaults(container_image=python_image, tags=("project-alpha",))
    with Session(defaults=defaults) as session:
        sb = session.sandbox()
        sb.write_file("/tmp/script.py", SCRIPT).result()
        out = sb.exec(["python", "/tmp/script.py"]).result().stdout
    assert out == "/usr/local/bin/python (3, 11) /srv/app\n"
    assert pull.find(python_image, image_env).reference == "docker.io/library/python:3.11"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_namespaces
def test_the_cwsandbox_client_gets_python_3_11_through_serve(cwsandbox_client, registries, python_image,  # noqa: F811
                                                             tmp_path):
    """``sandpool serve --cwsandbox`` with the mirror and an empty store: an unmodified cwsandbox
    program naming python:3.11 gets the pulled image (no host fallback is set), and write_file then
    exec of that file runs the image's python."""
    port = _free_port()
    env = {"SANDPOOL_REGISTRY_MIRRORS": registries.hub_mirrors(), "SANDPOOL_IMAGE_DIR": str(tmp_path / "images")}
    with ServerProcess(str(tmp_path), "--cwsandbox", f"127.0.0.1:{port}", env=env):
        api_key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        assert api_key, "the cwsandbox listener wrote no token"
        program = tmp_path / "program.py"
        program.write_text(textwrap.dedent(f"""
            import cwsandbox
            from cwsandbox import SandboxDefaults

            defaults = SandboxDefaults(container_image="python:3.11", tags=("project-alpha",))
            with cwsandbox.Session(defaults=defaults) as session:
                sb = session.sandbox()
                sb.write_file("/tmp/script.py", {SCRIPT!r}).result()
                print(sb.exec(["python", "/tmp/script.py"]).result().stdout, end="")
        """))
        client_env = {**{k: v for k, v in os.environ.items() if not k.startswith("SANDPOOL_")},
                      "CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": api_key,
                      "GRPC_VERBOSITY": "ERROR"}
        done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120, cwd=REPO,
                              env=client_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/usr/local/bin/python (3, 11) /srv/app\n"
    assert pull.find(PYTHON_IMAGE, str(tmp_path / "images")) is not None
