"""How a blob GET is answered: refused as upstream refuses it, redirected to S3, or streamed.

Every GET is first put to the upstream as a HEAD carrying the client's credentials: only a
client the registry answers with this very blob is ever sent to the cache (issues #3, #6).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator

import requests
from flask import Request, Response

from . import metrics
from .clients import in_networks
from .config import Settings
from .errors import AbortResponse, RegistryError
from .evidence import Evidence, evidence_of, vouches_for_cached
from .fills import Fill, Fills
from .followers import SharedFill
from .grants import Grants
from .headers import Headers
from .logs import OUTCOME
from .names import BlobRef, Digest
from .proxy import CHUNK, Forwarder, client_of, raw_body, raw_target
from .ranges import single_range
from .readers import FillReader
from .storage import BlobStore, RangeNotSatisfiable
from .upstream import (
    IDENTITY,
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
        # A verified fill may be published already (its bookkeeping ends a moment later, and
        # another worker's followers keep it a second): once S3 holds the blob, redirect.
        fill = self._fills.running(blob.digest)
        if (fill is None or fill.verified) and self._cached_for(evidence, blob):
            response = self._from_cache(req, blob)
            if response is not None:
                return response
        return self._from_upstream(req, blob, target, evidence, fill)

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
        if answer.status_code >= 500:  # no evidence either way: the registry's GET decides
            LOG.warning(
                "the upstream answered %d to the HEAD authorizing %s: its own answer to the GET "
                "goes to the client, uncached",
                answer.status_code,
                blob.digest,
            )
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
        that stay at the upstream with the client's credentials (Upstream.follow)."""
        return self._upstream.follow(
            lambda at: self._forwarder.call(
                req, method=method, target=at, body=False, drop=drop, add=add
            ),
            target,
        )

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
        """S3's bytes of the blob, or of the one range asked for; None if S3 fails.

        What S3 would answer otherwise than the upstream goes to the upstream, uncached: a
        conditional request (S3's ETag is not the registry's) and a Range that is not one
        satisfiable range (the registry's 416, or its answer to several ranges); never a new
        fill of a blob the bucket holds (issue #13, item 4).
        """
        if any(name in req.headers for name in _CONDITIONAL):
            return self._uncached(req, raw_target(req))
        byte_range = req.headers.get("Range")
        size = self._store.size(blob.digest)
        if byte_range is not None and size is not None:
            span = single_range(byte_range, size)
            if span is None:
                return self._uncached(req, raw_target(req))
            byte_range = f"bytes={span[0]}-{span[1] - 1}"  # S3 is asked exactly that range
        try:
            obj = self._store.open(blob.digest, byte_range)
        except RangeNotSatisfiable:
            return self._uncached(req, raw_target(req))
        if obj is None:
            return None
        _outcome(req, "s3_stream")
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
        self,
        req: Request,
        blob: BlobRef,
        target: str,
        evidence: Evidence,
        fill: Fill | SharedFill | None,
    ) -> Response:
        """A miss: join fill (the blob's, if one runs), start one, or pass the upstream's
        answer on.

        A fill asks for the whole blob in plain bytes, following redirects that stay at the
        upstream; an answer that is not a 200 of known length in plain bytes (its
        Content-Length, else the size the HEAD gave) is passed to the client byte for byte,
        never verified, never cached (issues #6, #7, #13 §6). A client whose HEAD named a
        canonical digest joins only a fill verifying that same digest.
        """
        if any(name in req.headers for name in _CONDITIONAL):
            return self._uncached(req, target)
        if fill is None:
            reserved = self._fills.reserve(blob.digest, evidence.canonical)
            if reserved is not None and self._published_meanwhile(reserved, evidence, blob):
                reserved.cancel()
                return self._from_cache(req, blob) or self._uncached(req, target)
            if reserved is not None:
                return self._start_fill(req, reserved, target, evidence)
            fill = self._fills.running(blob.digest)  # one began while S3 was asked
            if fill is None:  # BLOBLO_MAX_FILLS reached, or caching off
                return self._uncached(req, target)
        # A joiner: its own HEAD authorized it already. Whether it may read this fill is known
        # once the fill started (another worker's says then what it verifies); its spool may
        # have been closed meanwhile (an ended fill, between this GET's looks at S3).
        if fill.wait_started(self._settings.upstream_read_timeout) and fill.readable:
            if not _may_join(fill, evidence):
                return self._uncached(req, target)
            return self._from_fill(req, fill, target, joiner=True)
        if self._cached_for(evidence, blob):  # it ended, published, before we could join
            return self._from_cache(req, blob) or self._uncached(req, target)
        return self._uncached(req, target)

    def _published_meanwhile(self, reserved: Fill, evidence: Evidence, blob: BlobRef) -> bool:
        """Whether a fill of the blob that ended verified while S3 was asked (in another worker
        of the host, or in this one: this worker then saw the bucket hold it) published it:
        S3 once more instead of a second fill (issue #14: a herd of a small blob)."""
        ended = reserved.after_verified or self._store.size(blob.digest) is not None
        return ended and self._cached_for(evidence, blob)

    def _start_fill(self, req: Request, fill: Fill, target: str, evidence: Evidence) -> Response:
        """Ask the upstream for the blob and run fill on its answer; an answer that cannot
        be filled goes to the client as it is."""
        upstream = None
        try:
            upstream = self._follow(req, "GET", target, drop=_NOT_IN_FILL, add=IDENTITY)
            size = plain_length(upstream, evidence.size)
            began = size is not None and fill.begin(upstream, size, upstream.raw.headers.items())
        except BaseException:  # also GreenletExit: joiners must not wait for it
            fill.cancel()
            if upstream is not None:
                release(upstream)
            raise
        if not began:
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
            span = single_range(req.headers["Range"], fill.size)
            if span is None:  # several ranges, or none satisfiable: the upstream answers
                return self._uncached(req, target)
            (start, stop), status = span, 206
            headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{fill.size}"))
        headers.append(("Content-Length", str(stop - start)))
        # Any response that reaches the blob's end holds its tail until the blob is verified,
        # `bytes=N-` as much as the whole blob: a wrong blob is never a clean 206 (issue #13).
        # The client's headers now: the body is read outside the request's context.
        asked = self._forwarder.upstream_headers(req, drop=_NOT_IN_FILL, add=IDENTITY)
        resume = functools.partial(self._rest_from_upstream, asked, target, fill.digest)
        reader = FillReader(fill, start, stop, stop == fill.size, resume)
        return self._forwarder.answer(req, status, headers, self._fills.hold.serving(reader))

    def _rest_from_upstream(
        self, asked: Headers, target: str, digest: Digest, start: int, stop: int
    ) -> Iterator[bytes]:
        """Bytes [start, stop) of the blob from the upstream, asked with the client's headers
        (asked: its credentials) in a Range request, for a client whose fill broke under it
        (issue #13, part 3). Raises AbortResponse unless the upstream answers with exactly
        those bytes."""
        headers = [*asked, ("Range", f"bytes={start}-{stop - 1}")]
        try:
            answer = self._upstream.follow(
                lambda at: self._upstream.send("GET", at, headers), target
            )
        except RegistryError as exc:
            raise AbortResponse(f"the rest of {digest} from the upstream: {exc}") from None
        content_range = answer.headers.get("Content-Range", "")
        encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
        if (
            answer.status_code != 206
            or encoding != "identity"
            or not content_range.startswith(f"bytes {start}-{stop - 1}/")
        ):
            release(answer)
            raise AbortResponse(
                f"the upstream answered {answer.status_code} {content_range!r} to the rest "
                f"of {digest} (bytes {start}-{stop - 1})"
            )
        for chunk in raw_body(answer):  # released at its end; cut off: a short read
            _passed_through(len(chunk))
            yield chunk

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
    digest only a fill that verifies that same digest (issue #13 §6)."""
    return evidence.canonical is None or fill.canonical == evidence.canonical


def _passed_through(count: int) -> None:
    """Blob bytes the upstream sent a client uncached."""
    metrics.BLOB_BYTES.labels("upstream").inc(count)
    metrics.UPSTREAM_BYTES.inc(count)
