"""S3 as a content-addressed blob cache: keys, lookups, presigned GETs and verified uploads."""

from __future__ import annotations

import base64
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import BinaryIO

import boto3
import cachetools
import gevent
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from . import metrics
from .config import Settings
from .names import Digest

LOG = logging.getLogger(__name__)

MIB = 1024 * 1024
CONTENT_TYPE = "application/octet-stream"
# Object metadata: the digest of another algorithm the registry named for the blob, which the
# bytes were verified against too when the object was published (issue #13 §6).
CANONICAL = "canonical-digest"
MIN_PART = 8 * MIB  # FIELD-NOTES: larger parts stall the event loop longer while signing
MAX_PARTS = 9_000  # S3 allows 10,000; keep a margin for a Content-Length that lied low
# A lookup on a client's request path (HeadObject, GetObject's answer) that S3 has not answered
# within this long, retries included, is an S3 failure: S3 answers in milliseconds when well, and
# a pull must not wait out boto3's 3 attempts of 10 s each (2 s more each to connect) per blob.
LOOKUP_SECONDS = 2.0
KNOWN_BLOBS = 100_000  # positive lookups remembered per worker
# A presigned URL is handed out again while this little of its life is spent (issue #14).
PRESIGN_REUSE_FRACTION = 0.05
PRESIGN_REUSE_SECONDS = 60.0
PRESIGNED_KEPT = 10_000  # URLs kept per worker for that, least recently used first
# CopyObject copies at most 5 GiB; a larger object is copied in parts of this size.
MAX_COPY = 5 * 1024 * MIB
REFRESH_RETRY_SECONDS = 300.0  # after a failed refresh of a blob, a worker waits this long
# Remembered blobs are redirected to only while S3 answered within this long: a redirect to a
# dead S3 fails the pull, so a stale worker asks S3 again first (one request per interval).
TRUST_SECONDS = 2.0
# S3 dates its answers (Date), and LocalStack a multipart upload's start, in whole seconds: an
# upload is older than a limit for sure when S3's clock says so by this much more.
CLOCK_RESOLUTION = 1.0

_HINTS = {
    "SlowDown": "S3 throttles this key prefix (about 5,500 GET/HEAD and 3,500 PUT per second)",
    "503": "S3 is unavailable or throttling (HEAD answers carry no error code)",
    "LookupTimeout": "S3 answers too slowly: check its health and the network to it",
    "NoSuchBucket": "create the bucket, or set BLOBLO_S3_BUCKET_NAME",
    "404": "no such bucket: create it, or set BLOBLO_S3_BUCKET_NAME",  # HeadBucket's code
    "AccessDenied": "the credentials lack s3:GetObject/PutObject on the bucket",
    "InvalidAccessKeyId": "check the AWS credentials bloblo runs with",
    "SignatureDoesNotMatch": "check the AWS secret key and BLOBLO_S3_REGION",
    "AuthorizationHeaderMalformed": "BLOBLO_S3_REGION does not match the bucket's region",
    "NoCredentialsError": "give bloblo AWS credentials (instance profile, AWS_* variables, "
    "~/.aws) or set BLOBLO_USE_LOCALSTACK=true",
    "EndpointConnectionError": "check BLOBLO_S3_ENDPOINT_URL and that S3 is reachable",
}


@dataclass(frozen=True)
class _Known:
    """What a worker remembers of a blob S3 said it holds."""

    until: float  # monotonic seconds: ask S3 again after this (BLOBLO_CACHE_CHECK_SECONDS)
    size: int | None
    written: float  # epoch seconds when the object was last written (S3's LastModified)
    canonical: str | None = None  # the object's CANONICAL metadata


class LookupTimeout(gevent.Timeout):
    """S3 did not answer a lookup on a client's request path within LOOKUP_SECONDS, retries
    included. A gevent.Timeout, so that no `except Exception` of boto3's catches it."""

    def __str__(self) -> str:
        return f"no answer from S3 in {LOOKUP_SECONDS:g}s"


class RangeNotSatisfiable(Exception):
    """S3 holds the blob, but not the byte range asked for (its 416)."""


@dataclass
class S3Object:
    """An open S3 object body with what the client needs to know about it."""

    status: int  # 200, or 206 for a range
    length: int
    content_range: str | None
    body: object  # botocore StreamingBody

    def chunks(self, size: int):
        """The body in chunks of at most size bytes; closes the body at the end."""
        try:
            yield from self.body.iter_chunks(size)
        finally:
            self.body.close()


class BlobStore:
    """Blobs in one bucket under <prefix>blobs/<algorithm>/<hex>; one instance per worker."""

    def __init__(
        self,
        settings: Settings,
        clock=time.monotonic,
        wall_clock=time.time,
        unavailable_seconds: float | None = None,
    ):
        """unavailable_seconds: how long a failure of S3 makes available() False (0: never,
        for a tool whose only job is to fill S3); BLOBLO_S3_BACKOFF_SECONDS when not given."""
        self._bucket = settings.s3_bucket
        self._unavailable_seconds = (
            settings.s3_backoff_seconds if unavailable_seconds is None else unavailable_seconds
        )
        self._prefix = settings.s3_prefix
        self._expires = settings.presign_expires
        self._check_seconds = settings.cache_check_seconds
        self._refresh_after = settings.cache_refresh_seconds
        self._clock, self._wall_clock = clock, wall_clock
        self._refreshing: set[str] = set()
        self._refresh_retry: dict[str, float] = {}  # key: when a failed refresh may be retried
        self._unavailable_until = 0.0
        self._up = True
        metrics.S3_AVAILABLE.set(1)
        self._answered_at = float("-inf")
        self._known: OrderedDict[str, _Known] = OrderedDict()
        # key: (URL, wall-clock time until which it is handed out again)
        self._presigned: cachetools.LRUCache = cachetools.LRUCache(PRESIGNED_KEPT)
        session = boto3.session.Session(
            aws_access_key_id=settings.s3_access_key,
            aws_secret_access_key=settings.s3_secret_key,
            region_name=settings.s3_region,
        )
        # Temporary credentials (instance profile, STS, credential_process) carry an expiry
        # that presigned URLs must not outlive; static ones have none.
        self._credentials = session.get_credentials()
        config = _client_config(path_style=settings.s3_endpoint_url is not None)
        self._client = session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
        self._client.meta.events.register("response-received.s3", _count_failed_attempt)
        # Presigned URLs sign the host: sign for the endpoint clients reach.
        self._presigner = (
            self._client
            if settings.s3_public_endpoint_url == settings.s3_endpoint_url
            else session.client("s3", endpoint_url=settings.s3_public_endpoint_url, config=config)
        )

    def key(self, digest: Digest) -> str:
        """The object key of a blob."""
        return f"{self._prefix}blobs/{digest.algorithm}/{digest.hex}"

    def available(self) -> bool:
        """False for a while after S3 failed, so pulls do not wait on a broken S3."""
        if self._clock() < self._unavailable_until:
            return False
        if not self._up:  # the wait is over: S3 is asked again
            self._up = True
            metrics.S3_AVAILABLE.set(1)
        return True

    def report_failure(self, exc: Exception) -> None:
        """Note that S3 failed: log what to check and stop asking it for a while."""
        if self.available():
            code = _error_code(exc)
            LOG.warning(
                "S3 bucket %s failed (%s)%s; serving blobs from upstream for %gs",
                self._bucket,
                exc,
                f": {_HINTS[code]}" if code in _HINTS else "",
                self._unavailable_seconds,
            )
        self._unavailable_until = self._clock() + self._unavailable_seconds
        if self._unavailable_seconds:
            self._up = False
            metrics.S3_AVAILABLE.set(0)

    def contains(self, digest: Digest) -> bool:
        """Whether the blob is in the bucket. Never raises: a failing S3 counts as a miss.

        A yes is remembered for BLOBLO_CACHE_CHECK_SECONDS (at most 60), and only while S3
        answered within TRUST_SECONDS: an object deleted by a lifecycle rule or an operator is
        redirected to for at most that long (issue #8, part 6)."""
        key = self.key(digest)
        if not self.available():
            return False
        if self._remembered(key) and self._clock() - self._answered_at < TRUST_SECONDS:
            return True
        known_before = self._known.get(key)
        try:
            with metrics.S3_DURATION.labels("head_object").time(), LookupTimeout(LOOKUP_SECONDS):
                head = self._client.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status not in (403, 404):  # 403: no s3:ListBucket, the object is absent
                self.report_failure(exc)
            else:
                self._answered_at = self._clock()
                if self._known.get(key) is known_before:  # not an upload's, made meanwhile
                    self._known.pop(key, None)
            return False
        except LookupTimeout as exc:
            metrics.S3_ERRORS.labels("HeadObject", "LookupTimeout").inc()
            self.report_failure(exc)
            return False
        except BotoCoreError as exc:
            self.report_failure(exc)
            return False
        written, canonical = head["LastModified"].timestamp(), head["Metadata"].get(CANONICAL)
        self._remember(digest, head["ContentLength"], written, canonical)
        return True

    def size(self, digest: Digest) -> int | None:
        """The size of a blob the bucket was last seen to hold, if remembered."""
        known = self._known.get(self.key(digest))
        return known.size if known else None

    def canonical_digest(self, digest: Digest) -> str | None:
        """The registry's digest of another algorithm that a blob the bucket was last seen to
        hold was verified against too, as published with it (None: none, or not remembered)."""
        known = self._known.get(self.key(digest))
        return known.canonical if known else None

    def _remember(
        self, digest: Digest, size: int | None, written: float, canonical: str | None
    ) -> None:
        """Record that the blob (size bytes, last written at epoch seconds written, published
        with the canonical digest given) is in the bucket: S3 just said so."""
        key = self.key(digest)
        self._answered_at = self._clock()
        until = self._answered_at + self._check_seconds
        self._known[key] = _Known(until, size, written, canonical)
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_BLOBS:
            self._known.popitem(last=False)

    def _remembered(self, key: str) -> bool:
        known = self._known.get(key)
        if known is None:
            return False
        if known.until <= self._clock():
            del self._known[key]
            return False
        return True

    def probe(self, timeout: float) -> str | None:
        """None when the bucket answers a HEAD within timeout seconds, else what went wrong
        (with the operator's hint). For health checks: it does not mark S3 unavailable."""
        try:
            with gevent.Timeout(timeout):
                self._client.head_bucket(Bucket=self._bucket)
        except gevent.Timeout:
            return f"no answer from S3 in {timeout:g}s"
        except (ClientError, BotoCoreError) as exc:
            code = _error_code(exc)
            return f"{exc}" + (f": {_HINTS[code]}" if code in _HINTS else "")
        return None

    def presigned_url(self, digest: Digest) -> str:
        """A SigV4 URL that GETs the blob, valid for BLOBLO_PRESIGN_EXPIRES seconds, or less:
        never beyond the expiry of the temporary credentials that sign it (issue #8, part 6).

        The same URL is handed out again while at most PRESIGN_REUSE_FRACTION of its life
        (and PRESIGN_REUSE_SECONDS) is spent: every client gets at least 95% of the expiry,
        and a warm GET costs no signature most of the time (issue #14: botocore's presign
        was 15% of a warm redirect's CPU).

        Raises botocore's NoCredentialsError when there are no credentials."""
        now, key = self._wall_clock(), self.key(digest)
        kept = self._presigned.get(key)
        if kept is not None and now < kept[1]:
            return kept[0]
        seconds = presign_seconds(self._expires, self._credentials, now)
        url = self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=seconds
        )
        reuse = min(PRESIGN_REUSE_SECONDS, seconds * PRESIGN_REUSE_FRACTION)
        self._presigned[key] = (url, now + reuse)
        return url

    def refresh_if_old(self, digest: Digest) -> None:
        """Copy the blob's object in place, in the background, if it was last written more than
        BLOBLO_CACHE_REFRESH_SECONDS ago (never when that is 0): a lifecycle rule that expires
        objects N days after they were written then spares the blobs clients still pull.
        At most one copy per blob and worker runs at once; a failure is logged, not raised."""
        key = self.key(digest)
        if not self.is_stale(digest) or key in self._refreshing:
            return
        if self._refresh_retry.get(key, 0.0) > self._clock():  # it failed a moment ago
            return
        self._refreshing.add(key)
        gevent.spawn(self._refresh_in_background, digest, key)

    def is_stale(self, digest: Digest) -> bool:
        """Whether the blob, remembered in the bucket, was last written more than
        BLOBLO_CACHE_REFRESH_SECONDS ago (never when that is 0)."""
        known = self._known.get(self.key(digest))
        return bool(
            self._refresh_after
            and known is not None
            and self._wall_clock() - known.written >= self._refresh_after
        )

    def _refresh_in_background(self, digest: Digest, key: str) -> None:
        try:
            self.refresh(digest)
            metrics.CACHE_REFRESHES.labels("copied").inc()
            LOG.info("refreshed %s in S3 (copied in place)", key)
            self._refresh_retry.pop(key, None)
        except Exception as exc:
            metrics.CACHE_REFRESHES.labels("failed").inc()
            LOG.warning(
                "could not refresh %s in S3 (a copy in place), next try in %gs: %s",
                key,
                REFRESH_RETRY_SECONDS,
                exc,
            )
            if len(self._refresh_retry) >= KNOWN_BLOBS:
                self._refresh_retry.clear()
            self._refresh_retry[key] = self._clock() + REFRESH_RETRY_SECONDS
        finally:
            self._refreshing.discard(key)

    def refresh(self, digest: Digest, largest_copy: int = MAX_COPY) -> None:
        """Copy the blob's object onto itself, so that S3 counts it as written now. An object
        above largest_copy bytes (5 GiB, CopyObject's limit) is copied in parts of that size
        (UploadPartCopy); the object stays whole and readable throughout.

        Needs s3:GetObject and s3:PutObject; raises botocore's ClientError or BotoCoreError."""
        key = self.key(digest)
        # A copy onto itself replaces the metadata: carry the object's own over.
        metadata = self._client.head_object(Bucket=self._bucket, Key=key)["Metadata"]
        config = TransferConfig(
            multipart_threshold=largest_copy + 1,
            multipart_chunksize=largest_copy,
            max_concurrency=4,
            use_threads=True,
        )
        with metrics.S3_DURATION.labels("copy").time():
            self._client.copy(
                {"Bucket": self._bucket, "Key": key},
                self._bucket,
                key,
                # S3 refuses a copy onto itself that changes nothing.
                ExtraArgs={
                    "MetadataDirective": "REPLACE",
                    "ContentType": CONTENT_TYPE,
                    "Metadata": metadata,
                },
                Config=config,
            )
        known = self._known.get(key)
        if known is not None:
            self._known[key] = replace(known, written=self._wall_clock())

    def open(self, digest: Digest, byte_range: str | None) -> S3Object | None:
        """The blob's bytes (or the range asked for) from S3; None when S3 cannot serve them.

        Raises RangeNotSatisfiable when S3 answers 416: the blob is there, the range is not.
        """
        extra = {"Range": byte_range} if byte_range else {}
        key = self.key(digest)
        try:
            with metrics.S3_DURATION.labels("get_object").time(), LookupTimeout(LOOKUP_SECONDS):
                obj = self._client.get_object(Bucket=self._bucket, Key=key, **extra)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 416:
                raise RangeNotSatisfiable(exc.response.get("Error", {}).get("Message")) from None
            if status == 404:
                self._known.pop(key, None)  # deleted since: serve it from upstream
            else:
                self.report_failure(exc)
            return None
        except LookupTimeout as exc:
            metrics.S3_ERRORS.labels("GetObject", "LookupTimeout").inc()
            self.report_failure(exc)
            return None
        except BotoCoreError as exc:
            self.report_failure(exc)
            return None
        return S3Object(
            status=obj["ResponseMetadata"]["HTTPStatusCode"],
            length=obj["ContentLength"],
            content_range=obj.get("ContentRange"),
            body=obj["Body"],
        )

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the multipart uploads under the blobs' keys that began more than older_than
        seconds ago by S3's own clock (the Date of its answer; this host's clock only when S3
        sends none), so that a clock here that runs ahead never makes a young upload look
        old. Returns how many this call aborted; one that is gone meanwhile (aborted by
        another worker or instance, or completed) is not counted.

        Needs s3:ListBucketMultipartUploads and s3:AbortMultipartUpload; raises botocore's
        ClientError or BotoCoreError when S3 refuses or fails."""
        aborted = 0
        pages = self._client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self._bucket, Prefix=f"{self._prefix}blobs/"
        )
        for page in pages:
            now = s3_time(page) or self._wall_clock()
            for upload in stale_uploads(page.get("Uploads", []), now, older_than):
                try:
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise
                    continue
                aborted += 1
        return aborted

    def put(self, digest: Digest, data: bytes) -> None:
        """Store a small blob as it is (for `bloblo check`; fills go through upload())."""
        self._client.put_object(
            Bucket=self._bucket,
            Key=self.key(digest),
            Body=data,
            ContentType=CONTENT_TYPE,
        )

    def upload(
        self,
        fileobj: BinaryIO,
        digest: Digest,
        size: int | None,
        canonical: Digest | None = None,
    ) -> None:
        """Upload fileobj's bytes under the blob's key; publishes only if fileobj ends cleanly.
        canonical, the registry's digest of another algorithm the bytes were verified against
        too, is stored with the object (CANONICAL metadata).

        An exception from fileobj.read() aborts the upload: nothing appears under the key.
        A blob sent in one PUT carries its SHA-256 (when it has one), which S3 checks: a body
        cut short on the way (a worker killed mid-PUT) is refused, never stored as an object
        (LocalStack stores what it got; issue #14 §2). A multipart upload needs no such check:
        only a worker that sent every part, verified, completes it.
        """
        extra = {"ContentType": CONTENT_TYPE}
        if canonical is not None:
            extra["Metadata"] = {CANONICAL: str(canonical)}
        part = part_size(size)
        sha256 = next((d for d in (digest, canonical) if d and d.algorithm == "sha256"), None)
        if sha256 is not None and size is not None and size < part:  # one PUT
            extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(sha256.hex)).decode()
        config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=4, use_threads=True
        )
        config.max_in_memory_upload_chunks = 4  # bounds memory: about 5 parts per upload
        with metrics.S3_DURATION.labels("upload").time():
            self._client.upload_fileobj(
                fileobj,
                self._bucket,
                self.key(digest),
                ExtraArgs=extra,
                Config=config,
            )
        self._remember(digest, size, self._wall_clock(), str(canonical) if canonical else None)


def _error_code(exc: Exception) -> str:
    """What an S3 failure was: S3's error code (SlowDown, AccessDenied, ...; a HEAD answer has
    no body, so its status), or the name of what kept the answer from coming."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "unknown")
    return type(exc).__name__


# Answers that say a blob is absent, not that S3 failed (403: no s3:ListBucket).
_ABSENT = {"HeadObject": (403, 404), "GetObject": (404, 416)}


def _count_failed_attempt(event_name: str, exception=None, parsed_response=None, **_) -> None:
    """botocore's response-received hook: count each attempt of a request that S3 refused or
    did not answer, retried or not (bloblo_s3_errors_total)."""
    operation = event_name.rsplit(".", 1)[-1]
    if exception is not None:
        code = type(exception).__name__
    else:
        status = (parsed_response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status < 400 or status in _ABSENT.get(operation, ()):
            return
        code = (parsed_response.get("Error") or {}).get("Code") or str(status)
    metrics.S3_ERRORS.labels(operation, code).inc()


def presign_seconds(configured: int, credentials, now: float) -> int:
    """The expiry, in seconds, of a URL presigned now (epoch seconds) with credentials:
    configured, capped at what is left of temporary credentials (boto3's RefreshableCredentials
    know their expiry; static keys have none), at least 1."""
    if credentials is None:
        return configured
    credentials.get_frozen_credentials()  # renews credentials close to their expiry first
    expiry = getattr(credentials, "_expiry_time", None)  # botocore exposes no public accessor
    if expiry is None:
        return configured
    return max(1, min(configured, int(expiry.timestamp() - now)))


def stale_uploads(uploads: Iterable[dict], now: float, older_than: float) -> list[dict]:
    """The uploads (as ListMultipartUploads lists them) that began more than older_than seconds
    before now (epoch seconds, S3's clock, both perhaps cut to whole seconds)."""
    return [
        upload
        for upload in uploads
        if now - upload["Initiated"].timestamp() >= older_than + CLOCK_RESOLUTION
    ]


def s3_time(answer: dict) -> float | None:
    """When S3 sent answer (its Date header), in epoch seconds; None without a usable one."""
    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


def part_size(size: int | None) -> int:
    """Multipart part size for a blob of size bytes: 8 MiB, larger when needed to fit the parts."""
    if not size:
        return MIN_PART
    return max(MIN_PART, math.ceil(size / MAX_PARTS / MIB) * MIB)


def _client_config(path_style: bool) -> Config:
    return Config(
        signature_version="s3v4",
        s3={
            "addressing_style": "path" if path_style else "auto",
            # The digest check before publishing covers integrity; hashing each part again
            # for the signature would cost a second pass over every byte.
            "payload_signing_enabled": False,
        },
        connect_timeout=2,
        read_timeout=10,
        # At most 3 attempts of a request (boto3's `max_attempts` counts retries only), with
        # backoff of up to 1 s then 2 s after throttling (SlowDown), 50 then 100 ms otherwise;
        # a lookup on a client's request path is bounded as a whole by LOOKUP_SECONDS.
        retries={"total_max_attempts": 3, "mode": "standard"},
        max_pool_connections=64,
        # boto3 >= 1.36 sends CRC checksums that some S3-compatible stores reject.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
