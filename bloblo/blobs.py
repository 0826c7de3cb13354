"""How a blob GET is answered: refused as upstream refuses it, redirected to S3, or streamed.

Every GET is first put to the upstream as a HEAD carrying the client's credentials: only a
client the registry lets read the blob is ever sent to the cache (issue #3).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time

from flask import Request, Response

from .config import Settings
from .names import BlobRef
from .proxy import CHUNK, Forwarder, raw_body
from .storage import BlobStore
from .tee import verified_stream
from .uploads import Uploads
from .upstream import release

LOG = logging.getLogger(__name__)

# A HEAD answered 200, or a temporary redirect (registries on S3 redirect HEAD too), means the
# client may read the blob. 301/308 never do: distribution answers 301 to '..' paths unasked.
AUTHORIZED = frozenset({200, 302, 307})
# Conditional and range headers change what a HEAD answers; authorization must not depend on them.
_NOT_IN_HEAD = frozenset({"range", "if-range", "if-match", "if-none-match", "if-modified-since"})


class BlobPolicy:
    """Answers GET /v2/<name>/blobs/<digest>."""

    def __init__(
        self,
        settings: Settings,
        forwarder: Forwarder,
        store: BlobStore,
        uploads: Uploads,
        clock=time.monotonic,
    ):
        self._settings = settings
        self._forwarder = forwarder
        self._store = store
        self._uploads = uploads
        self._grants = _Grants(settings.auth_cache_ttl, clock)

    def get(self, req: Request, blob: BlobRef) -> Response:
        """The response to a blob GET, for this client."""
        query = req.query_string.decode("latin-1")
        target = blob.path + (f"?{query}" if query else "")
        if not self._authorized(req, target):
            # The upstream's own answer to this client's GET: its status, challenge and body.
            return self._forwarder.respond(
                req, self._forwarder.call(req, target=target, body=False)
            )
        if self._store.contains(blob.digest):
            response = self._from_cache(req, blob)
            if response is not None:
                return response
        return self._from_upstream(req, blob, target)

    def _authorized(self, req: Request, target: str) -> bool:
        credentials = req.headers.get("Authorization", "")
        if self._grants.allows(credentials, target):
            return True
        answer = self._forwarder.call(
            req, method="HEAD", target=target, body=False, drop=_NOT_IN_HEAD
        )
        release(answer)
        if answer.status_code not in AUTHORIZED:
            return False
        self._grants.grant(credentials, target)
        return True

    def _from_cache(self, req: Request, blob: BlobRef) -> Response | None:
        """A redirect to S3, or S3's bytes for clients that cannot follow one; None if S3 fails."""
        if self._streams_for(req):
            return self._stream_from_s3(req, blob)
        try:
            url = self._store.presigned_url(blob.digest)
        except Exception as exc:  # e.g. no credentials: serve from upstream instead
            self._store.report_failure(exc)
            return None
        response = Response(
            b"", status=307, headers={"Location": url, "Docker-Content-Digest": str(blob.digest)}
        )
        del response.headers["Content-Type"]  # no body to describe
        return response

    def _streams_for(self, req: Request) -> bool:
        """Whether this client is configured to get bytes instead of a redirect."""
        agents, networks = self._settings.stream_user_agents, self._settings.stream_networks
        if agents is not None and agents.search(req.headers.get("User-Agent", "")):
            return True
        return bool(networks) and _in_networks(req.remote_addr, networks)

    def _stream_from_s3(self, req: Request, blob: BlobRef) -> Response | None:
        obj = self._store.open(blob.digest, req.headers.get("Range"))
        if obj is None:
            return None
        headers = {
            "Content-Length": str(obj.length),
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": str(blob.digest),
            "Accept-Ranges": "bytes",
        }
        if obj.content_range:
            headers["Content-Range"] = obj.content_range
        response = Response(obj.chunks(CHUNK), status=obj.status, headers=headers)
        response.call_on_close(obj.body.close)
        return response

    def _from_upstream(self, req: Request, blob: BlobRef, target: str) -> Response:
        """Stream the blob from upstream, verified, and cache it on the way when it is whole."""
        upstream = self._forwarder.call(req, target=target, body=False)
        if upstream.status_code != 200 or "Range" in req.headers:
            return self._forwarder.respond(req, upstream)  # a partial or odd answer: pass it on
        length = upstream.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None

        def body():
            feed = self._uploads.start(blob.digest, size)
            if feed is None:  # not cached: clients check the digest of what they receive
                yield from raw_body(upstream)
            else:  # hashed on the way: only a verified blob is published (issue #3)
                yield from verified_stream(raw_body(upstream), blob.digest, size, feed)

        return self._forwarder.respond(req, upstream, body)


class _Grants:
    """Remembered authorizations, only when BLOBLO_AUTH_CACHE_TTL asks for it (at most 60 s).

    Keys are hashes of credentials and path: no credential is kept in memory in the clear.
    """

    def __init__(self, ttl: float, clock):
        self._ttl = ttl
        self._clock = clock
        self._until: dict[bytes, float] = {}

    @staticmethod
    def _key(credentials: str, target: str) -> bytes:
        return hashlib.sha256(f"{credentials}\0{target}".encode()).digest()

    def allows(self, credentials: str, target: str) -> bool:
        if not self._ttl:
            return False
        return self._until.get(self._key(credentials, target), 0.0) > self._clock()

    def grant(self, credentials: str, target: str) -> None:
        if not self._ttl:
            return
        now = self._clock()
        if len(self._until) > 10_000:
            self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[self._key(credentials, target)] = now + self._ttl


def _in_networks(addr: str | None, networks) -> bool:
    try:
        ip = ipaddress.ip_address(addr or "")
    except ValueError:
        return False
    return any(ip in net for net in networks)
