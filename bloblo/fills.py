"""Fills: one background download per blob and worker, that every client of the blob reads from.

A fill takes the upstream's answer to one authorized GET, writes the blob to a spool file while
hashing it, and pumps the spool into an S3 upload that completes only when what S3 received is
the blob. Clients read the spool as it grows: the one that started the fill, every concurrent
client of the digest, ranged or not. The fill does not depend on them: it runs to its end when
they leave or read slowly, within BLOBLO_MAX_FILLS, BLOBLO_SPOOL_MAX_MB and
BLOBLO_FILL_DEADLINE_SECONDS (issue #7).
"""

from __future__ import annotations

import logging
import os
import time

import gevent
import requests
from cachetools import LRUCache
from gevent.event import Event
from gevent.lock import BoundedSemaphore

from . import metrics
from .config import Settings
from .errors import AbortResponse
from .fillstate import FillState
from .followers import SharedFill
from .holds import UploadHold
from .host import HostFills
from .loop import Turns
from .names import Digest
from .readers import CHUNK
from .spool import Spool, SpoolBudget, SpoolDiskFull, SpoolError, open_spool
from .storage import BlobStore
from .uploads import Pipe, UploadAborted, VerifiedReader
from .upstream import release

LOG = logging.getLogger(__name__)


class FillBroken(Exception):
    """The download ended without the whole blob, verified."""


class Fill:
    """One blob on its way from the upstream to the spool and on to S3.

    Created reserved (Fills.reserve), then either begin()s with the upstream's answer or is
    cancel()led. Clients read it through reader() (readers.py), in this worker, or from the
    named spool in the host's other workers (host.py); `broken` says why the download failed.
    """

    def __init__(
        self,
        digest: Digest,
        owner: Fills,
        shared_path: str | None = None,
        canonical: Digest | None = None,
    ):
        self.digest = digest
        self.size = 0
        self.headers: list[tuple[str, str]] = []  # the upstream's answer, for every client
        self.spool: Spool | None = None
        self.verified = False  # every byte is in the spool and hashes to the digest(s)
        self.canonical = canonical  # the registry's other digest of it (evidence.py)
        self.broken: str | None = None
        self.result: str | None = None  # published, digest_mismatch, aborted, failed
        # Reserved just after another worker's fill of the blob ended verified (reserve).
        self.after_verified = False
        self.done = Event()  # download and upload are over
        self._owner = owner
        self._shared_path = shared_path  # the spool's name for the host's other workers
        self._started = Event()  # running, or cancelled
        self.progress = Event()  # set (and replaced) whenever the fill moves on
        self._readers = 0
        self._writing = None  # the threadpool's write of the latest chunk, while it runs

    # -- the client that starts it -------------------------------------------------------------

    def begin(self, response: requests.Response, size: int, headers) -> bool:
        """Run the fill on response (a 200 of size plain bytes); False (nothing started) when
        the blob cannot be spooled: no room in the spool budget or on the spool's disk (counted
        in bloblo_fills_skipped_total, and logged once per digest: issue #13 §3), or no spool
        file can be made.

        The fill is verified only when exactly size bytes came and they hash to the digest and,
        when the fill was reserved with one, to its canonical digest too (the digest of another
        algorithm the registry named for the blob; it is stored with the object: issue #13
        §6)."""
        budget = self._owner.budget
        try:
            self.spool = open_spool(self._owner.spool_dir, size, budget, self._shared_path)
        except SpoolDiskFull as exc:
            _skipped(self.digest, "spool_disk", f"{exc}; free disk there or move BLOBLO_SPOOL_DIR")
            return False
        except SpoolError as exc:
            LOG.warning("cannot spool %s: %s; check BLOBLO_SPOOL_DIR", self.digest, exc)
            return False
        if self.spool is None:
            _skipped(self.digest, "spool_budget", budget.shortfall(size))
            return False
        self.size, self.headers = size, list(headers)
        self._share("running")
        metrics.FILLS_IN_PROGRESS.inc()
        gevent.spawn(self._run, response)
        self._started.set()
        return True

    def cancel(self) -> None:
        """Give the reservation up: joiners waiting for it fetch the blob themselves."""
        self._owner.forget(self)
        self._leave_host(spool_path=None)
        self._started.set()
        self.done.set()

    # -- clients --------------------------------------------------------------------------------

    def wait_started(self, timeout: float) -> bool:
        """Wait until the fill runs (True) or was cancelled or did not start in time (False)."""
        return self._started.wait(timeout) and self.spool is not None

    # The reading interface (readers.FillView).

    @property
    def readable(self) -> bool:
        """Whether its spool is open: a reader that attaches now keeps it so."""
        return self.spool is not None and not self.spool.closed

    @property
    def refuted(self) -> bool:
        """Whether the fill failed because the upstream's bytes do not hash to the digest."""
        return self.result == "digest_mismatch"

    @property
    def written(self) -> int:
        """Bytes of the blob in the spool so far."""
        return self.spool.written if self.spool is not None else 0

    def attach(self) -> None:
        """One more reader: the spool stays open for it."""
        self._readers += 1

    def detach(self) -> None:
        """A reader is done; the spool is closed once the fill is over and none is left."""
        self._readers -= 1
        self.close_if_unused()

    def read_spool(self, position: int, count: int) -> bytes:
        """count bytes of the blob from position (written already); a spool that fails to
        read raises AbortResponse: the client sees a short read."""
        try:
            return self.spool.read(position, count)
        except SpoolError as exc:
            LOG.error("cannot read the spool of %s: %s", self.digest, exc)
            raise AbortResponse(str(exc)) from None

    # -- the fill itself ------------------------------------------------------------------------

    def _run(self, response: requests.Response) -> None:
        started = time.monotonic()
        try:
            with gevent.Timeout(self._owner.deadline, FillBroken("the fill deadline passed")):
                self._owner.hold.busy(+1)
                try:
                    self._download(response)
                finally:
                    self._owner.hold.busy(-1)
                    release(response)
                    self._owner.downloaded(self)
                # Only now, and once the host's clients of fills are served: while they are,
                # they have the CPU to themselves (an upload alongside made a cold pull twice
                # as slow, issue #7).
                self._owner.hold.wait()
                with self._owner.uploads:
                    if self._owner.store.available():
                        self._upload()
                    else:
                        LOG.warning(
                            "S3 is unavailable: %s not uploaded, stays uncached", self.digest
                        )
        except (FillBroken, SpoolError, requests.RequestException, OSError) as exc:
            self._break(str(exc) or type(exc).__name__)
        except Exception as exc:  # urllib3's ProtocolError and kin: the upstream broke off
            self._break(f"{type(exc).__name__}: {exc}")
        finally:
            self._owner.forget(self)
            self._leave_host(self._shared_path)
            self.result = self.result or ("aborted" if self.broken else "failed")  # no S3
            metrics.FILLS.labels(self.result).inc()
            metrics.FILLS_IN_PROGRESS.dec()
            LOG.info(
                "fill of %s: %s (%d bytes, %.1fs)",
                self.digest,
                self.result,
                self.spool.written,
                time.monotonic() - started,
            )
            if self._writing is not None:  # a deadline can cut in while a thread still writes:
                self._writing.wait()  # the spool's file must outlive that write
            self.done.set()
            self._notify()
            self.close_if_unused()

    def _download(self, response: requests.Response) -> None:
        """Spool and hash the upstream's bytes. Both run in gevent's threadpool (a native
        thread: pwrite and hashlib let go of the GIL), one chunk at a time, while this greenlet
        receives the next: on 2 cores the copy to disk and the hash no longer hold the loop."""
        checks = [(digest, digest.hasher()) for digest in (self.digest, self.canonical) if digest]
        hashers = [hasher for _, hasher in checks]
        turns, pool, received = Turns(), gevent.get_hub().threadpool, 0
        for chunk in response.raw.stream(CHUNK, decode_content=False):
            received += len(chunk)
            if received > self.size:  # a body without Content-Length can run past the size
                raise FillBroken(f"the upstream sent more than {self.size} bytes")
            if self._writing is not None:
                _raise_failed_write(self._writing)
                self._notify()
            self._writing = pool.spawn(_spool_and_hash, self.spool, hashers, chunk)
            metrics.UPSTREAM_BYTES.inc(len(chunk))
            turns.give()
        if self._writing is not None:
            _raise_failed_write(self._writing)
            self._notify()
        if self.spool.written != self.size:
            raise FillBroken(f"the upstream sent {self.spool.written} bytes of {self.size}")
        for digest, hasher in checks:
            if hasher.hexdigest() != digest.hex:
                self.result = "digest_mismatch"
                LOG.error("the upstream sent a wrong blob for %s: not cached", self.digest)
                raise FillBroken(f"content hashes to {digest.algorithm}:{hasher.hexdigest()}")
        self.verified = True
        self._share("verified")
        self._notify()

    def _break(self, reason: str) -> None:
        """The fill failed: no client joins it any more, its readers get a short read."""
        self.broken = reason
        self._owner.forget(self)
        self._share("refuted" if self.refuted else "broken", reason)
        LOG.warning("fill of %s broke off: %s", self.digest, reason)
        self._notify()

    def _upload(self) -> None:
        """Upload the verified spool; S3 completes it only if what it received is the blob."""
        pipe = Pipe()
        pump = gevent.spawn(self._pump, pipe)
        store = self._owner.store
        try:
            reader = VerifiedReader(pipe, self.digest, self.size)
            store.upload(reader, self.digest, self.size, canonical=self.canonical)
            self.result = "published"
            LOG.info("published %s to S3", self.digest)
        except UploadAborted as exc:
            self.result = "aborted"
            LOG.info("did not publish %s: %s", self.digest, exc)
        except Exception as exc:
            self.result = "failed"
            store.report_failure(exc)
            LOG.warning("S3 upload of %s failed, the blob stays uncached: %s", self.digest, exc)
        finally:  # also when the deadline passes: a pipe closed unfinished aborts the upload
            pump.kill()
            pipe.close()

    def _pump(self, pipe: Pipe) -> None:
        """Move the spooled blob into the pipe, in order, as fast as the upload reads it (the
        upload hashes what comes out of the pipe: a short or wrong spool is never published)."""
        position, turns = 0, Turns()
        try:
            while pipe.open and position < self.size:
                count = min(CHUNK, self.size - position)
                # splice(2): the spool's pages go to the pipe without a copy through Python.
                moved = pipe.splice(self.spool.fileno(), position, count)
                if moved != count and pipe.open:
                    raise SpoolError(f"the spool ends at {position + moved} of {self.size} bytes")
                position += count
                turns.give()
            pipe.finish()
        except OSError as exc:  # SpoolError too
            LOG.error("cannot read the spool of %s for S3: %s", self.digest, exc)
            pipe.abort(str(exc))

    def _leave_host(self, spool_path: str | None) -> None:
        """The fill is over (or never began): another worker of the host may fill it again."""
        if self._owner.host is not None and self._shared_path is not None:
            self._owner.host.release(self.digest, spool_path)
            self._shared_path = None

    def _share(self, state: str, reason: str | None = None) -> None:
        """Tell the host's other workers how far the fill got (host.py)."""
        host = self._owner.host
        if host is None or self._shared_path is None or self.spool is None:
            return
        try:
            host.publish(
                self.digest,
                FillState(
                    spool=os.path.basename(self._shared_path),
                    size=self.size,
                    headers=tuple(self.headers),
                    state=state,
                    reason=reason,
                    canonical=str(self.canonical) if self.canonical else None,
                ),
            )
        except OSError as exc:  # their clients then see the fill stop: a short read
            LOG.warning("cannot share the state of the fill of %s: %s", self.digest, exc)

    def _notify(self) -> None:
        progress, self.progress = self.progress, Event()
        progress.set()

    def close_if_unused(self) -> None:
        """Close the spool once the fill is over and no reader is left."""
        if self.done.is_set() and self._readers == 0 and self.spool is not None:
            self.spool.close()


def _spool_and_hash(spool: Spool, hashers: list, chunk: bytes) -> SpoolError | None:
    """Append chunk to the spool and to each hash (in gevent's threadpool). A failed write is
    returned, not raised: the threadpool would log a raised one as a traceback."""
    try:
        spool.append(chunk)
    except SpoolError as exc:
        return exc
    for hasher in hashers:
        hasher.update(chunk)
    return None


def _raise_failed_write(writing) -> None:
    """Wait for a _spool_and_hash in the threadpool; raise the SpoolError it returned."""
    error = writing.get()
    if error is not None:
        raise error


class Fills:
    """The fills of one worker: at most one per digest, BLOBLO_MAX_FILLS downloading and as
    many uploading at once."""

    def __init__(self, settings: Settings, store: BlobStore, host: HostFills | None = None):
        self.store = store
        self.host = host  # shares fills with the host's other workers; None: this worker only
        self.spool_dir = settings.spool_directory
        self.budget = SpoolBudget(settings.spool_max_bytes)
        self.deadline = settings.fill_deadline_seconds
        self._max = settings.max_fills
        self._running: dict[str, Fill] = {}
        # Digests whose download runs: BLOBLO_MAX_FILLS bounds these, and the uploads (their
        # memory) apart. A downloaded fill waiting for its upload (the hold) takes no place:
        # under load, held fills used to take every place for BLOBLO_UPLOAD_HOLD_SECONDS, and
        # new blobs, a herd's too, passed through uncached (issue #14).
        self._downloading: set[str] = set()
        self.uploads = BoundedSemaphore(max(self._max, 1))
        self._shared: dict[str, SharedFill] = {}  # other workers' fills this one follows
        self.hold = UploadHold(settings.upload_hold_seconds, host)

    def running(self, digest: Digest) -> Fill | SharedFill | None:
        """The fill of digest under way in this worker or, failing that, in another worker of
        the host; None when none runs."""
        key = str(digest)
        fill = self._running.get(key) or self._shared.get(key)
        if fill is not None and not fill.broken:
            return fill
        if self.host is not None and self.host.filled_elsewhere(digest):
            return SharedFill(digest, self.host, self._follow_shared, self._forget_shared)
        return None

    def _follow_shared(self, fill: SharedFill) -> None:
        self._shared[str(fill.digest)] = fill

    def _forget_shared(self, fill: SharedFill) -> None:
        if self._shared.get(str(fill.digest)) is fill:
            del self._shared[str(fill.digest)]

    def reserve(self, digest: Digest, canonical: Digest | None = None) -> Fill | None:
        """A new fill for digest (verified against canonical too, when given), reserved before
        its upstream GET is sent so that concurrent clients join it; None when one runs
        already or BLOBLO_MAX_FILLS are downloading."""
        key = str(digest)
        if key in self._running or len(self._downloading) >= self._max:
            return None
        claim = None
        if self.host is not None:
            claim = self.host.claim(digest)
            if claim is None:  # another worker of the host has just started it
                return None
        fill = Fill(digest, self, claim.spool_path if claim else None, canonical)
        fill.after_verified = claim is not None and claim.after_verified
        self._running[key] = fill
        self._downloading.add(key)
        return fill

    def downloaded(self, fill: Fill) -> None:
        """fill's download is over (verified or not): it no longer counts against
        BLOBLO_MAX_FILLS."""
        if self._running.get(str(fill.digest)) is fill:
            self._downloading.discard(str(fill.digest))

    def forget(self, fill: Fill) -> None:
        """fill takes no more clients (it ended, or never started)."""
        if self._running.get(str(fill.digest)) is fill:
            del self._running[str(fill.digest)]
            self._downloading.discard(str(fill.digest))

    def in_progress(self) -> int:
        """How many fills this worker runs now."""
        return len(self._running)

    def drain(self, timeout: float) -> int:
        """Wait up to timeout seconds for the fills under way (their held uploads go at once);
        return how many are left. Then the host's files of this worker's fills are tidied."""
        self.hold.drain()
        fills = list(self._running.values())
        if fills:
            LOG.info("waiting up to %gs for %d fills", timeout, len(fills))
            gevent.joinall([gevent.spawn(fill.done.wait) for fill in fills], timeout=timeout)
        if self.host is not None:
            self.host.close()
        return self.in_progress()


SKIPS_LOGGED = 1024  # digests whose skipped fill a worker remembers having logged
_skips_logged: LRUCache = LRUCache(SKIPS_LOGGED)  # (reason, digest) -> True


def _skipped(digest: Digest, reason: str, why: str) -> None:
    """A blob that could not be spooled is streamed uncached: count it by reason, and warn the
    first time this worker meets the digest for that reason (a pull retries, clients repeat)."""
    metrics.FILLS_SKIPPED.labels(reason).inc()
    key = (reason, str(digest))
    if _skips_logged.get(key):  # (a get counts as a use: the least recently met go first)
        return
    _skips_logged[key] = True
    LOG.warning("%s is streamed uncached, not spooled: %s", digest, why)
