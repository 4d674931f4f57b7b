"""Images at the namespaces level: an imported rootfs, unknown names, the fallback, a Debian build."""

import os
import shutil
import subprocess
import tarfile

import pytest

from sandpool import SandboxFailedError, Session
from sandpool._isolation import images, probe

pytestmark = pytest.mark.skipif(probe.unavailable("namespaces") is not None,
                                reason=f"namespaces level unavailable: {probe.unavailable('namespaces')}")


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "images"
    monkeypatch.setenv(images.ENV_IMAGE_DIR, str(path))
    monkeypatch.delenv(images.ENV_FALLBACK, raising=False)
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)  # a built Debian image is ~200 MB


def tiny_rootfs_tarball(tmp_path) -> str:
    """A rootfs of /bin/sh and the libraries it needs, plus an os-release naming it."""
    root = tmp_path / "tiny"
    for d in ("bin", "etc", "tmp", "proc", "dev"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/sh", root / "bin" / "sh")
    libs = subprocess.run(["ldd", "/bin/sh"], capture_output=True, text=True).stdout
    for token in libs.split():
        if token.startswith("/") and os.path.exists(token):
            target = root / token.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(token), target)
    (root / "etc" / "os-release").write_text("ID=tiny\n")
    tarball = tmp_path / "tiny.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname=".")
    return str(tarball)


def test_an_imported_rootfs_is_the_sandboxs_root(tmp_path, store):
    """After 'image import', a sandbox of that image sees only its files (plus its own /proc, /dev)."""
    images.import_tarball("tiny:1", tiny_rootfs_tarball(tmp_path), store)
    with Session(defaults={"isolation": "namespaces"}) as session:
        sb = session.sandbox(container_image="tiny:1")
        out = sb.exec(["/bin/sh", "-c", "read x < /etc/os-release; echo $x; echo /bin/*"]).result()
        assert out.stdout == "ID=tiny\n/bin/sh\n", out
        sb.write_file("/etc/added", b"1").result()
    assert not os.path.exists(os.path.join(images.find("tiny:1", store).rootfs, "etc", "added"))


def test_an_unknown_image_fails_saying_how_to_build_or_import_it(store, monkeypatch):
    """No registry reachable: the start fails with the commands that would provide the image."""
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", "docker.io=http://127.0.0.1:9")  # nothing listens there
    with Session(defaults={"isolation": "namespaces"}) as session:
        with pytest.raises(SandboxFailedError, match=r"image build python:3\.11.*image import") as info:
            session.sandbox(container_image="python:3.11").wait()
        assert "SANDPOOL_IMAGE_FALLBACK=host" in str(info.value)


def test_fallback_runs_unknown_images_on_the_host_image(store, monkeypatch):
    """SANDPOOL_IMAGE_FALLBACK=host: code written for cloud images runs here unchanged."""
    monkeypatch.setenv(images.ENV_FALLBACK, "host")
    with Session() as session:
        sb = session.sandbox(container_image="python:3.11")
        assert sb.exec(["python3", "-c", "print('ran')"]).result().stdout == "ran\n"


def test_the_process_level_refuses_other_images(tmp_path, store):
    """The process level runs on the host only; another image there is a clear error."""
    images.import_tarball("tiny:2", _empty_tarball(tmp_path), store)
    with Session() as session:
        with pytest.raises(SandboxFailedError, match="needs isolation='namespaces'"):
            session.sandbox(container_image="tiny:2", isolation="process").wait()


def _empty_tarball(tmp_path) -> str:
    path = str(tmp_path / "empty.tar")
    with tarfile.open(path, "w"):
        pass
    return path


def test_cli_lists_imports_and_removes(tmp_path, store):
    """python -m sandpool image import/ls/rm work on the store and report errors with exit 1."""
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sandpool", "image", *args], capture_output=True, text=True)

    assert cli("import", "tiny:cli", tiny_rootfs_tarball(tmp_path)).returncode == 0
    listing = cli("ls").stdout
    assert "host" in listing and "tiny:cli" in listing
    assert cli("rm", "tiny:cli").returncode == 0
    failed = cli("build", "alpine:3")
    assert failed.returncode == 1 and "only Debian-based names" in failed.stderr


def _debian_mirror_unreachable() -> str | None:
    """Why debootstrap cannot fetch from the Debian mirror here, or None when it can."""
    import urllib.request

    url = f"{images.DEBIAN_MIRROR}/dists/bookworm/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            return None
    except OSError as exc:  # URLError, a timeout, a refused connection
        return f"{url}: {exc}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_a_debian_image_and_run_in_it(store):
    """debootstrap builds debian:bookworm into a private store (every run: a cached image would
    prove nothing); a sandbox of it runs Debian's programs, and a remote function runs in it on the
    caller's own interpreter. Skips only without debootstrap or a route to the Debian mirror."""
    if not (shutil.which("debootstrap") or os.path.exists("/usr/sbin/debootstrap")):
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    if (why := _debian_mirror_unreachable()) is not None:
        pytest.skip(f"no route to the Debian mirror: {why}")
    built = images.build("debian:bookworm", store)  # an ImageError here is a failure
    assert built.rootfs.startswith(store + os.sep) and built.source.startswith("debootstrap bookworm")
    with Session(defaults={"isolation": "namespaces", "container_image": "debian:bookworm"}) as session:
        sb = session.sandbox()
        assert 'VERSION_CODENAME=bookworm' in sb.exec(["cat", "/etc/os-release"]).result().stdout

        @session.function()
        def where(x):
            import platform

            with open("/etc/os-release") as f:
                release = f.read()
            return x * 2, platform.python_version(), "bookworm" in release

        import platform

        assert where.remote(21).result() == (42, platform.python_version(), True)
