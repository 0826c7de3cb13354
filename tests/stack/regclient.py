"""A minimal client of the registry HTTP API (OCI distribution spec) for tests: answers the
registry's basic or bearer challenge itself and streams blob uploads from files."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.stack.procs import local_session

LOG = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Return "sha256:<hex>" of the file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a WWW-Authenticate header into its scheme and parameters."""
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


class RegistryClient:
    """Talks to one registry at `base_url` (http://host:port) as `creds` (user, password),
    or with a fixed `bearer` token, or anonymously."""

    def __init__(
        self,
        base_url: str,
        creds: tuple[str, str] | None = None,
        bearer: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.bearer = bearer
        self._fixed_bearer = bearer is not None
        self._basic = False
        self.session = local_session()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """Send a request to base_url + path (or an absolute URL); on a 401 challenge, get
        credentials for it once and retry. Redirects are not followed unless asked."""
        kwargs.setdefault("allow_redirects", False)
        kwargs.setdefault("timeout", 120)
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 401 and self._answer_challenge(resp):
            body = kwargs.get("data")
            if hasattr(body, "seek"):
                body.seek(0)
            resp.close()
            resp = self._send(method, path, **kwargs)
        return resp

    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        headers = dict(kwargs.pop("headers", None) or {})
        if self.bearer:
            headers["Authorization"] = f"Bearer {self.bearer}"
        auth = self.creds if self._basic and not self.bearer else None
        return self.session.request(method, url, headers=headers, auth=auth, **kwargs)

    def _answer_challenge(self, resp: requests.Response) -> bool:
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.creds and not self._basic:
            self._basic = True
            return True
        if scheme == "bearer" and not self._fixed_bearer:
            self.bearer = self.fetch_token(params)
            return True
        return False

    def fetch_token(self, challenge: dict[str, str]) -> str:
        """Get a token from the challenge's realm for its service and scope."""
        query = {k: challenge[k] for k in ("service", "scope") if k in challenge}
        resp = self.session.get(challenge["realm"], params=query, auth=self.creds, timeout=30)
        resp.raise_for_status()
        body = resp.json()
        return body.get("token") or body["access_token"]

    def push_blob(self, repo: str, path: Path, digest: str | None = None) -> str:
        """Upload the file as a blob (POST, then one monolithic PUT streamed from disk) unless
        the registry has it already; return its digest."""
        digest = digest or sha256_file(path)
        if self.request("HEAD", f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/")
        _expect(start, 202)
        location = start.headers["Location"]
        separator = "&" if "?" in location else "?"
        with open(path, "rb") as body:  # a file: requests streams it with Content-Length
            done = self.request(
                "PUT",
                f"{location}{separator}digest={digest}",
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                timeout=3600,
            )
        _expect(done, 201)
        return digest

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; return the digest the registry reports."""
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            data=body,
            headers={"Content-Type": media_type},
        )
        _expect(resp, 201)
        return resp.headers["Docker-Content-Digest"]

    def get_manifest(self, repo: str, reference: str, method: str = "GET") -> requests.Response:
        """GET (or HEAD) a manifest, accepting OCI and Docker v2 manifests and indexes."""
        headers = {"Accept": ", ".join(MANIFEST_ACCEPT)}
        return self.request(method, f"/v2/{repo}/manifests/{reference}", headers=headers)

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()


def _expect(resp: requests.Response, status: int) -> None:
    if resp.status_code != status:
        raise RuntimeError(
            f"{resp.request.method} {resp.url}: expected {status}, got {resp.status_code}: "
            f"{resp.text[:500]}"
        )


@contextlib.contextmanager
def reading_half_way(host: str, port: int, path: str, at_least: int) -> Iterator[socket.socket]:
    """A raw client that GETs `path` and has read at least `at_least` bytes when the block
    starts; it hangs up (closes its socket) when the block ends."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        received = 0
        while received < at_least:
            data = sock.recv(CHUNK)
            if not data:
                raise ConnectionError(f"the server closed after {received} bytes of {path}")
            received += len(data)
        yield sock
