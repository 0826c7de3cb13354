"""Warming the cache: resolve image references at the upstream to their blobs, and fill the
bucket with those it lacks through the fills the proxy uses (issue #8, part 2).

One identity (credentials or anonymous) pulls from the upstream; blobs reach S3 only through
Fills, verified against their digest before they are published.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import gevent
import requests
import urllib3
from botocore.exceptions import BotoCoreError, ClientError
from gevent.lock import Semaphore
from gevent.pool import Pool

from .config import Settings
from .credentials import Authorizer, Credentials, CredentialsError
from .errors import RegistryError
from .fills import Fills
from .manifests import (
    ACCEPT,
    Blob,
    ManifestError,
    Platform,
    Ref,
    check_digest,
    parse_manifest,
)
from .names import Digest
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

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution refuses bigger manifests
MAX_NESTING = 4  # an index of indexes of ...: deeper is refused
ERROR_BYTES = 64 * 1024  # of an error answer to a blob GET, for its message
PROGRESS_SECONDS = 0.25  # how often a running fill's bytes are reported
ROOM_SECONDS = 0.1  # how often a blob waiting for spool room looks again

COPIED, CACHED, FAILED = "copied", "cached", "failed"


class WarmError(Exception):
    """A reference, a manifest or a blob that cannot be warmed; the message says why."""


@dataclass
class Plan:
    """What the references resolve to: blobs (deduplicated, in order) and what failed."""

    blobs: list[Blob] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (what, reason)
    notes: list[str] = field(default_factory=list)  # e.g. foreign layers skipped


@dataclass
class Summary:
    """How the blobs fared; `line` is the summary warm prints."""

    copied: int = 0
    cached: int = 0
    failed: int = 0
    bytes_copied: int = 0

    @property
    def line(self) -> str:
        """`N blobs: X copied, Y already cached, Z failed; B bytes copied`."""
        total = self.copied + self.cached + self.failed
        return (
            f"{total} blobs: {self.copied} copied, {self.cached} already cached, "
            f"{self.failed} failed; {self.bytes_copied} bytes copied"
        )


class Progress:
    """What warm reports while it runs; the command draws it. Does nothing by default."""

    def advance(self, count: int) -> None:
        """count more bytes of the blobs are received or found cached."""

    def blob_done(self, blob: Blob, outcome: str, reason: str | None) -> None:
        """blob is copied, cached or failed (with the reason)."""


class Warmer:
    """Resolves references at the upstream and fills the bucket, `jobs` blobs at once."""

    def __init__(self, settings: Settings, credentials: Credentials | None, jobs: int):
        settings = dataclasses.replace(settings, max_fills=max(settings.max_fills, jobs))
        self.upstream = Upstream(settings, pool_size=jobs + 2)
        # No circuit breaker: the proxy stops asking a failing S3 for a while and serves from
        # the registry, but warm's only job is S3, so each blob asks it again.
        self.store = BlobStore(settings, unavailable_seconds=0)
        # Nobody waits for warm's downloads: each blob goes to S3 as soon as it is verified.
        self.fills = Fills(dataclasses.replace(settings, upload_hold_seconds=0), self.store)
        self.jobs = jobs
        self._auth = Authorizer(credentials)
        self._admission = Semaphore()  # one blob at a time waits for spool room, then starts

    def close(self) -> None:
        """Close the token service's connections."""
        self._auth.close()

    # -- references to blobs --------------------------------------------------------------------

    def resolve(self, refs: Iterable[Ref], platforms: tuple[Platform, ...] = ()) -> Plan:
        """The blobs (configs and layers) of every image the references name, an index's or
        manifest list's children included (those of platforms, if given). A reference or
        child manifest that cannot be read is one failure in the plan; nothing raises."""
        plan, seen = Plan(), set()
        for ref in refs:
            self._resolve(ref, platforms, plan, seen, depth=0)
        return plan

    def _resolve(self, ref: Ref, platforms, plan: Plan, seen: set[Digest], depth: int) -> None:
        try:
            if depth > MAX_NESTING:
                raise WarmError(f"indexes nested more than {MAX_NESTING} deep")
            body, content_type = self._manifest(ref)
            if ref.digest is not None:
                check_digest(body, ref.digest)
            parsed = parse_manifest(body, content_type, ref.name, platforms)
        except (WarmError, ManifestError, CredentialsError) as exc:
            plan.failures.append((str(ref), str(exc)))
            return
        for child in parsed.children:
            self._resolve(child, platforms, plan, seen, depth + 1)
        for digest in parsed.foreign:
            plan.notes.append(f"{ref}: skipped foreign layer {digest} (it has urls)")
        for blob in parsed.blobs:
            if blob.digest not in seen:
                seen.add(blob.digest)
                plan.blobs.append(blob)

    def _manifest(self, ref: Ref) -> tuple[bytes, str | None]:
        """The manifest's bytes and Content-Type (distribution spec "Pulling manifests")."""
        target = f"/v2/{ref.name}/manifests/{ref.reference}"
        answer = self._get(ref.name, target, [("Accept", ACCEPT)])
        body = _read(answer, MAX_MANIFEST_BYTES + 1)
        if answer.status_code != 200:
            raise WarmError(_refusal(answer, body, "manifest"))
        if len(body) > MAX_MANIFEST_BYTES:
            raise WarmError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        return body, answer.headers.get("Content-Type")

    def _get(self, name: str, target: str, headers: list[tuple[str, str]]) -> requests.Response:
        """GET target with repository name's credentials, answering one 401 challenge."""
        answer = self._send(name, target, headers)
        if answer.status_code == 401:
            release(answer)
            self._auth.answer(name, answer.headers.get("WWW-Authenticate", ""))
            answer = self._send(name, target, headers)
        return answer

    def _send(self, name: str, target: str, headers: list[tuple[str, str]]) -> requests.Response:
        try:
            return self.upstream.send("GET", target, [*headers, *self._auth.headers(name)])
        except RegistryError as exc:
            raise WarmError(f"{exc.message}: check BLOBLO_UPSTREAM_URL") from None

    # -- blobs to the bucket --------------------------------------------------------------------

    def fill_all(self, blobs: list[Blob], progress: Progress) -> Summary:
        """Fill every blob the bucket lacks, `jobs` at once; report each on progress."""
        summary = Summary()
        for blob, outcome, reason in Pool(self.jobs).imap_unordered(
            lambda blob: self._warm(blob, progress.advance), blobs
        ):
            summary.copied += outcome == COPIED
            summary.cached += outcome == CACHED
            summary.failed += outcome == FAILED
            summary.bytes_copied += blob.size if outcome == COPIED else 0
            progress.blob_done(blob, outcome, reason)
        return summary

    def _warm(self, blob: Blob, advance: Callable[[int], None]):
        try:
            if self.store.contains(blob.digest):
                if self.store.is_stale(blob.digest):  # a lifecycle rule's age restarts now
                    self._refresh(blob)
                advance(blob.size)
                return blob, CACHED, None
            self._fill(blob, advance)
        except (WarmError, CredentialsError) as exc:
            return blob, FAILED, str(exc)
        except Exception as exc:  # one blob's surprise must not stop the others
            LOG.exception("warming %s failed", blob.digest)
            return blob, FAILED, f"{type(exc).__name__}: {exc}"
        return blob, COPIED, None

    def _refresh(self, blob: Blob) -> None:
        """Copy a cached blob older than BLOBLO_CACHE_REFRESH_SECONDS in place; it stays cached
        if that fails (the warning says why)."""
        try:
            self.store.refresh(blob.digest)
        except (ClientError, BotoCoreError) as exc:
            LOG.warning("%s is cached; its refresh (a copy in place) failed: %s", blob.digest, exc)

    def _fill(self, blob: Blob, advance: Callable[[int], None]) -> None:
        """Fill one blob through Fills; raise WarmError unless it is published.

        Blobs wait their turn for spool room (BLOBLO_SPOOL_MAX_MB): only a blob larger than
        the whole budget fails for lack of it."""
        budget = self.fills.budget
        if blob.size > budget.max_bytes:
            raise WarmError(
                f"{blob.size} bytes do not fit in BLOBLO_SPOOL_MAX_MB ({budget.max_bytes} bytes)"
            )
        with self._admission:
            while budget.used + blob.size > budget.max_bytes:
                gevent.sleep(ROOM_SECONDS)  # the fills running free their room as they end
            fill = self._begin(blob)
        reported = 0
        while not fill.done.wait(PROGRESS_SECONDS):
            reported += _advance(advance, fill.spool.written - reported)
        _advance(advance, blob.size - reported)
        if fill.result != "published":
            raise WarmError(fill.broken or "S3 refused the upload or was unavailable (see above)")

    def _begin(self, blob: Blob):
        """The running fill of blob: its GET answered with the blob's plain bytes, of the size
        the manifest gives (OCI image-spec descriptor.md: size must match the content; a body
        sent without Content-Length is taken at that size, and the fill checks it)."""
        answer = self._blob_answer(blob)
        size = plain_length(answer, blob.size)
        if size is None:
            body = _read(answer, ERROR_BYTES) if answer.status_code != 200 else b""
            release(answer)
            raise WarmError(_refusal(answer, body, "blob"))
        if size != blob.size:
            release(answer)
            raise WarmError(f"the registry sends {size} bytes, the manifest says {blob.size}")
        fill = self.fills.reserve(blob.digest)
        if fill is None:  # cannot happen: one reservation per digest, max_fills >= jobs
            release(answer)
            raise WarmError("no fill could be reserved")
        if not fill.begin(answer, size, answer.raw.headers.items()):
            fill.cancel()
            release(answer)
            raise WarmError(f"no spool file for {size} bytes: check BLOBLO_SPOOL_DIR")
        return fill

    def _blob_answer(self, blob: Blob) -> requests.Response:
        """The upstream's answer to the blob's GET, in plain bytes, following redirects that
        stay at the upstream, at most MAX_SAME_ORIGIN_HOPS (as the proxy's fills do)."""
        target = f"/v2/{blob.name}/blobs/{blob.digest}"
        answer = self.upstream.follow(lambda at: self._get(blob.name, at, IDENTITY), target)
        if answer.status_code in REDIRECTS and "Location" in answer.headers:
            release(answer)
            raise WarmError(
                "upstream redirects this blob to another origin (or more than "
                f"{MAX_SAME_ORIGIN_HOPS} times): not cacheable"
            )
        return answer


def _read(answer: requests.Response, limit: int) -> bytes:
    """Up to limit bytes of answer's body (decoded), then the answer is released."""
    try:
        return answer.raw.read(limit, decode_content=True)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise WarmError(f"the registry broke off its answer: {type(exc).__name__}") from None
    finally:
        release(answer)


def _advance(advance: Callable[[int], None], count: int) -> int:
    if count > 0:
        advance(count)
    return max(count, 0)


def _refusal(answer: requests.Response, body: bytes, what: str) -> str:
    """Why the upstream's answer is not the manifest or blob: its status and error message."""
    if answer.status_code == 401:
        return f"401 Unauthorized: the credentials (or anonymous) may not pull this {what}"
    if answer.status_code == 200:
        encoding = answer.headers.get("Content-Encoding")
        if encoding:
            return f"the registry sends the {what} with Content-Encoding {encoding}: not cacheable"
        return f"the registry sends the {what} with a malformed Content-Length: not cacheable"
    try:
        errors = json.loads(body)["errors"]
        message = "; ".join(f"{e['code']}: {e['message']}" for e in errors)
    except (ValueError, KeyError, TypeError):
        message = answer.reason or ""
    return f"{answer.status_code} {message}".strip()
