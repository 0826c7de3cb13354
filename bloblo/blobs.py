"""How a blob GET is answered: refused as upstream refuses it, redirected to S3, or streamed.

Every GET is first put to the upstream as a HEAD carrying the client's credentials: only a
client the registry answers with this very blob is ever sent to the cache (issues #3, #6).
"""

from __future__ import annotations

import logging
import time

import requests
from flask import Request, Response

from .clients import in_networks
from .config import Settings
from .grants import Grants
from .names import BlobRef
from .proxy import CHUNK, Forwarder, client_of, raw_body, raw_target
from .storage import BlobStore
from .tee import verified_stream
from .uploads import Uploads
from .upstream import Upstream, release

LOG = logging.getLogger(__name__)

# Conditional and range headers change what a HEAD answers; authorization must not depend on them.
_NOT_IN_HEAD = frozenset({"range", "if-range", "if-match", "if-none-match", "if-modified-since"})
MAX_SAME_ORIGIN_HOPS = 3  # redirects of the HEAD followed within the upstream (issue #6, part 1)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# A blob bloblo verifies and caches must arrive as its plain bytes (issue #6, part 2).
_IDENTITY = [("Accept-Encoding", "identity")]


class BlobPolicy:
    """Answers GET /v2/<name>/blobs/<digest>."""

    def __init__(
        self,
        settings: Settings,
        forwarder: Forwarder,
        upstream: Upstream,
        store: BlobStore,
        uploads: Uploads,
        clock=time.monotonic,
    ):
        self._settings = settings
        self._forwarder = forwarder
        self._upstream = upstream
        self._store = store
        self._uploads = uploads
        self._grants = Grants(settings.auth_cache_ttl, clock)
        self._digest_missing = False  # the upstream's HEADs lack Docker-Content-Digest (logged)

    def get(self, req: Request, blob: BlobRef) -> Response:
        """The response to a blob GET, for this client.

        Only a client the upstream positively lets read this blob is sent to the cache; any
        other gets the upstream's own answer to its GET (issue #6, part 1).
        """
        target = raw_target(req)
        if not self._authorized(req, blob, target):
            return self._forwarder.respond(
                req, self._forwarder.call(req, target=target, body=False)
            )
        if self._store.contains(blob.digest):
            response = self._from_cache(req, blob)
            if response is not None:
                return response
        return self._from_upstream(req, blob, target)

    def _authorized(self, req: Request, blob: BlobRef, target: str) -> bool:
        """Whether the upstream answers this client's HEAD of the blob with the blob itself."""
        head_headers = self._forwarder.upstream_headers(req, drop=_NOT_IN_HEAD)
        key = self._grants.key(head_headers, client_of(req), target)
        if self._grants.allows(key):
            return True
        answer = self._head(req, target)
        if answer.status_code != 200:
            return False
        if "Docker-Content-Digest" not in answer.headers:
            self._note_digest_missing(True)
            return False
        self._note_digest_missing(False)
        if answer.headers["Docker-Content-Digest"] != str(blob.digest):
            return False
        self._grants.grant(key)
        return True

    def _head(self, req: Request, target: str) -> requests.Response:
        """The upstream's final answer to the client's HEAD, following redirects that stay at
        the upstream (same scheme, host and port) with the client's credentials."""
        for _ in range(MAX_SAME_ORIGIN_HOPS + 1):
            answer = self._forwarder.call(
                req, method="HEAD", target=target, body=False, drop=_NOT_IN_HEAD
            )
            release(answer)
            location = answer.headers.get("Location")
            if answer.status_code not in _REDIRECTS or location is None:
                return answer
            target = self._upstream.same_origin_target(location, target)
            if target is None:  # elsewhere: that answer does not describe this blob
                return answer
        return answer  # still redirected after the last hop: not an answer about the blob

    def _note_digest_missing(self, missing: bool) -> None:
        """Log once, when it starts, that the upstream's blob HEADs carry no digest."""
        if missing and not self._digest_missing:
            LOG.warning(
                "the upstream answers blob HEADs without Docker-Content-Digest: bloblo cannot "
                "tell that the answer describes the blob, so it streams blobs from the upstream "
                "uncached. Make the registry (or the front end before it) pass that header."
            )
        self._digest_missing = missing

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
        return bool(networks) and in_networks(client_of(req).address, networks)

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
        """Stream the blob from upstream, verified, and cache it on the way when it is whole.

        A whole-blob GET asks for the plain bytes; an answer that is still encoded (or ranged,
        or anything but a 200) is passed on byte for byte, never verified, never cached.
        """
        ranged = "Range" in req.headers
        upstream = self._forwarder.call(
            req,
            target=target,
            body=False,
            drop=frozenset() if ranged else frozenset({"accept-encoding"}),
            add=[] if ranged else _IDENTITY,
        )
        encoding = upstream.headers.get("Content-Encoding", "identity").strip().lower()
        if upstream.status_code != 200 or ranged or encoding != "identity":
            return self._forwarder.respond(req, upstream)
        length = upstream.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None

        def body():
            feed = self._uploads.start(blob.digest, size)
            if feed is None:  # not cached: clients check the digest of what they receive
                yield from raw_body(upstream)
            else:  # hashed on the way: only a verified blob is published (issue #3)
                yield from verified_stream(raw_body(upstream), blob.digest, size, feed)

        return self._forwarder.respond(req, upstream, body)
