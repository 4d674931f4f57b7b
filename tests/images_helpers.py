"""A real registry for the image tests: Debian's ``docker-registry`` (the CNCF distribution server) on
127.0.0.1, plain, with htpasswd auth, or with TLS from a test CA; images built here and pushed with
the distribution API (monolithic blob uploads, then the manifest)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import threading

import pytest

REGISTRY = shutil.which("docker-registry") or next(
    (p for p in ("/usr/bin/docker-registry", "/usr/sbin/docker-registry") if os.path.exists(p)), None)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
USER, PASSWORD = "tester", "s3cret-pass"


def walk_tree(root, describe) -> dict:
    """``{path: describe(path, lstat)}`` for every entry under ``root`` (not ``root`` itself)."""
    found = {}
    for path, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(path, name)
            found[full] = describe(full, os.lstat(full))
    return found


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_id(layer: bytes) -> str:
    """The digest of a layer's uncompressed tar (gzip, zstd or plain)."""
    if layer[:2] == b"\x1f\x8b":
        return digest(gzip.decompress(layer))
    if layer[:4] == b"\x28\xb5\x2f\xfd":
        return digest(subprocess.run(["zstd", "-dcq"], input=layer, capture_output=True, check=True).stdout)
    return digest(layer)


class Registry:
    """A ``docker-registry serve`` process on 127.0.0.1:<free port>; ``stop`` ends it and checks it ended."""

    def __init__(self, workdir: str, storage: str, htpasswd: str | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.port = _free_port()
        config = {"version": 0.1, "log": {"level": "info", "formatter": "text"},
                  "storage": {"filesystem": {"rootdirectory": storage}, "delete": {"enabled": True}},
                  "http": {"addr": f"127.0.0.1:{self.port}", "secret": "test-secret"}}
        if htpasswd:
            config["auth"] = {"htpasswd": {"realm": "sandpool-test", "path": htpasswd}}
        if tls:
            config["http"]["tls"] = {"certificate": tls[0], "key": tls[1]}
        self.scheme = "https" if tls else "http"
        path = os.path.join(workdir, f"registry-{self.port}.yml")
        with open(path, "w") as f:
            json.dump(config, f)  # YAML is a superset of JSON
        self.log_path = os.path.join(workdir, f"registry-{self.port}.log")
        self.ready = threading.Event()
        self.proc = subprocess.Popen([REGISTRY, "serve", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self._copier = threading.Thread(target=self._copy_log, daemon=True)
        self._copier.start()
        if not self.ready.wait(30) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"docker-registry did not start: {open(self.log_path, 'rb').read()[-2000:]!r}")

    def _copy_log(self) -> None:
        """The server's log into a file; ``ready`` at its 'listening on' line (or when it exits)."""
        with open(self.log_path, "wb") as log:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                if b"listening on" in line:
                    self.ready.set()
        self.ready.set()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._copier.join(10)
        assert self.proc.returncode is not None
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            raise AssertionError(f"the registry on port {self.port} still accepts connections after stop")

    def requests(self, pattern: str) -> int:
        """How many GETs by sandpool's client the registry logged whose line contains ``pattern``."""
        with open(self.log_path, "rb") as f:
            return sum(1 for line in f if b"response completed" in line and pattern.encode() in line
                       and b"method=GET" in line and b"useragent=sandpool" in line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- building images -------------------------------------------------------------------------


def tar_layer(entries: list[tuple], gz: bool = True) -> bytes:
    """A layer from (name, kind, payload[, mode[, (uid, gid)]]) entries: kind 'file' (bytes), 'dir',
    'symlink' (target), 'hardlink' (target), 'char' (None)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            name, kind, payload = entry[:3]
            info = tarfile.TarInfo(name)
            info.mode = entry[3] if len(entry) > 3 else (0o755 if kind == "dir" else 0o644)
            info.uid, info.gid = entry[4] if len(entry) > 4 else (0, 0)
            info.mtime = 1_700_000_000
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "char": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    data = buffer.getvalue()
    return gzip.compress(data, compresslevel=1, mtime=0) if gz else data


def busybox_layer() -> bytes:
    """A root filesystem of Debian's static busybox: /bin/busybox and its applets as symlinks."""
    with open("/bin/busybox", "rb") as f:
        binary = f.read()
    entries = [("bin", "dir", None), ("bin/busybox", "file", binary, 0o755), ("tmp", "dir", None, 0o1777),
               ("etc", "dir", None), ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\n")]
    entries += [(f"bin/{applet}", "symlink", "busybox")
                for applet in ("sh", "cat", "ls", "echo", "pwd", "env", "id", "test", "mkdir", "rm", "sleep", "head",
                              "df")]
    return tar_layer(entries)


#: The host's interpreter, what a python:3.11-like test image carries: the binary, the libraries it
#: links, and its standard library (less tests, GUI and build tools).
PYTHON_BINARY = "/usr/bin/python3.11"
PYTHON_STDLIB = "/usr/lib/python3.11"
_STDLIB_SKIPPED = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data", "__pycache__",
                   "config-3.11-x86_64-linux-gnu", "unittest", "distutils"}


def python_layer() -> bytes:
    """A layer holding a python at /usr/local/bin/python (as the official python images have it):
    Debian's python3.11, the shared libraries ``ldd`` names for it, and its standard library."""
    libraries = []
    done = subprocess.run(["ldd", PYTHON_BINARY], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            libraries.append(path)
    buffer = io.BytesIO()

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = info.name.split("/")
        if _STDLIB_SKIPPED.intersection(parts):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in [PYTHON_BINARY, *libraries]:
            tar.add(os.path.realpath(path), arcname=path.lstrip("/"), filter=keep)
        tar.add(PYTHON_STDLIB, arcname=PYTHON_STDLIB.lstrip("/"), filter=keep)
        link = tarfile.TarInfo("usr/local/bin/python")
        link.type, link.linkname = tarfile.SYMTYPE, PYTHON_BINARY
        tar.addfile(link)
    return gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0)


def config_blob(env: list[str] | None = None, workdir: str = "", arch: str = "amd64", layers: int = 1,
                diff_ids: list[str] | None = None) -> bytes:
    """An image config; its ``diff_ids`` (digests of the uncompressed layers) are placeholders that
    ``Pusher.image`` replaces with the true ones unless told to keep them."""
    return json.dumps({"architecture": arch, "os": "linux",
                       "config": {"Env": env or ["PATH=/bin"], "WorkingDir": workdir, "Cmd": ["sh"]},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids or ["sha256:" + "0" * 64] * layers}}).encode()


class Pusher:
    """Pushes blobs and manifests with the distribution API over plain http (the test registry)."""

    def __init__(self, host: str, auth: tuple[str, str] | None = None) -> None:
        self.host = host
        self.auth = auth

    def _conn(self) -> http.client.HTTPConnection:
        host, port = self.host.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=30)

    def _call(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def blob(self, repo: str, data: bytes) -> str:
        d = digest(data)
        status, _, _ = self._call("HEAD", f"/v2/{repo}/blobs/{d}")
        if status == 200:
            return d
        status, headers, body = self._call("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, (status, body)
        location = headers["Location"]
        location = location.split(f"//{self.host}", 1)[-1]
        sep = "&" if "?" in location else "?"
        status, _, body = self._call("PUT", f"{location}{sep}digest={d}", data,
                                     {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        assert status == 201, (status, body)
        return d

    def manifest(self, repo: str, ref: str, document: dict, media_type: str = OCI_MANIFEST) -> str:
        body = json.dumps(document).encode()
        status, _, answer = self._call("PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type})
        assert status == 201, (status, answer)
        return digest(body)

    def image(self, repo: str, tag: str | None, layers: list[bytes], config: bytes,
              layer_type: str = LAYER_GZIP, docker: bool = False, keep_diff_ids: bool = False) -> tuple[str, dict]:
        """Push an image (OCI, or Docker v2 schema 2 media types); (manifest digest, its index descriptor).
        The config's ``rootfs.diff_ids`` are set to the layers' true ones unless ``keep_diff_ids``."""
        if not keep_diff_ids:
            data = json.loads(config)
            data["rootfs"] = {"type": "layers", "diff_ids": [diff_id(layer) for layer in layers]}
            config = json.dumps(data).encode()
        kind, config_type = (DOCKER_MANIFEST, DOCKER_CONFIG) if docker else (OCI_MANIFEST, OCI_CONFIG)
        layer_type = DOCKER_LAYER if docker else layer_type
        descriptors = [{"mediaType": layer_type, "digest": self.blob(repo, layer), "size": len(layer)}
                       for layer in layers]
        document = {"schemaVersion": 2, "mediaType": kind,
                    "config": {"mediaType": config_type, "digest": self.blob(repo, config), "size": len(config)},
                    "layers": descriptors}
        body = json.dumps(document).encode()
        d = self.manifest(repo, tag or digest(body), document, kind)
        return d, {"mediaType": kind, "digest": d, "size": len(body)}


def make_tls(workdir: str) -> tuple[str, str, str]:
    """(CA cert, server cert, server key) PEM paths: a test CA and a certificate for 127.0.0.1."""
    ca_key, ca, key, csr, cert = (os.path.join(workdir, n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                                      "srv.pem"))
    ext = os.path.join(workdir, "srv.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=sandpool test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", ext)
    return ca, cert, key


def make_htpasswd(workdir: str) -> str:
    path = os.path.join(workdir, "htpasswd")
    done = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True)
    with open(path, "w") as f:
        f.write(done.stdout)
    return path


class StallingProxy:
    """A TCP proxy to ``target`` that stops forwarding once ``after`` bytes went to clients, and sets
    ``stalled``: a pull through it is held midway, deterministically."""

    def __init__(self, target: int, after: int) -> None:
        self.target, self.after = target, after
        self.sent = 0
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                        over = self.sent > self.after
                    if over and not self.release.is_set():
                        self.stalled.set()
                        self.release.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.release.set()
        self.server.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


class Registries:
    """The three servers of a test run, sharing one storage: ``plain`` (pushed to), ``auth`` (htpasswd)
    and ``tls`` (a certificate from the test CA ``ca``)."""

    def __init__(self, work: str) -> None:
        storage = os.path.join(work, "storage")
        self.servers: list[Registry] = []
        self.plain = self._start(work, storage)
        self.auth = self._start(work, storage, htpasswd=make_htpasswd(work))
        self.ca, cert, key = make_tls(work)
        self.tls = self._start(work, storage, tls=(cert, key))
        self.push = Pusher(self.plain.host)

    def _start(self, *args, **kwargs) -> Registry:
        try:
            server = Registry(*args, **kwargs)
        except BaseException:
            self.stop()
            raise
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def hub_mirrors(self) -> str:
        """``mirrors`` with Docker Hub's names served by the plain server too (``python:3.11``)."""
        return self.mirrors(**{"docker.io": self.plain.url})

    def mirrors(self, **extra: str) -> str:
        """A SANDPOOL_REGISTRY_MIRRORS value: test.local is the plain server, auth.local the auth one."""
        pairs = {"test.local": self.plain.url, "auth.local": self.auth.url, **extra}
        return ",".join(f"{k}={v}" for k, v in pairs.items())


@pytest.fixture(scope="module")
def registries(tmp_path_factory):
    """A plain, an htpasswd and a TLS registry on loopback (stopped, and checked stopped, at teardown)."""
    if REGISTRY is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    servers = Registries(str(tmp_path_factory.mktemp("registry")))
    yield servers
    servers.stop()


@pytest.fixture
def image_env(registries, tmp_path, monkeypatch):
    """An empty image store and the test mirrors, for this test only."""
    store = tmp_path / "images"
    monkeypatch.setenv("SANDPOOL_IMAGE_DIR", str(store))
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", registries.mirrors())
    monkeypatch.delenv("SANDPOOL_IMAGE_FALLBACK", raising=False)
    monkeypatch.delenv("SANDPOOL_REGISTRY_CA", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return str(store)


class BearerFront:
    """Docker Hub's way, in front of the plain registry: every API call needs ``Bearer <token>``, and
    the 401's challenge names a token realm (here, this server's /token) that grants one anonymously.
    ``asked`` holds the token requests' query strings."""

    TOKEN = "anonymous-pull-token"

    def __init__(self, target: str) -> None:
        import http.server

        front = self
        self.asked: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/token?"):
                    front.asked.append(self.path.split("?", 1)[1])
                    return self._answer(200, {"Content-Type": "application/json"},
                                        json.dumps({"token": front.TOKEN}).encode())
                if self.headers.get("Authorization") != f"Bearer {front.TOKEN}":
                    realm = f"http://127.0.0.1:{front.port}/token"
                    return self._answer(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="test-registry"'},
                                        b'{"errors":[{"code":"UNAUTHORIZED","message":"token needed"}]}')
                host, port = target.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request("GET", self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
                response = conn.getresponse()
                keep = {k: v for k, v in response.getheaders() if k in ("Content-Type", "Docker-Content-Digest")}
                self._answer(response.status, keep, response.read())
                conn.close()

            def _answer(self, status: int, headers: dict, body: bytes) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


#: The app layer of the python:3.11-like test image: files of another owner, a whiteout, an opaque
#: directory, a setuid bit and a device node.
_APP = [("etc", "dir", None), ("etc/.wh.motd", "file", b""), ("opt", "dir", None), ("opt/old", "dir", None),
        ("opt/old/.wh..wh..opq", "file", b""), ("opt/old/new", "file", b"new"),
        ("home", "dir", None), ("home/app", "dir", None, 0o700, (1000, 1000)),
        ("home/app/data", "file", b"app's", 0o600, (1000, 1000)),
        ("usr/local/bin/suid", "file", b"#!/bin/sh\n", 0o4755),
        ("opt/evil", "char", None)]
_BASE_EXTRA = [("etc/motd", "file", b"from the base"), ("opt", "dir", None), ("opt/old", "dir", None),
               ("opt/old/file", "file", b"hidden by the opaque dir")]
PYTHON_IMAGE = "python:3.11"


@pytest.fixture(scope="module")
def python_image(registries):
    """``python:3.11`` (Docker Hub's name) on the plain test registry as ``library/python:3.11``, to
    be pulled through ``SANDPOOL_REGISTRY_MIRRORS=docker.io=<it>`` (``registries.hub_mirrors()``):
    a busybox base, a python layer (at /usr/local/bin/python, as the official image has it) and an
    app layer (``_APP``); Env and WorkingDir as in the official image, WorkingDir /srv/app."""
    base = tar_layer([("bin", "dir", None), ("bin/busybox", "file", open("/bin/busybox", "rb").read(), 0o755),
                      ("tmp", "dir", None, 0o1777), ("etc", "dir", None),
                      ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")]
                     + [(f"bin/{a}", "symlink", "busybox") for a in ("sh", "cat", "ls", "stat", "chown", "touch", "id")]
                     + _BASE_EXTRA)
    registries.push.image("library/python", "3.11", [base, python_layer(), tar_layer(_APP)],
                          config_blob(["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "PYTHON_VERSION=3.11"],
                                      "/srv/app", layers=3))
    return PYTHON_IMAGE
