"""Multipart uploads no fill will finish, aborted: a worker killed mid-upload (SIGKILL, the OOM
killer, a host that died) cannot abort its own, and S3 keeps its parts, and bills them, until
someone does (issue #14 §2).

A fill's upload begins after the fill and ends within BLOBLO_FILL_DEADLINE_SECONDS of the
fill's start (fills.py aborts it then), so an upload under bloblo's keys older than that is
one nobody will finish, whichever worker or instance sharing the bucket began it. Each worker
aborts those at start-up and every minute (as often as the deadline, when that is shorter).
The bucket's lifecycle rule (AbortIncompleteMultipartUpload, docs/operating.md) stays the
operator's second line, for what bloblo cannot reach (a missing permission, a bloblo gone).
A copy in place of a blob over 5 GiB (BLOBLO_CACHE_REFRESH_SECONDS, a multipart copy) still
running after the deadline is aborted too: the object stays as it was, and is copied later.
"""

from __future__ import annotations

import logging

import gevent
from botocore.exceptions import BotoCoreError, ClientError

from . import metrics
from .config import Settings
from .storage import BlobStore

LOG = logging.getLogger(__name__)

SWEEP_SECONDS = 60.0  # at most this long between two looks at the bucket's uploads
MIN_SWEEP_SECONDS = 1.0


class AbandonedUploads:
    """Aborts, in the background, the uploads of store's bucket older than the fill deadline."""

    def __init__(self, settings: Settings, store: BlobStore):
        self._store = store
        self._older_than = settings.fill_deadline_seconds
        self._every = max(MIN_SWEEP_SECONDS, min(SWEEP_SECONDS, self._older_than))
        self._where = f"s3://{settings.s3_bucket}/{settings.s3_prefix}blobs/"
        self._failing: str | None = None  # the last failure logged, until a sweep succeeds

    def start(self) -> None:
        """Sweep now, and then every minute (or every fill deadline, when shorter)."""
        gevent.spawn(self._run)

    def sweep(self) -> int:
        """Abort the uploads older than the fill deadline; log and count them, and return how
        many. Never raises: a failing S3 is logged (once, until a sweep succeeds again), and
        nothing is asked of S3 while bloblo serves from the registry after an S3 failure."""
        if not self._store.available():
            return 0
        try:
            aborted = self._store.abort_stale_uploads(self._older_than)
        except (ClientError, BotoCoreError) as exc:
            self._report(exc)
            return 0
        self._failing = None
        if aborted:
            metrics.STALE_UPLOADS_ABORTED.inc(aborted)
            LOG.warning(
                "aborted %d multipart uploads under %s begun more than %gs ago "
                "(BLOBLO_FILL_DEADLINE_SECONDS): left by workers killed mid-upload",
                aborted,
                self._where,
                self._older_than,
            )
        return aborted

    def _run(self) -> None:
        while True:
            self.sweep()
            gevent.sleep(self._every)

    def _report(self, exc: Exception) -> None:
        problem = str(exc)
        if problem == self._failing:
            return
        self._failing = problem
        denied = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
            "AccessDenied",
            "403",
        )
        LOG.warning(
            "cannot abort the multipart uploads killed workers left under %s (%s)%s; until "
            "bloblo can, only the bucket's lifecycle rule (AbortIncompleteMultipartUpload) does",
            self._where,
            problem,
            ": give bloblo s3:ListBucketMultipartUploads and s3:AbortMultipartUpload on it"
            if denied
            else "",
        )
