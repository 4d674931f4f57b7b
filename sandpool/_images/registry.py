"""A client of the OCI distribution API: manifests and blobs of one repository, every digest verified.

Blocking (http.client); each request has a socket timeout, each body a size bound. Authentication:
anonymous, a bearer token from the registry's realm (anonymous or with basic credentials), or basic
credentials, from ``credentials`` or ``~/.docker/config.json``. Credentials are never sent over plain
http to a host other than the one the user named as a mirror, nor to another host on a redirect.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any, BinaryIO

from . import auth, endpoints, manifest
from .errors import ImageError
from .manifest import Descriptor
from .reference import Reference

#: Seconds a connect or a read may take before the pull fails.
TIMEOUT_SECONDS = 60.0
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_CONFIG_BYTES = 8 * 2**20
MAX_TOKEN_BYTES = 1 * 2**20
MAX_REDIRECTS = 5
#: A response and its connection (for the caller to close).
_Answer = tuple[http.client.HTTPResponse, http.client.HTTPConnection]
CHUNK = 1 << 20


class Client:
    """One repository of one registry (reached through its endpoint: a mirror or the registry itself)."""

    def __init__(self, ref: Reference, credentials: tuple[str, str] | None = None,
                 endpoint: endpoints.Endpoint | None = None, timeout: float = TIMEOUT_SECONDS) -> None:
        self.ref = ref
        self.endpoint = endpoint or endpoints.endpoint(ref.registry)
        self.timeout = timeout
        self._credentials = credentials
        self._looked_up = credentials is not None
        self._authorization: str | None = None
        self._tls = endpoints.tls_context() if self.endpoint.scheme == "https" else None

    def __repr__(self) -> str:
        return f"<registry.Client {self.ref.registry}/{self.ref.repository} via {self.endpoint}>"

    # -- the API ---------------------------------------------------------------------------

    def manifest(self, ref: str) -> tuple[dict[str, Any], str]:
        """(manifest or index, its digest) for a tag or digest; verified against the digest when given."""
        where = f"{self.ref.registry}/{self.ref.repository}:{ref}" if ":" not in ref else \
            f"{self.ref.registry}/{self.ref.repository}@{ref}"
        response, conn = self._get(f"/v2/{self.ref.repository}/manifests/{ref}", {"Accept": manifest.ACCEPT}, where)
        try:
            body = _read_bounded(response, MAX_MANIFEST_BYTES, where)
            media = response.getheader("Content-Type", "").split(";")[0].strip()
            claimed = response.getheader("Docker-Content-Digest")
        finally:
            conn.close()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = ref if ref.startswith("sha") else None
        if expected and expected.startswith("sha512:"):
            digest = "sha512:" + hashlib.sha512(body).hexdigest()
        if expected and digest != expected:
            raise ImageError(f"{where}: the registry sent a manifest whose digest is {digest}, not the one asked "
                             f"for; the registry or a proxy is corrupting data")
        if not expected and claimed and claimed.startswith("sha256:") and claimed != digest:
            raise ImageError(f"{where}: the manifest's digest {digest} differs from the registry's "
                             f"Docker-Content-Digest {claimed}")
        return manifest.load(body, media, where), digest

    def blob(self, digest: str, size: int, out: BinaryIO, progress: Callable[[int], None] | None = None,
             limit: int | None = None) -> None:
        """Write blob ``digest`` (``size`` bytes, as its descriptor says) to ``out``, verifying both."""
        where = f"{self.ref.registry}/{self.ref.repository} blob {digest}"
        if limit is not None and size > limit:
            raise ImageError(f"{where} is {size} bytes, more than the {limit} allowed")
        response, conn = self._get(f"/v2/{self.ref.repository}/blobs/{digest}", {}, where)
        algorithm, _, hexdigest = digest.partition(":")
        hasher = hashlib.new(algorithm)
        got = 0
        try:
            while chunk := response.read(min(CHUNK, size - got + 1)):
                got += len(chunk)
                if got > size:
                    raise ImageError(f"{where}: the registry sent more than the {size} bytes the manifest states")
                hasher.update(chunk)
                out.write(chunk)
                if progress:
                    progress(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise ImageError(f"{where}: the download broke off after {got} bytes ({exc}); pull again") from None
        finally:
            conn.close()
        if got != size:
            raise ImageError(f"{where}: got {got} bytes, the manifest states {size}; pull again")
        if hasher.hexdigest() != hexdigest:
            raise ImageError(f"{where}: the content does not match its digest; the registry or a proxy is "
                             f"corrupting data")

    def config(self, descriptor: Descriptor) -> bytes:
        buffer = io.BytesIO()
        self.blob(descriptor.digest, descriptor.size, buffer, limit=MAX_CONFIG_BYTES)
        return buffer.getvalue()

    # -- HTTP ------------------------------------------------------------------------------

    def _get(self, path: str, headers: dict[str, str], where: str) -> _Answer:
        """A 200 response (and its connection, for the caller to close), following redirects and auth."""
        url = urllib.parse.urlunsplit((self.endpoint.scheme, self.endpoint.netloc, path, "", ""))
        tried_auth = False
        for _ in range(MAX_REDIRECTS + 2):
            parts = urllib.parse.urlsplit(url)
            own = parts.scheme == self.endpoint.scheme and parts.netloc == self.endpoint.netloc
            sent = dict(headers)
            if own and self._authorization:
                sent["Authorization"] = self._authorization
            response, conn = self._request(url, sent, where)
            status = response.status
            if status == 200:
                return response, conn
            location = response.getheader("Location")
            header = response.getheader("WWW-Authenticate", "")
            body = _read_bounded(response, 64 * 1024, where, quiet=True)
            conn.close()
            if status in (301, 302, 303, 307, 308) and location:
                scheme = urllib.parse.urlsplit(url).scheme
                url = urllib.parse.urljoin(url, location)
                target = urllib.parse.urlsplit(url).scheme
                if target not in ("http", "https") or (scheme == "https" and target == "http"):
                    raise ImageError(f"{where}: the registry redirected to {url!r}; only http(s) redirects that "
                                     f"keep https are followed")
                continue
            if status == 401 and own and not tried_auth:
                tried_auth = True
                self._authorization = self._authorize(header, where)
                if self._authorization:
                    continue
                raise ImageError(f"{where}: the registry needs credentials; log in ('docker login "
                                 f"{self.ref.registry}' writes ~/.docker/config.json) or pass credentials")
            raise self._status_error(status, body, where, tried_auth)
        raise ImageError(f"{where}: too many redirects")

    def _status_error(self, status: int, body: bytes, where: str, tried_auth: bool) -> ImageError:
        detail = ""
        try:
            errors = json.loads(body).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            pass
        detail = f" ({detail})" if detail else ""
        if status == 401 or status == 403:
            who = "the credentials" if self._credentials else "anonymous access"
            return ImageError(f"{where}: the registry refused {who} (HTTP {status}){detail}; check the user and "
                              f"password in ~/.docker/config.json (or the ones passed) and the repository's "
                              f"permissions")
        if status == 404:
            return ImageError(f"{where}: not found (HTTP 404){detail}; check the repository name and tag "
                              f"('docker.io' names without a '/' are 'library/NAME')")
        if status == 429:
            return ImageError(f"{where}: the registry's rate limit was reached (HTTP 429); log in or use a mirror "
                              f"({endpoints.ENV_MIRRORS})")
        return ImageError(f"{where}: the registry answered HTTP {status}{detail}")

    def _request(self, url: str, headers: dict[str, str], where: str) -> _Answer:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not parts.hostname:
            raise ImageError(f"{where}: the URL {url!r} names no host; check the registry's redirects")
        try:
            if parts.scheme == "https":
                context = self._tls or endpoints.tls_context()
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    parts.hostname, port, timeout=self.timeout, context=context)
            else:
                conn = http.client.HTTPConnection(parts.hostname, port, timeout=self.timeout)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "sandpool", **headers})
            return conn.getresponse(), conn
        except ssl.SSLError as exc:
            raise ImageError(f"{where}: TLS with {parts.netloc} failed ({exc.reason or exc}); if the registry uses "
                             f"a private CA, set {endpoints.ENV_CA}=/path/to/ca.pem") from None
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
            raise ImageError(f"{where}: cannot reach {parts.scheme}://{parts.netloc} ({reason}); check the network, "
                             f"or name a reachable mirror in {endpoints.ENV_MIRRORS}") from None

    def _lookup_credentials(self) -> tuple[str, str] | None:
        if not self._looked_up:
            self._looked_up = True
            hosts = [self.endpoint.netloc, self.endpoint.host] if self.endpoint.mirror else []
            self._credentials = auth.from_docker_config(*hosts, self.ref.registry)
        return self._credentials

    def _authorize(self, header: str, where: str) -> str | None:
        """The Authorization header answering a 401's challenge (fetching a token for bearer), or None."""
        scheme, params = auth.challenge(header)
        credentials = self._lookup_credentials()
        if scheme == "basic":
            if credentials and self.endpoint.scheme == "http" and not self.endpoint.mirror:
                return None
            return auth.basic(credentials) if credentials else None
        if scheme != "bearer" or not params.get("realm"):
            raise ImageError(f"{where}: the registry asks for authentication this client does not speak "
                             f"({header!r})")
        realm = urllib.parse.urlsplit(params["realm"])
        if realm.scheme not in ("http", "https"):
            raise ImageError(f"{where}: the token realm {params['realm']!r} is not an http(s) URL")
        query = {"scope": params.get("scope") or f"repository:{self.ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        url = urllib.parse.urlunsplit((realm.scheme, realm.netloc, realm.path,
                                       "&".join(filter(None, (realm.query, urllib.parse.urlencode(query)))), ""))
        headers = {}
        if credentials and (realm.scheme == "https" or (self.endpoint.mirror and realm.netloc == self.endpoint.netloc)):
            headers["Authorization"] = auth.basic(credentials)
        response, conn = self._request(url, headers, where)
        try:
            body = _read_bounded(response, MAX_TOKEN_BYTES, where)
        finally:
            conn.close()
        if response.status in (401, 403):
            raise self._status_error(response.status, body, where, True)
        if response.status != 200:
            raise ImageError(f"{where}: the token service {realm.netloc} answered HTTP {response.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"{where}: the token service {realm.netloc} sent no token")
        return f"Bearer {token}"


def _read_bounded(response: http.client.HTTPResponse, limit: int, where: str, quiet: bool = False) -> bytes:
    try:
        body = response.read(limit + 1)
    except (OSError, http.client.HTTPException) as exc:
        if quiet:
            return b""
        raise ImageError(f"{where}: the response broke off ({exc})") from None
    if len(body) > limit:
        if quiet:
            return body[:limit]
        raise ImageError(f"{where}: the response is larger than {limit} bytes; refusing it")
    return body
