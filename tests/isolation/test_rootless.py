"""Rootless sandboxes: an ordinary user's client gets the namespaces level through a user namespace.

The client runs as the ``unprivileged_user`` fixture's user (through ``setpriv``, Debian's
``/usr/bin/python3`` on this checkout and the venv's packages, as tests/security/test_service_policy
does), with its state directory under /tmp; it prints what it saw as JSON, and the test asserts here
and then looks for anything left behind with ``sandpool.testing.leftovers``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import textwrap

import pytest

from _sandpool_agent.confine import userns
from images_helpers import python_image, registries
from sandpool._isolation import probe
from sandpool.testing import leftovers

__all__ = ["python_image", "registries"]  # fixtures

_AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the test makes a client run as another user")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = sysconfig.get_paths()["purelib"]

_CLIENT = """
import json, logging, os, sys, tempfile
from sandpool import Sandbox, SandboxFailedError, Session

seen = {}
class Catch(logging.Handler):
    def emit(self, record):
        seen.setdefault("warnings", []).append(record.getMessage())
logging.getLogger("sandpool").addHandler(Catch(level=logging.WARNING))
state = os.environ["SANDPOOL_STATE_DIR"]
home = os.path.expanduser("~")
marker = os.path.join(home, ".sandpool-rootless-marker")
with open(marker, "w") as f:
    f.write("the user's own file")
"""


def _run_as(user, state_dir: str, body: str, extra_env: dict | None = None) -> dict:
    _name, uid, gid, home = user
    code = textwrap.dedent(_CLIENT) + textwrap.dedent(body) + "\nprint('RESULT' + json.dumps(seen))\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONPATH": f"{REPO}:{SITE}", "SANDPOOL_STATE_DIR": state_dir,
           **(extra_env or {})}
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "/usr/bin/python3", "-c", code]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd="/", timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"client failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT"):])


@pytest.fixture
def user_state(unprivileged_user):
    """A state directory under /tmp that the user owns; removed (as root) afterwards."""
    _name, uid, gid, _home = unprivileged_user
    parent = tempfile.mkdtemp(prefix="sandpool-rootless-", dir="/tmp")
    os.chown(parent, uid, gid)
    yield os.path.join(parent, "state")
    shutil.rmtree(parent, ignore_errors=True)


@_AS_ROOT
def test_rootless_client_gets_the_namespaces_level(unprivileged_user, user_state):
    """Everything the namespaces level gives root, checked inside a sandbox of an ordinary user's
    client; then nothing of it is left."""
    _name, uid, _gid, home = unprivileged_user
    seen = _run_as(unprivileged_user, user_state, """
        token = "made-inside-" + str(os.getpid())
        with Sandbox.run(resources={"limits": {"cpu": "0.5"}}) as sb:
            seen["isolation"] = sb.isolation
            seen["id"] = sb.sandbox_id
            def sh(script):
                r = sb.exec(["sh", "-c", script]).result()
                return r.stdout
            seen["ps"] = sh("ps -e -o pid=,comm=")
            seen["hostname"] = sh("hostname").strip()
            seen["uid"] = sh("id -u").strip()
            seen["status"] = sh("grep '^Seccomp:' /proc/self/status")
            seen["links"] = sh("cat /proc/net/dev")
            seen["unshare"] = sb.exec(["unshare", "-Ur", "true"]).result().returncode
            seen["home"] = sh(f"cat {marker} 2>&1; echo x > {marker} 2>&1; ls -d {home} 2>&1; true")
            sb.write_file("/tmp/script.py", b"import os; print('script ran as', os.getuid())")
            seen["script"] = sb.exec(["python3", "/tmp/script.py"]).result().stdout.strip()
            sh("touch /tmp/" + token)
            owners = []  # the file as the host sees it: through the sandbox's processes' roots
            for pid in os.listdir("/proc"):
                try:
                    owners.append(os.stat(f"/proc/{pid}/root/tmp/{token}").st_uid)
                except (OSError, ValueError):
                    pass
            seen["owners"] = owners
            with Sandbox.run(resources={"limits": {"memory": "64Mi"}}) as small:  # an rlimit, not a cgroup
                seen["memory"] = small.exec(["python3", "-c", "b = bytearray(200 << 20)"]).result().stderr
            with Sandbox.run(network="host") as net:  # /sys is then the host's, bound read-only
                r = net.exec(["sh", "-c", "cat /proc/net/dev; touch /sys/x"]).result()
                seen["host_net"] = [r.stdout, r.stderr]
            with Sandbox.run(isolation="process") as plain:  # same runtime, same (user-namespaced) template
                seen["process_uid"] = plain.exec(["id", "-u"]).result().stdout.strip()
        with open(marker) as f:
            seen["marker"] = f.read()
    """)
    assert seen["isolation"] == "namespaces"
    assert seen["hostname"] == seen["id"]
    comms = [line.split(None, 1)[1] for line in seen["ps"].strip().splitlines()]
    assert len(comms) <= 3 and "ps" in comms, seen["ps"]  # the agent, sh and ps: nothing of the host
    assert seen["uid"] == "0"
    assert seen["owners"] and set(seen["owners"]) == {uid}, seen["owners"]  # never root outside
    assert seen["script"] == "script ran as 0"
    assert "the user's own file" not in seen["home"] and seen["marker"] == "the user's own file"
    assert "No such file" in seen["home"]
    devices = [line.split(":")[0].strip() for line in seen["links"].splitlines()[2:]]
    assert devices == ["lo"], seen["links"]
    assert seen["status"].split() == ["Seccomp:", "2"]
    assert seen["unshare"] != 0
    assert "MemoryError" in seen["memory"]
    host_links, sys_error = seen["host_net"]
    assert len(host_links.splitlines()) > 3 and "Read-only file system" in sys_error, seen["host_net"]
    assert seen["process_uid"] == str(uid)  # the process level is the user again, not root of the template's namespace
    assert any("cpu limit" in w and "not enforced" in w for w in seen.get("warnings", [])), seen
    found = leftovers(user_state)
    assert not found, found


@_AS_ROOT
@pytest.mark.parametrize("ids", ["ranges", "single"])
def test_rootless_registry_image_runs_with_its_own_files(unprivileged_user, user_state, registries, python_image, ids):
    """An ordinary user pulls python:3.11 (a python:3.11-like image, through a docker.io mirror) into
    its own store (under XDG_CACHE_HOME) and runs it at the namespaces level: the image's python
    runs a file written with write_file, the layers' whiteout and opaque dir hold, setuid bits and
    device nodes are gone; with subordinate ranges (newuidmap) a file of uid 1000 keeps its owner
    (the first subordinate uid + 999 on the host) and chown works, with the single-id map everything
    is the user's (0 inside). Then rm and prune remove every layer (files of subordinate ids
    included) and nothing is left."""
    if ids == "ranges" and userns.ranges(unprivileged_user[1], unprivileged_user[2]) is None:
        pytest.skip("the user has no subordinate ranges or newuidmap is missing (apt-get install uidmap)")
    cache = os.path.join(os.path.dirname(user_state), "cache")
    extra = {"XDG_CACHE_HOME": cache, "SANDPOOL_REGISTRY_MIRRORS": registries.hub_mirrors(),
             **({"SANDPOOL_SUBIDS": "0"} if ids == "single" else {})}
    seen = _run_as(unprivileged_user, user_state, f"""
        from sandpool._images import pull, store as layers
        from sandpool._isolation import images
        seen["store"] = images.store_dir()
        with Session(defaults={{"isolation": "namespaces"}}) as session:
            sb = session.sandbox(container_image={python_image!r})
            def sh(script):
                r = sb.exec(["sh", "-c", script]).result()
                return r.stdout + r.stderr
            script = b"import sys, os; print(sys.executable, os.getcwd(), os.environ['PYTHON_VERSION'])"
            sb.write_file("/tmp/script.py", script).result()
            seen["script"] = sb.exec(["python", "/tmp/script.py"]).result().stdout.strip()
            seen["isolation"] = sb.isolation
            seen["owners"] = sh("stat -c '%u %g %a' /home/app /home/app/data /usr/local/bin/suid")
            seen["whiteout"] = [sh("cat /etc/motd"), sh("ls /opt/old"), sh("ls /opt")]
            seen["chown"] = sb.exec(["sh", "-c", "touch /tmp/f && chown 1000:1000 /tmp/f"]).result().returncode
        store = layers.Store(seen["store"])
        record = pull.find({python_image!r}, seen["store"])
        app = store.layer_root(record.layers[-1])
        seen["host"] = [os.stat(os.path.join(app, "home/app")).st_uid, os.stat(app).st_uid]
        seen["base"] = store.base
        store.remove(record.reference)
        seen["pruned"] = len(store.prune())
        seen["left"] = os.listdir(store.path("layers", "sha256")) + os.listdir(store.path("tmp"))
    """, extra)
    uid = unprivileged_user[1]
    assert seen["store"] == os.path.join(cache, "sandpool", "images")
    assert seen["isolation"] == "namespaces"
    assert seen["script"] == "/usr/local/bin/python /srv/app 3.11", seen
    motd, old, opt = seen["whiteout"]
    assert "No such file" in motd and old.split() == ["new"] and opt.split() == ["old"], seen  # no device node
    owners = [line.split() for line in seen["owners"].strip().splitlines()]
    if ids == "ranges":
        start = userns.ranges(uid, unprivileged_user[2]).uid[0]
        assert owners == [["1000", "1000", "700"], ["1000", "1000", "600"], ["0", "0", "755"]], seen
        assert seen["host"] == [start + 999, uid] and seen["chown"] == 0, seen
        assert seen["base"].endswith(".oci-rootless-" + userns.ranges(uid, unprivileged_user[2]).key())
    else:
        assert owners == [["0", "0", "700"], ["0", "0", "600"], ["0", "0", "755"]], seen
        assert seen["host"] == [uid, uid] and seen["chown"] != 0, seen
        assert seen["base"].endswith(".oci-rootless")
    assert seen["pruned"] == 3 and seen["left"] == [], seen
    found = leftovers(user_state)
    assert not found, found


def test_the_process_level_as_last_resort_says_so_once(monkeypatch, caplog):
    """When ``auto`` falls back to the process level, one warning says so and why, however often
    the level is chosen."""
    why = "uid 1000 cannot make a user namespace (test)"
    monkeypatch.setattr(probe, "unavailable", lambda level: why)
    probe._last_resort.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="sandpool"):
            assert [probe.best() for _ in range(3)] == ["process"] * 3
    finally:
        probe._last_resort.cache_clear()
    said = [r.getMessage() for r in caplog.records if "last resort" in r.getMessage()]
    assert len(said) == 1 and why in said[0]
