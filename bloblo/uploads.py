"""Background uploads of blobs to S3, fed through a pipe, one per digest per worker.

The tee writes each chunk into a Feed. While the upload keeps up, the chunk goes straight into a
kernel pipe, whose other end boto3's upload_fileobj reads in a background greenlet. Both ends are
non-blocking and wait through gevent's hub, so neither stalls the worker.

Stall policy: S3 does not slow a client down. When the pipe is full (S3 takes bytes more slowly
than the client does), the Feed spills what the pipe cannot take into a spool file on disk (an
unlinked temporary file, in the page cache while memory allows) and a pump greenlet moves it on
into the pipe, oldest first, as fast as the upload reads. Only when an upload has fallen
`buffer_bytes` behind its client does the client wait, for at most `stall_seconds`; then the
upload is dropped (nothing is published) and the client's stream goes on. Why disk and not
memory: a worker serves many clients at once, and holding back even a few hundred MiB per slow
upload in memory would multiply by the uploads in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile

import gevent
from gevent.event import Event
from gevent.os import make_nonblocking, nb_read, nb_write

from .names import Digest

LOG = logging.getLogger(__name__)

PIPE_CAPACITY = 1024 * 1024


class UploadAborted(Exception):
    """The blob did not arrive whole and verified: the upload must not publish it."""


class Pipe:
    """A one-way kernel pipe from the Feed to an upload, cooperative under gevent.

    The reader side is file-like for boto3: read(n) returns n bytes or ends at EOF, and raises
    UploadAborted at EOF unless the writer called finish(). Raising from read() makes s3transfer
    abort a multipart upload, and before a single PUT means the PUT never happens.
    """

    def __init__(self):
        self._read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError):  # else the default 64 KiB, where pipes are capped lower
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, PIPE_CAPACITY)
        make_nonblocking(self._read_fd)
        make_nonblocking(self._write_fd)
        self._finished = False
        self.abort_reason: str | None = None

    # writer side (the Feed)
    @property
    def open(self) -> bool:
        """Whether the writer side still takes bytes."""
        return self._write_fd >= 0

    def write_nowait(self, data: memoryview) -> int:
        """Put as much of data into the pipe as fits now; return how much did."""
        try:
            return os.write(self._write_fd, data) if self.open else len(data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: the upload ended early and closed its end
            self.abort("the S3 upload ended early")
            return len(data)

    def write(self, data: memoryview) -> None:
        """Put all of data into the pipe, waiting (cooperatively) for the upload to read."""
        try:
            while data and self.open:
                data = data[nb_write(self._write_fd, data) :]
        except OSError:
            self.abort("the S3 upload ended early")

    def finish(self) -> None:
        """The blob is complete and verified: let the upload publish it."""
        self._finished = True
        self._close_writer()

    def abort(self, reason: str) -> None:
        """The blob must not be published: the upload's next read raises UploadAborted."""
        if not self._finished and self.abort_reason is None:
            self.abort_reason = reason
        self._close_writer()

    def _close_writer(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1

    # reader side (boto3)
    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all when size < 0), fewer only at the end of the blob."""
        parts, wanted = [], size if size is not None and size >= 0 else float("inf")
        got = 0
        while got < wanted:
            self._raise_if_aborted()
            data = nb_read(self._read_fd, int(min(wanted - got, PIPE_CAPACITY)))
            if not data:
                self._raise_if_aborted()
                if not self._finished:
                    raise UploadAborted("the stream ended without being verified")
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _raise_if_aborted(self) -> None:
        if self.abort_reason is not None:
            raise UploadAborted(self.abort_reason)

    def close(self) -> None:
        """Close the reader side (the upload is over); a writer still there gets EPIPE."""
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1


class Feed:
    """What the tee writes one blob into: the upload's pipe, with a spool file in front of it
    for what the upload has not taken yet (see the stall policy above)."""

    def __init__(self, pipe: Pipe, buffer_bytes: int, stall_seconds: float):
        self._pipe = pipe
        self._buffer_bytes = buffer_bytes
        self._stall_seconds = stall_seconds
        self._spool = None  # created on the first chunk the pipe cannot take at once
        self._spooled = 0  # bytes written to the spool
        self._pumped = 0  # bytes moved on from the spool into the pipe
        self._pump = None
        self._wake_pump = Event()
        self._room = Event()
        self._finishing = False

    def write(self, chunk: bytes) -> None:
        """Pass chunk on to the upload; waits only when the upload is far behind (see above)."""
        view = memoryview(chunk)
        if self._pumped == self._spooled:  # nothing waits in the spool: order allows the pipe
            view = view[self._pipe.write_nowait(view) :]
        if view and self._pipe.open:
            self._spill(view)

    def _spill(self, view: memoryview) -> None:
        while self._spooled - self._pumped + len(view) > self._buffer_bytes:
            self._room.clear()
            if not self._room.wait(self._stall_seconds):
                self.abort(f"the S3 upload fell behind and stalled for {self._stall_seconds:g}s")
                return
        try:
            if self._spool is None:
                # Lives as long as the feed: closed by the pump when drained, or by abort().
                self._spool = tempfile.TemporaryFile(prefix="bloblo-spool-")  # noqa: SIM115
                self._pump = gevent.spawn(self._drain)
            os.pwrite(self._spool.fileno(), view, self._spooled)
        except OSError as exc:  # a full disk costs the cache entry, never the client's blob
            LOG.warning("cannot spool for an S3 upload (%s): check TMPDIR's free space", exc)
            self.abort(f"could not spool: {exc}")
            return
        self._spooled += len(view)
        self._wake_pump.set()

    def _drain(self) -> None:
        """Move spooled bytes into the pipe, oldest first, as fast as the upload reads them."""
        while self._pipe.open:
            if self._pumped < self._spooled:
                size = min(PIPE_CAPACITY, self._spooled - self._pumped)
                data = os.pread(self._spool.fileno(), size, self._pumped)
                self._pipe.write(memoryview(data))
                self._pumped += len(data)
                self._room.set()
            elif self._finishing:
                self._pipe.finish()
            else:
                self._wake_pump.clear()
                self._wake_pump.wait()
        self._close_spool()

    def finish(self) -> None:
        """The blob is complete and verified: publish it once the upload has it all."""
        if self._pump is None:
            self._pipe.finish()
        else:
            self._finishing = True
            self._wake_pump.set()

    def abort(self, reason: str) -> None:
        """The blob must not be published."""
        if self._pump is not None:
            self._pump.kill()  # before the pipe closes under its wait
        self._pipe.abort(reason)
        self._close_spool()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()


class Uploads:
    """Starts background uploads: at most one per digest and max_uploads at once, per worker."""

    def __init__(self, store, max_uploads: int, buffer_bytes: int, stall_seconds: float):
        self._store = store
        self._max = max_uploads
        self._buffer_bytes = buffer_bytes
        self._stall_seconds = stall_seconds
        self._in_flight: dict[str, gevent.Greenlet] = {}

    def start(self, digest: Digest, size: int | None) -> Feed | None:
        """A feed for digest's bytes, or None when this blob is not to be uploaded now.

        None when an upload of this digest is already running, the cap is reached, or storage
        is unavailable: the caller then just streams the blob.
        """
        key = str(digest)
        if key in self._in_flight or len(self._in_flight) >= self._max:
            return None
        if not self._store.available():
            return None
        pipe = Pipe()
        self._in_flight[key] = gevent.spawn(self._run, digest, size, pipe)
        return Feed(pipe, self._buffer_bytes, self._stall_seconds)

    def in_flight(self) -> int:
        """How many uploads this worker runs now."""
        return len(self._in_flight)

    def drain(self, timeout: float) -> int:
        """Wait up to timeout seconds for the uploads in flight; return how many are left."""
        if self._in_flight:
            LOG.info("waiting up to %gs for %d S3 uploads", timeout, len(self._in_flight))
            gevent.joinall(list(self._in_flight.values()), timeout=timeout)
        return len(self._in_flight)

    def _run(self, digest: Digest, size: int | None, pipe: Pipe) -> None:
        try:
            self._store.upload(pipe, digest, size)
            LOG.info("published %s to S3", digest)
        except UploadAborted as exc:
            LOG.info("did not publish %s: %s", digest, exc)
        except Exception as exc:
            self._store.report_failure(exc)
            LOG.warning("S3 upload of %s failed, the blob stays uncached: %s", digest, exc)
        finally:
            pipe.close()
            self._in_flight.pop(str(digest), None)
