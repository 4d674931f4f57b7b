"""``sandpool serve --cwsandbox``: one server, two APIs, the same sandboxes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

from sandpool._grpc import endpoint

from service_helpers import REPO, ServerProcess, run_client, wait_until
from test_cwsandbox_client import cwsandbox_client  # noqa: F401 (the fixture: installs the client)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cwsandbox_client_sandbox_is_a_sandpool_sandbox(cwsandbox_client, tmp_path, monkeypatch):  # noqa: F811
    """What an unmodified cwsandbox program creates through --cwsandbox is listed, used and stopped
    through sandpool's own API on the same server. Its API key is the one the server made and wrote
    to its listener record; without it, the program is refused."""
    port = _free_port()
    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")  # cwsandbox's default image, python:3.11: no registry here
    with ServerProcess(str(tmp_path), "--cwsandbox", f"127.0.0.1:{port}") as server:
        api_key = wait_until(lambda: endpoint.token_for(f"127.0.0.1:{port}"), timeout=30)
        assert api_key, "the cwsandbox listener wrote no token"
        program = textwrap.dedent("""
            import cwsandbox
            sb = cwsandbox.Sandbox.run(tags=["from-cwsandbox"])
            sb.wait()
            print(sb.sandbox_id)
        """)
        env = {"CWSANDBOX_BASE_URL": f"http://127.0.0.1:{port}", "CWSANDBOX_API_KEY": "local",
               "GRPC_VERBOSITY": "ERROR"}
        path = tmp_path / "program.py"
        path.write_text(program)
        refused = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, cwd=REPO,
                                 env={**os.environ, **env})
        assert refused.returncode != 0 and "CWSANDBOX_API_KEY" in refused.stderr, refused.stderr
        env["CWSANDBOX_API_KEY"] = api_key
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, cwd=REPO,
                              env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        sandbox_id = done.stdout.strip().splitlines()[-1]
        check = run_client(textwrap.dedent(f"""
            import sandpool
            found = sandpool.Sandbox.list(tags=["from-cwsandbox"], address={server.address!r}).result()
            assert [sb.sandbox_id for sb in found] == [{sandbox_id!r}], found
            sb = found[0]
            print(sb.exec(["echo", "shared"]).result().stdout.strip())
            sb.stop().result()
        """))
        assert check.returncode == 0, check.stderr
        assert check.stdout.strip() == "shared"
