"""Pulling from a real registry (Debian's docker-registry on loopback): tags, digests, platforms,
auth, TLS with a test CA, mirrors, a shared layer stored once, a killed pull, 20 starts at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

import pytest

from images_helpers import (DOCKER_LIST, OCI_INDEX, PASSWORD, USER, BearerFront, StallingProxy, busybox_layer,
                            config_blob, image_env, registries, tar_layer)
from sandpool import Session, SandboxStatus
from sandpool._images import endpoints, manifest, pull, reference
from sandpool._images.errors import ImageError
from sandpool._images.store import Store
from sandpool._isolation import probe

__all__ = ["image_env", "registries"]  # fixtures
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = manifest.this_platform()[1]
needs_namespaces = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                      reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")


@pytest.fixture(scope="module")
def busybox(registries):
    """test.local/busybox:1 — busybox, with Env and WorkingDir in its config; its manifest digest."""
    digest, _ = registries.push.image("busybox", "1", [busybox_layer()],
                                      config_blob(["PATH=/bin", "GREETING=hello from the image"], "/work"))
    return digest


def layer_dirs(store: str) -> list[str]:
    return sorted(os.listdir(Store(store).path("layers", "sha256")))


def test_references_parse_like_docker():
    """Short names are Docker Hub's library images; hosts, ports, tags and digests are kept."""
    d = "sha256:" + "a" * 64
    assert str(reference.parse("python:3.11")) == "docker.io/library/python:3.11"
    assert str(reference.parse("user/app")) == "docker.io/user/app:latest"
    assert str(reference.parse("localhost:5000/a/b:t")) == "localhost:5000/a/b:t"
    assert reference.parse(f"ghcr.io/o/r@{d}").ref == d
    assert reference.parse(f"ghcr.io/o/r:1@{d}").tag == "1"
    for bad in ("", "UPPER/case", "a:b:c", "x@sha256:abc", "a/../b", " python"):
        with pytest.raises(ImageError, match="invalid"):
            reference.parse(bad)


def test_bad_mirror_settings_name_the_variable_and_the_form():
    """SANDPOOL_REGISTRY_MIRRORS errors say which pair is wrong and how it should look."""
    for value in ("docker.io", "docker.io=ftp://x", "=http://x"):
        with pytest.raises(ImageError, match="SANDPOOL_REGISTRY_MIRRORS"):
            endpoints.mirrors(value)
    table = endpoints.mirrors("docker.io=http://127.0.0.1:5000, ghcr.io=https://mirror:8443")
    assert str(table["docker.io"]) == "http://127.0.0.1:5000" and table["ghcr.io"].port == 8443


def test_pull_by_tag_then_by_digest(busybox, image_env):
    """A tag pulls the image and records its digest; the digest names the same image, no layer fetched again."""
    record = pull.pull("test.local/busybox:1", image_env)
    assert record.digest == busybox and record.reference == "test.local/busybox:1"
    assert record.env == ("PATH=/bin", "GREETING=hello from the image") and record.working_dir == "/work"
    root = Store(image_env).layer_root(record.layers[0])
    assert os.path.islink(os.path.join(root, "bin", "sh")) and os.access(os.path.join(root, "bin", "busybox"), os.X_OK)
    seen = []

    class Watch(pull.Progress):
        def layer(self, digest, size, cached):
            seen.append(cached)

    again = pull.pull(f"test.local/busybox@{busybox}", image_env, progress=Watch())
    assert again.layers == record.layers and seen == [True]
    with pytest.raises(ImageError, match="not found"):
        pull.pull("test.local/busybox:nope", image_env)
    with pytest.raises(ImageError, match="not found"):
        pull.pull("test.local/busybox@sha256:" + "0" * 64, image_env)


def test_an_index_gives_this_machines_platform(registries, image_env):
    """From an index of two platforms, the pull takes this machine's; another platform on request."""
    other = "s390x" if ARCH != "s390x" else "amd64"
    entries = []
    for arch in (other, ARCH):
        layer = tar_layer([("arch", "file", arch.encode())])
        _, descriptor = registries.push.image("multi", None, [layer], config_blob(arch=arch))
        entries.append({**descriptor, "platform": {"os": "linux", "architecture": arch}})
    registries.push.manifest("multi", "1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                             OCI_INDEX)
    registries.push.manifest("multi", "other-only", {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                     "manifests": entries[:1]}, OCI_INDEX)
    store = Store(image_env)
    mine = pull.pull("test.local/multi:1", image_env)
    assert mine.digest == entries[1]["digest"]
    with open(os.path.join(store.layer_root(mine.layers[0]), "arch")) as f:
        assert f.read() == ARCH
    theirs = pull.pull("test.local/multi:1", image_env, platform=("linux", other, None))
    with open(os.path.join(store.layer_root(theirs.layers[0]), "arch")) as f:
        assert f.read() == other
    with pytest.raises(ImageError, match=f"no image for this machine's platform linux/{ARCH}.*linux/{other}"):
        pull.pull("test.local/multi:other-only", image_env)


def test_docker_media_types_pull_like_oci_ones(registries, image_env):
    """A Docker manifest list of Docker v2 schema 2 manifests (what 'docker push' writes) pulls too."""
    _, descriptor = registries.push.image("dockerish", None, [busybox_layer()], config_blob(["PATH=/bin", "D=1"]),
                                          docker=True)
    registries.push.manifest("dockerish", "1", {
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{**descriptor, "platform": {"os": "linux", "architecture": ARCH}}]}, DOCKER_LIST)
    record = pull.pull("test.local/dockerish:1", image_env)
    assert record.digest == descriptor["digest"] and "D=1" in record.env


def test_the_host_fallback_is_explicit_and_said(registries, image_env, monkeypatch, caplog):
    """SANDPOOL_IMAGE_FALLBACK=host: a name the store lacks runs on the host, with a warning and no
    pull; a stored image is still used as itself."""
    from sandpool._isolation import images

    monkeypatch.setenv("SANDPOOL_IMAGE_FALLBACK", "host")
    registries.push.image("fallback", "1", [busybox_layer()], config_blob())
    with caplog.at_level(logging.WARNING, logger="sandpool"):
        assert images.resolve("test.local/fallback:1") == "/"
    assert "using the host image instead of pulling it" in caplog.text
    assert registries.plain.requests("/v2/fallback/") == 0
    record = pull.pull("test.local/fallback:1", image_env)
    assert images.resolve("test.local/fallback:1") == Store(image_env).layer_root(record.layers[0])


def test_the_process_level_refuses_a_registry_image_without_pulling_it(registries, image_env):
    """At the process level (the host's files) an image cannot be used: a clear error, no download."""
    from sandpool import SandboxFailedError

    with Session() as session:
        with pytest.raises(SandboxFailedError, match="needs isolation='namespaces'"):
            session.sandbox(container_image="test.local/never:1", isolation="process").wait()
    assert registries.plain.requests("/v2/never/") == 0


def test_the_process_level_says_once_that_it_is_the_last_resort(monkeypatch, caplog):
    """When 'auto' can only have the process level, one warning says so and why; not at every start."""
    monkeypatch.setattr(probe, "unavailable", lambda level: "no namespaces in this test")
    probe._last_resort.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="sandpool"):
            assert probe.best() == probe.best() == "process"
        said = [r for r in caplog.records if "last resort" in r.getMessage()]
        assert len(said) == 1 and "no namespaces in this test" in said[0].getMessage()
    finally:
        probe._last_resort.cache_clear()


def test_docker_config_credentials_are_found_by_host(tmp_path):
    """~/.docker/config.json: Docker Hub under its v1 URL, other hosts with or without a scheme,
    username/password entries; a broken auth value is an error naming the file."""
    import base64

    from sandpool._images import auth

    path = tmp_path / "config.json"
    hub = base64.b64encode(b"hubuser:hubpass").decode()
    path.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub},
                                          "ghcr.io": {"username": "g", "password": "p"},
                                          "bad.example": {"auth": "bm9jb2xvbg=="}}}))
    assert auth.from_docker_config("docker.io", path=str(path)) == ("hubuser", "hubpass")
    assert auth.from_docker_config("ghcr.io", path=str(path)) == ("g", "p")
    assert auth.from_docker_config("quay.io", path=str(path)) is None
    with pytest.raises(ImageError, match="config.json.*not base64 of 'user:password'"):
        auth.from_docker_config("bad.example", path=str(path))
    assert auth.challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                          'scope="repository:library/python:pull"') == ("bearer", {
                              "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                              "scope": "repository:library/python:pull"})


def test_auth_required_refused_and_accepted(busybox, registries, image_env, tmp_path):
    """A registry with htpasswd: anonymous pulls and wrong passwords fail saying so; the right
    credentials work, passed explicitly or from ~/.docker/config.json."""
    with pytest.raises(ImageError, match="needs credentials.*docker login"):
        pull.pull("auth.local/busybox:1", image_env)
    with pytest.raises(ImageError, match=r"refused the credentials \(HTTP 401\)"):
        pull.pull("auth.local/busybox:1", image_env, credentials=(USER, "wrong"))
    assert pull.pull("auth.local/busybox:1", image_env, credentials=(USER, PASSWORD)).digest == busybox
    Store(image_env).remove("auth.local/busybox:1")
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {f"http://{registries.auth.host}": {"auth": token}}}))
    assert pull.pull("auth.local/busybox:1", image_env).digest == busybox


def _fake_helper(directory, name: str, body: str) -> None:
    """``docker-credential-<name>``: a shell script that logs its argument and stdin, then runs ``body``."""
    script = directory / f"docker-credential-{name}"
    script.write_text(f"#!/bin/sh\necho \"$1 $(cat)\" >> {directory}/asked\n{body}\n")
    script.chmod(0o755)


def test_credential_helpers_from_the_docker_config(busybox, registries, image_env, tmp_path, monkeypatch):
    """credHelpers (per host) and credsStore: ``docker-credential-<name> get`` is asked with the
    server's name on stdin and its Username/Secret pull from the htpasswd registry; a helper
    with no entry falls through to the registry's refusal, a missing or failing helper is an error
    naming it and the fix, and the secret is never in an error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    answer = json.dumps({"ServerURL": "x", "Username": USER, "Secret": PASSWORD})
    _fake_helper(bin_dir, "sandpooltest", f"echo '{answer}'")
    _fake_helper(bin_dir, "empty", "echo 'credentials not found in native keychain'; exit 1")
    _fake_helper(bin_dir, "broken", "echo 'the keychain is locked' >&2; exit 3")
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    host = registries.auth.host
    config.write_text(json.dumps({"credHelpers": {host: "sandpooltest"}}))
    assert pull.pull("auth.local/busybox:1", image_env).digest == busybox
    assert (bin_dir / "asked").read_text().split() == ["get", host]
    Store(image_env).remove("auth.local/busybox:1")
    config.write_text(json.dumps({"credsStore": "sandpooltest", "auths": {host: {}}}))
    assert pull.pull("auth.local/busybox:1", image_env).digest == busybox
    Store(image_env).remove("auth.local/busybox:1")
    config.write_text(json.dumps({"credsStore": "empty"}))
    with pytest.raises(ImageError, match="needs credentials"):
        pull.pull("auth.local/busybox:1", image_env)
    config.write_text(json.dumps({"credHelpers": {host: "broken"}}))
    with pytest.raises(ImageError, match=r"docker-credential-broken failed .*exit 3: the keychain is locked"):
        pull.pull("auth.local/busybox:1", image_env)
    config.write_text(json.dumps({"credHelpers": {host: "absent"}}))
    with pytest.raises(ImageError, match="docker-credential-absent is not on PATH; install it, or remove it") as err:
        pull.pull("auth.local/busybox:1", image_env)
    assert PASSWORD not in str(err.value)
    assert Store(image_env).record("auth.local/busybox:1") is None


def test_the_anonymous_bearer_token_flow(busybox, registries, image_env, monkeypatch):
    """A 401 with a Bearer challenge: the client asks the realm for a pull token for the repository
    (anonymously), then pulls with it."""
    front = BearerFront(registries.plain.host)
    try:
        monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", f"hub.local=http://127.0.0.1:{front.port}")
        assert pull.pull("hub.local/busybox:1", image_env).digest == busybox
        assert front.asked and "scope=repository%3Abusybox%3Apull" in front.asked[0]
        assert "service=test-registry" in front.asked[0]
    finally:
        front.close()


def test_tls_with_a_custom_ca(busybox, registries, image_env, monkeypatch):
    """A registry with a private CA: refused until SANDPOOL_REGISTRY_CA names the CA, then pulled."""
    name = f"{registries.tls.host}/busybox:1"
    with pytest.raises(ImageError, match="TLS with .* failed.*SANDPOOL_REGISTRY_CA"):
        pull.pull(name, image_env)
    monkeypatch.setenv("SANDPOOL_REGISTRY_CA", registries.ca)
    assert pull.pull(name, image_env).digest == busybox


def test_a_mirror_serves_docker_hub_names(busybox, registries, image_env, monkeypatch):
    """docker.io=URL in SANDPOOL_REGISTRY_MIRRORS: 'busybox:1' (library/busybox on Docker Hub) comes
    from the mirror, and nothing is asked of Docker Hub."""
    registries.push.image("library/busybox", "1", [busybox_layer()], config_blob(["PATH=/bin"]))
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", registries.mirrors(**{"docker.io": registries.plain.url}))
    before = registries.plain.requests("/v2/library/busybox/manifests/1")
    record = pull.pull("busybox:1", image_env)
    assert record.reference == "docker.io/library/busybox:1"
    assert registries.plain.requests("/v2/library/busybox/manifests/1") == before + 1


def test_a_layer_shared_by_two_images_is_stored_and_fetched_once(registries, image_env):
    """Two images on one base layer: three layers in the store, the base fetched once."""
    base = tar_layer([("etc", "dir", None), ("etc/base", "file", b"shared")])
    tops = [tar_layer([("etc/top", "file", name.encode())]) for name in ("a", "b")]
    for name, top in zip(("a", "b"), tops):
        registries.push.image(f"shared-{name}", "1", [base, top], config_blob(layers=2))
    a = pull.pull("test.local/shared-a:1", image_env)
    b = pull.pull("test.local/shared-b:1", image_env)
    assert a.layers[0] == b.layers[0] and a.layers[1] != b.layers[1]
    assert len(layer_dirs(image_env)) == 3
    assert registries.plain.requests(f"/blobs/{a.layers[0]}") == 1
    lower = Store(image_env).lowerdir(b).split(":")
    assert lower == [Store(image_env).layer_root(d) for d in reversed(b.layers)]
    Store(image_env).remove("test.local/shared-a:1")
    assert [d for d, _ in Store(image_env).prune()] == [a.layers[1]]
    assert len(layer_dirs(image_env)) == 2


def test_a_killed_pull_leaves_nothing_half_made(registries, image_env, monkeypatch):
    """'sandpool image pull' SIGKILLed in the middle of a layer: no image, no layer of it, and the
    next pull succeeds and sweeps the leftovers."""
    big = tar_layer([("blob", "file", os.urandom(8 * 2**20))])
    registries.push.image("big", "1", [tar_layer([("small", "file", b"1")]), big], config_blob(layers=2))
    proxy = StallingProxy(registries.plain.port, after=2 * 2**20)
    try:
        monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", f"slow.local=http://127.0.0.1:{proxy.port}")
        child = subprocess.Popen([sys.executable, "-m", "sandpool", "image", "pull", "slow.local/big:1"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proxy.stalled.wait(60), child.communicate(timeout=60)
            child.send_signal(signal.SIGKILL)
        finally:
            child.communicate()
        assert child.returncode == -signal.SIGKILL
        store = Store(image_env)
        assert store.record("slow.local/big:1") is None
        assert not store.has_layer("sha256:" + __import__("hashlib").sha256(big).hexdigest())
        assert not any(name.endswith(("root", "layer.json")) for name in os.listdir(store.path("tmp")))
        proxy.release.set()
        record = pull.pull("slow.local/big:1", image_env)
        assert all(store.has_layer(d) for d in record.layers)
        assert os.listdir(store.path("tmp")) == []
    finally:
        proxy.close()


def test_image_cli_pull_ls_inspect_rm_prune(busybox, image_env):
    """The image commands, each with --output json, on a pulled image."""
    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "sandpool", "image", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    pulled = cli("pull", "test.local/busybox:1", "--output", "json")
    assert json.loads(pulled.stdout)["digest"] == busybox
    assert "[##############################]" in pulled.stderr and "done" in pulled.stderr  # per-layer progress
    listed = json.loads(cli("ls", "--output", "json").stdout)
    assert [r["digest"] for r in listed if r["source"] == "registry"] == [busybox]
    info = json.loads(cli("inspect", "test.local/busybox:1").stdout)
    assert info["working_dir"] == "/work" and os.path.isdir(info["layer_dirs"][0])
    removed = json.loads(cli("rm", "test.local/busybox:1", "--output", "json").stdout)
    assert removed == {"removed": "test.local/busybox:1"}
    pruned = json.loads(cli("prune", "--output", "json").stdout)
    assert pruned["removed_layers"] == info["layers"] and pruned["freed_bytes"] > 0
    failed = subprocess.run([sys.executable, "-m", "sandpool", "image", "inspect", "test.local/busybox:1"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "sandpool image pull test.local/busybox:1" in failed.stderr


@needs_namespaces
def test_a_sandbox_runs_the_images_own_files_with_its_env_and_workdir(busybox, image_env):
    """A sandbox of the pulled busybox image: its sh, its Env (under the spec's variables), its
    WorkingDir; a file written through the file API runs with exec."""
    with Session(defaults={"isolation": "namespaces"}) as session:
        sb = session.sandbox(container_image="test.local/busybox:1", environment_variables={"EXTRA": "spec"})
        out = sb.exec(["sh", "-c", "echo $GREETING; echo $EXTRA; pwd; ls /bin/busybox; echo $PATH"]).result()
        assert out.stdout == "hello from the image\nspec\n/work\n/bin/busybox\n/bin\n", out
        sb.write_file("/tmp/script.sh", b"echo ran $0 in $(pwd)\n").result()
        assert sb.exec(["sh", "/tmp/script.sh"]).result().stdout == "ran /tmp/script.sh in /work\n"
        over = session.sandbox(container_image="test.local/busybox:1", environment_variables={"GREETING": "mine"})
        assert over.exec(["sh", "-c", "echo $GREETING"]).result().stdout == "mine\n"


@needs_namespaces
def test_a_sandbox_is_creating_while_its_image_is_pulled(registries, image_env, monkeypatch):
    """Sandbox.status is 'creating' while the pull is held midway, then the sandbox runs."""
    registries.push.image("held", "1", [busybox_layer()], config_blob())
    proxy = StallingProxy(registries.plain.port, after=64 * 1024)
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", f"slow.local=http://127.0.0.1:{proxy.port}")
    try:
        with Session(defaults={"isolation": "namespaces"}) as session:
            sb = session.sandbox(container_image="slow.local/held:1")
            started = sb.start()
            assert proxy.stalled.wait(60)
            assert sb.status == SandboxStatus.CREATING
            proxy.release.set()
            started.result()
            assert sb.exec(["sh", "-c", "echo up"]).result().stdout == "up\n"
            assert sb.status == SandboxStatus.RUNNING
    finally:
        proxy.close()


@needs_namespaces
def test_twenty_sandboxes_of_a_new_image_pull_it_once(registries, image_env, caplog):
    """20 sandboxes of an image not yet stored start at once: one pull, and every one runs its sh."""
    registries.push.image("crowd", "1", [busybox_layer(), tar_layer([("crowd", "file", b"yes")])],
                          config_blob(layers=2))
    caplog.set_level(logging.INFO, logger="sandpool")
    with Session(defaults={"isolation": "namespaces"}) as session:
        boxes = [session.sandbox(container_image="test.local/crowd:1") for _ in range(20)]
        outs = [sb.exec(["cat", "/crowd"]) for sb in boxes]
        assert [o.result().stdout for o in outs] == ["yes"] * 20
    pulls = [r for r in caplog.records if r.getMessage().startswith("pulling image test.local/crowd:1")]
    assert len(pulls) == 1
    assert registries.plain.requests("/v2/crowd/manifests/1") == 1
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pulled image test.local/crowd:1")]
    assert len(done) == 1 and "2 layers" in done[0] and " in " in done[0]


def test_a_threaded_pull_and_a_cli_pull_of_one_image_fetch_it_once(registries, image_env):
    """Processes and threads pulling one image at once: one fetch of each layer, one record."""
    registries.push.image("race", "1", [tar_layer([("r", "file", os.urandom(2**20))])], config_blob())
    child = subprocess.Popen([sys.executable, "-m", "sandpool", "image", "pull", "test.local/race:1"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pull.pull("test.local/race:1", image_env,
                                                                        refresh=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.wait(120) == 0, child.stderr.read()
    assert len({r.digest for r in results}) == 1 and len(results) == 3
    assert registries.plain.requests(f"/blobs/{results[0].layers[0]}") == 1
