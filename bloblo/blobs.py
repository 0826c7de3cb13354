"""How a blob GET is answered: refused as upstream refuses it, redirected to S3, or streamed.

Every GET is first put to the upstream as a HEAD carrying the client's credentials: only a
client the registry answers with this very blob is ever sent to the cache (issues #3, #6).
"""

from __future__ import annotations

import logging
import time

import requests
from flask import Request, Response
from werkzeug.http import parse_range_header

from . import metrics
from .clients import in_networks
from .config import Settings
from .evidence import Evidence, evidence_of, vouches_for_cached
from .fills import Fill, Fills
from .grants import Grants
from .host import SharedFill
from .logs import OUTCOME
from .names import BlobRef
from .proxy import CHUNK, Forwarder, client_of, raw_target
from .storage import BlobStore
from .upstream import (
    IDENTITY,
    MAX_SAME_ORIGIN_HOPS,
    REDIRECTS,
    Upstream,
    plain_length,
    release,
)

LOG = logging.getLogger(__name__)

# Conditional requests pass through to the upstream; a fill serves plain GETs (issue #7).
_CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")
# Conditional and range headers change what a HEAD answers; authorization must not depend on
# them. A fill asks for the whole blob, whatever its first client asked for.
_NOT_IN_HEAD = frozenset({"range", *(name.lower() for name in _CONDITIONAL)})
_NOT_IN_FILL = _NOT_IN_HEAD | {"accept-encoding"}
# What a response from a fill sets itself; the rest of the upstream's headers pass to the client
# that started the fill. A joiner gets only what describes the blob: never the starter's
# Set-Cookie or anything else about the starter's session.
_SET_PER_RESPONSE = frozenset({"content-length", "content-range"})
_ABOUT_THE_BLOB = frozenset(
    {
        "content-type",
        "docker-content-digest",
        "docker-distribution-api-version",
        "etag",
        "accept-ranges",
        "cache-control",
        "last-modified",
    }
)
# A client that takes no bytes for this long while a fill serves it is cut off, so that it
# cannot hold the fill's spool (and its share of BLOBLO_SPOOL_MAX_MB) forever.
CLIENT_STALL_SECONDS = 60.0


class BlobPolicy:
    """Answers GET /v2/<name>/blobs/<digest>."""

    def __init__(
        self,
        settings: Settings,
        forwarder: Forwarder,
        upstream: Upstream,
        store: BlobStore,
        fills: Fills,
        clock=time.monotonic,
    ):
        self._settings = settings
        self._forwarder = forwarder
        self._upstream = upstream
        self._store = store
        self._fills = fills
        self._grants = Grants(settings.auth_cache_ttl, clock)
        self._digest_missing = False  # the upstream's HEADs lack Docker-Content-Digest (logged)

    def get(self, req: Request, blob: BlobRef) -> Response:
        """The response to a blob GET, for this client.

        Only a client the upstream positively lets read this blob is sent to the cache; any
        other gets the upstream's own answer to its GET (issue #6, part 1).
        """
        target = raw_target(req)
        evidence = self._authorized(req, blob, target)
        if evidence is None:
            return self._uncached(req, target, outcome="refused")
        if self._fills.running(blob.digest) is None and self._cached_for(evidence, blob):
            response = self._from_cache(req, blob)
            if response is not None:
                return response
        return self._from_upstream(req, blob, target, evidence)

    def _authorized(self, req: Request, blob: BlobRef, target: str) -> Evidence | None:
        """What the upstream's answer to this client's HEAD of the blob proves, or None when
        it is not the blob (evidence.py). An authorization remembered under
        BLOBLO_AUTH_CACHE_TTL sends no HEAD: its evidence knows no size."""
        head_headers = self._forwarder.upstream_headers(req, drop=_NOT_IN_HEAD)
        key = self._grants.key(head_headers, client_of(req), target)
        if self._grants.allows(key):
            return Evidence()
        answer = self._follow(req, "HEAD", target, drop=_NOT_IN_HEAD)
        release(answer)
        if answer.status_code != 200:
            return None
        named = answer.headers.get("Docker-Content-Digest")
        self._note_digest_missing(named is None)
        evidence = evidence_of(blob.digest, named, answer.headers.get("Content-Length"))
        if evidence is not None and evidence.canonical is None:
            # Only the digest itself is remembered: a canonical digest must be seen to match
            # the cached object's on every GET.
            self._grants.grant(key)
        return evidence

    def _cached_for(self, evidence: Evidence, blob: BlobRef) -> bool:
        """Whether the bucket holds the blob for a client with this evidence: a blob verified
        against a canonical digest only for the same one."""
        return self._store.contains(blob.digest) and vouches_for_cached(
            evidence, self._store.canonical_digest(blob.digest)
        )

    def _follow(
        self,
        req: Request,
        method: str,
        target: str,
        drop: frozenset[str],
        add: list[tuple[str, str]] = (),
    ) -> requests.Response:
        """The upstream's final answer to the client's request (no body), following redirects
        that stay at the upstream (same scheme, host and port) with the client's credentials,
        at most MAX_SAME_ORIGIN_HOPS; a redirect elsewhere, or one hop too many, is the answer."""
        for hop in range(MAX_SAME_ORIGIN_HOPS + 1):
            answer = self._forwarder.call(
                req, method=method, target=target, body=False, drop=drop, add=add
            )
            location = answer.headers.get("Location")
            if answer.status_code not in REDIRECTS or location is None:
                return answer
            following = self._upstream.same_origin_target(location, target)
            if following is None or hop == MAX_SAME_ORIGIN_HOPS:
                return answer
            release(answer)
            target = following
        raise AssertionError("unreachable")

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
        self._store.refresh_if_old(blob.digest)
        if self._streams_for(req):
            _outcome(req, "s3_stream")
            return self._stream_from_s3(req, blob)
        try:
            url = self._store.presigned_url(blob.digest)
        except Exception as exc:  # e.g. no credentials: serve from upstream instead
            self._store.report_failure(exc)
            return None
        _outcome(req, "redirect")
        metrics.BLOB_BYTES.labels("s3").inc(self._store.size(blob.digest) or 0)
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
        body = metrics.count_body(obj.chunks(CHUNK), metrics.BLOB_BYTES.labels("s3").inc)
        response = Response(body, status=obj.status, headers=headers)
        response.call_on_close(obj.body.close)
        return response

    def _from_upstream(
        self, req: Request, blob: BlobRef, target: str, evidence: Evidence
    ) -> Response:
        """A miss: join the fill of this blob, start one, or pass the upstream's answer on.

        A fill asks for the whole blob in plain bytes, following redirects that stay at the
        upstream; an answer that is not a 200 of known length in plain bytes (its
        Content-Length, else the size the HEAD gave) is passed to the client byte for byte,
        never verified, never cached (issues #6, #7, #13 §6). A client whose HEAD named a
        canonical digest joins only a fill of this worker verifying that same digest.
        """
        if any(name in req.headers for name in _CONDITIONAL):
            return self._uncached(req, target)
        fill = self._fills.running(blob.digest)
        if fill is not None and not _may_join(fill, evidence):
            return self._uncached(req, target)
        if fill is not None:  # a joiner: its own HEAD authorized it already
            if fill.wait_started(self._settings.upstream_read_timeout):
                return self._from_fill(req, fill, target, joiner=True)
            if self._cached_for(evidence, blob):  # it ended, published, before we could join
                return self._from_cache(req, blob) or self._uncached(req, target)
            return self._uncached(req, target)
        fill = self._fills.reserve(blob.digest)
        if fill is None:  # BLOBLO_MAX_FILLS reached, or caching off
            return self._uncached(req, target)
        try:
            upstream = self._follow(req, "GET", target, drop=_NOT_IN_FILL, add=IDENTITY)
        except BaseException:  # also GreenletExit: joiners must not wait for it
            fill.cancel()
            raise
        size = plain_length(upstream, evidence.size)
        headers = upstream.raw.headers.items()
        if size is None or not fill.begin(upstream, size, headers, evidence.canonical):
            fill.cancel()
            if "Range" in req.headers:  # that answer was to a whole-blob GET, not the client's
                release(upstream)
                return self._uncached(req, target)
            _outcome(req, "upstream")
            return self._forwarder.respond(req, upstream, on_bytes=_passed_through)
        return self._from_fill(req, fill, target, joiner=False)

    def _from_fill(
        self, req: Request, fill: Fill | SharedFill, target: str, joiner: bool
    ) -> Response:
        """The blob, or the range asked for, from a fill, as the upstream would answer it."""
        _outcome(req, "fill_join" if joiner else "fill")
        headers = [
            (name, value)
            for name, value in fill.headers
            if name.lower() not in _SET_PER_RESPONSE
            and (not joiner or name.lower() in _ABOUT_THE_BLOB)
        ]
        start, stop, status = 0, fill.size, 200
        if "Range" in req.headers:
            span = _single_range(req.headers["Range"], fill.size)
            if span is None:  # several ranges, or none satisfiable: the upstream answers
                return self._uncached(req, target)
            (start, stop), status = span, 206
            headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{fill.size}"))
        headers.append(("Content-Length", str(stop - start)))
        reader = self._fills.serving(fill.reader(start, stop, hold_tail=status == 200))
        client_socket = req.environ.get("gunicorn.socket")
        if client_socket is not None:
            client_socket.settimeout(CLIENT_STALL_SECONDS)
        return self._forwarder.answer(req, status, headers, reader)

    def _uncached(self, req: Request, target: str, outcome: str = "upstream") -> Response:
        """The upstream's own answer to the client's GET, passed through (clients verify it)."""
        _outcome(req, outcome)
        upstream = self._forwarder.call(req, target=target, body=False)
        return self._forwarder.respond(req, upstream, on_bytes=_passed_through)


def _outcome(req: Request, outcome: str) -> None:
    """Say how this blob GET was answered, for its access line and metrics."""
    req.environ[OUTCOME] = outcome
    metrics.BLOB_REQUESTS.labels(outcome).inc()


def _may_join(fill: Fill | SharedFill, evidence: Evidence) -> bool:
    """Whether a client with this evidence may read the fill: one whose HEAD named a canonical
    digest only a fill of this worker that verifies that same digest (another worker's fill
    does not say what it verifies)."""
    if evidence.canonical is None:
        return True
    return isinstance(fill, Fill) and fill.canonical == evidence.canonical


def _passed_through(count: int) -> None:
    """Blob bytes the upstream sent a client uncached."""
    metrics.BLOB_BYTES.labels("upstream").inc(count)
    metrics.UPSTREAM_BYTES.inc(count)


def _single_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, stop) of a Range header naming one satisfiable byte range of size bytes."""
    parsed = parse_range_header(value)
    if parsed is None or len(parsed.ranges) != 1:
        return None
    return parsed.range_for_length(size)
