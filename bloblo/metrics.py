"""Metrics: what bloblo did, counted in prometheus-client's multiprocess mode across gunicorn's
workers, and served at /metrics to the networks in BLOBLO_METRICS_NETWORKS (issue #8, part 3).

gunicorn.conf.py prepares PROMETHEUS_MULTIPROC_DIR in the master before any worker imports this
module, and marks each dead worker's files. The families observe outcomes the policy already
names (blobs.py, fills.py); nothing here decides anything.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable, Sequence

import gevent
from flask import Blueprint, Response, abort, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from werkzeug.wsgi import ClosingIterator

from .clients import in_networks
from .config import Network

HTTP_REQUESTS = Counter(
    "bloblo_http_requests_total",
    "Requests bloblo answered, by method and status.",
    ["method", "code"],
)
HTTP_DURATION = Histogram(
    "bloblo_http_request_duration_seconds",
    "Seconds from a request's arrival until its answer was sent whole.",
    ["method"],
)
BLOB_REQUESTS = Counter(
    "bloblo_blob_requests_total",
    "Blob GETs by how they were answered: redirect, s3_stream, fill, fill_join, upstream, refused.",
    ["outcome"],
)
BLOB_BYTES = Counter(
    "bloblo_blob_bytes_total",
    "Blob bytes clients got, by where they came from: s3 (the blob's size, when redirected or "
    "streamed from S3), spool (from a fill), upstream (passed through uncached).",
    ["source"],
)
UPSTREAM_BYTES = Counter(
    "bloblo_upstream_bytes_total", "Blob bytes read from the registry (fills and pass-through)."
)
FILLS = Counter(
    "bloblo_fills_total",
    "Fills that ended, by result: published, digest_mismatch, aborted, failed.",
    ["result"],
)
STALE_UPLOADS_ABORTED = Counter(
    "bloblo_stale_uploads_aborted_total",
    "Multipart uploads under bloblo's keys aborted because they began longer ago than "
    "BLOBLO_FILL_DEADLINE_SECONDS: what workers killed mid-upload left in the bucket.",
)
FILLS_SKIPPED = Counter(
    "bloblo_fills_skipped_total",
    "Blob misses streamed uncached because the blob could not be spooled, by reason: "
    "spool_budget (more than BLOBLO_SPOOL_MAX_MB leaves), spool_disk (no room on the disk of "
    "BLOBLO_SPOOL_DIR).",
    ["reason"],
)
FILLS_IN_PROGRESS = Gauge(
    "bloblo_fills_in_progress", "Fills running now.", multiprocess_mode="livesum"
)
SPOOL_BYTES = Gauge(
    "bloblo_spool_bytes", "Bytes of spool disk reserved by fills now.", multiprocess_mode="livesum"
)
UPLOAD_HOLD = Histogram(
    "bloblo_upload_hold_seconds",
    "Seconds a verified fill's S3 upload waited for the host's other downloads to end "
    "(at most BLOBLO_UPLOAD_HOLD_SECONDS).",
    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600),
)
UPSTREAM_REQUESTS = Counter(
    "bloblo_upstream_requests_total",
    "Requests sent to the registry, by method and the status it answered, or `unreachable` (no "
    "connection) or `timeout` (no answer within BLOBLO_UPSTREAM_CONNECT/READ_TIMEOUT).",
    ["method", "code"],
)
UPSTREAM_DURATION = Histogram(
    "bloblo_upstream_request_duration_seconds",
    "Seconds until the registry answered a request (headers, not the body).",
    ["method"],
)
S3_DURATION = Histogram(
    "bloblo_s3_request_duration_seconds", "Seconds an S3 operation took.", ["operation"]
)
S3_ERRORS = Counter(
    "bloblo_s3_errors_total",
    "S3 requests that failed, each attempt counted (boto3 tries throttled, 5xx and unanswered "
    "requests up to 3 times), by S3 operation (HeadObject, GetObject, PutObject, UploadPart, "
    "CreateMultipartUpload, ...) and S3's error code (SlowDown, AccessDenied, NoSuchBucket; a "
    "HEAD's status, which has no body) or what kept the answer from coming "
    "(EndpointConnectionError, ReadTimeoutError, LookupTimeout). A blob's absence is no error.",
    ["operation", "code"],
)
CACHE_REFRESHES = Counter(
    "bloblo_cache_refreshes_total",
    "Objects copied in place because they were older than BLOBLO_CACHE_REFRESH_SECONDS, by "
    "result: copied, failed.",
    ["result"],
)
S3_AVAILABLE = Gauge(
    "bloblo_s3_available",
    "1 while S3 answers, 0 while bloblo serves from the registry after an S3 failure.",
    multiprocess_mode="livemin",
)
WORKER_GREENLETS = Gauge(
    "bloblo_worker_greenlets",
    "Greenlets spawned and not yet ended in each worker, counted every 5 s: back to its idle "
    "count once the load is over (a count that only grows is a leak).",
    multiprocess_mode="liveall",
)
WATCH_SECONDS = 5.0


def watch_worker(interval: float = WATCH_SECONDS) -> gevent.Greenlet:
    """Count this worker's live greenlets into WORKER_GREENLETS every `interval` seconds,
    each time once the event loop has nothing else to do, in a greenlet of its own (a walk of
    the garbage collector's objects, some 10 ms: not more often). Returns that greenlet."""

    def watch() -> None:
        while True:
            gevent.idle()
            alive = sum(
                1 for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead
            )
            WORKER_GREENLETS.set(alive)
            gevent.sleep(interval)

    return gevent.spawn(watch)


def count_body(chunks: Iterable[bytes], counter: Callable[[int], None]) -> Iterable[bytes]:
    """chunks, unchanged, counting their bytes as they go out."""
    for chunk in chunks:
        counter(len(chunk))
        yield chunk


class Requests:
    """WSGI middleware: counts each request and times it until its answer was sent whole."""

    def __init__(self, app: Callable, clock=time.monotonic):
        self._app = app
        self._clock = clock

    def __call__(self, environ: dict, start_response: Callable):
        started, seen = self._clock(), {}

        def start(status, headers, exc_info=None):
            seen["code"] = status.split(None, 1)[0]
            return start_response(status, headers, exc_info)

        def done() -> None:
            method = environ.get("REQUEST_METHOD", "")
            HTTP_REQUESTS.labels(method, seen.get("code", "500")).inc()
            HTTP_DURATION.labels(method).observe(self._clock() - started)

        return ClosingIterator(self._app(environ, start), [done])


def registry() -> CollectorRegistry:
    """Every live worker's metrics (multiprocess mode), or this process's alone without
    PROMETHEUS_MULTIPROC_DIR (the development server)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    return collected


def create_blueprint(networks: Sequence[Network]) -> Blueprint:
    """/metrics for clients in networks (the client address, see clients.py); 404 for others."""
    blueprint = Blueprint("metrics", __name__)

    @blueprint.route("/metrics")
    def metrics() -> Response:
        """The metrics of every live worker, in Prometheus' text format."""
        if not in_networks(request.remote_addr, networks):
            abort(404)
        return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)

    return blueprint
