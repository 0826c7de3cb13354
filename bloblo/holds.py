"""The upload hold: a verified blob's upload to S3 waits until the host's workers are quiet
(issue #7, cold pulls). On a host short of cores an upload (boto3, and the S3 server if it runs
there) slows the clients still waiting for their blobs, and a pull's next blob (its config,
after the layers) comes right after the last one.

A worker is busy while it downloads a blob for a fill or serves one to a client; it tells the
host's other workers through a shared lock (host.HostFills.busy). This worker's own changes wake
a held upload (events); another worker's are looked at every POLL_SECONDS (another process
sends no event).
"""

from __future__ import annotations

import time

from gevent.event import Event

from . import metrics
from .host import HostFills
from .readers import FillReader

POLL_SECONDS = 0.02  # how often a held upload looks whether another worker is still busy
QUIET_SECONDS = 1.0  # a held upload goes once the host has been idle this long


class UploadHold:
    """This worker's downloads and clients of fills, and the wait of its uploads for a quiet
    host: at most `seconds` (BLOBLO_UPLOAD_HOLD_SECONDS; 0: no wait)."""

    def __init__(self, seconds: float, host: HostFills | None):
        self._seconds = seconds
        self._host = host  # None: this worker's fills are its own
        self._busy = 0  # downloads of this worker's fills, and its clients of fills, now
        self._idle_since = 0.0  # monotonic seconds when this worker was last busy
        self._draining = False  # the worker stops: held uploads go at once
        self._moved = Event()  # set (and replaced) when this worker turns busy or idle, or drains

    def serving(self, reader: FillReader) -> FillReader:
        """reader, counted as a client of a fill until it is closed."""
        self.busy(+1)
        reader.on_close(lambda: self.busy(-1))
        return reader

    def busy(self, change: int) -> None:
        """One more (+1) or one less (-1) download or client of a fill in this worker."""
        was_busy = self._busy > 0
        self._busy += change
        if self._busy == 0:
            self._idle_since = time.monotonic()
        if was_busy != (self._busy > 0):
            if self._host is not None:
                self._host.busy(self._busy > 0)
            self._move()

    def drain(self) -> None:
        """The worker stops: held uploads go at once, and later ones do not wait."""
        self._draining = True
        self._move()

    def wait(self) -> float:
        """Wait until the host's workers have neither downloaded a blob nor served one from a
        fill for QUIET_SECONDS, or the hold's seconds are over, or the worker drains; return
        the seconds waited (also observed in bloblo_upload_hold_seconds)."""
        started = time.monotonic()
        deadline = started + self._seconds
        last_busy = self._idle_since
        while (now := time.monotonic()) < deadline and not self._draining:
            moved = self._moved
            if self._busy > 0:  # until this worker's clients are served
                moved.wait(deadline - now)
                continue
            if self._host is not None and self._host.busy_elsewhere():
                last_busy = now
                moved.wait(min(POLL_SECONDS, deadline - now))
                continue
            # (_idle_since: a client of this worker came and went since the last look)
            quiet_for = now - max(last_busy, self._idle_since)
            if quiet_for >= QUIET_SECONDS:
                break
            step = QUIET_SECONDS - quiet_for
            if self._host is not None:  # another worker may turn busy meanwhile: look again
                step = min(step, POLL_SECONDS)
            moved.wait(min(step, deadline - now))
        held = time.monotonic() - started
        metrics.UPLOAD_HOLD.observe(held)
        return held

    def _move(self) -> None:
        moved, self._moved = self._moved, Event()
        moved.set()
