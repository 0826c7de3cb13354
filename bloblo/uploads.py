"""Background uploads of blobs to S3, fed through a pipe, one per digest per worker.

The tee writes into a kernel pipe; a greenlet reads it and hands it to boto3's upload_fileobj.
Both ends are non-blocking and wait through gevent's hub, so neither stalls the worker.

Stall policy: the client is never held back by S3 for more than `stall_seconds` at a time. A
write that cannot enter the pipe for that long abandons the upload (nothing is published) and
the client's stream goes on. An S3 that is slow but moving paces the client to its speed, with
the pipe (1 MiB) and boto3's in-memory parts (a few multipart parts) as the buffer in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

import gevent
from gevent.os import make_nonblocking, nb_read, nb_write

from .names import Digest

LOG = logging.getLogger(__name__)

PIPE_CAPACITY = 1024 * 1024
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the module only from Python 3.10 on Linux


class UploadAborted(Exception):
    """The blob did not arrive whole and verified: the upload must not publish it."""


class Pipe:
    """A one-way pipe from the tee to an upload, cooperative under gevent.

    The reader side is file-like for boto3: read(n) returns n bytes or ends at EOF, and raises
    UploadAborted at EOF unless the writer called finish(). Raising from read() makes s3transfer
    abort a multipart upload, and before a single PUT means the PUT never happens.
    """

    def __init__(self, stall_seconds: float):
        self._read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError):  # else the default 64 KiB, where pipes are capped lower
            fcntl.fcntl(self._write_fd, _F_SETPIPE_SZ, PIPE_CAPACITY)
        make_nonblocking(self._read_fd)
        make_nonblocking(self._write_fd)
        self._stall_seconds = stall_seconds
        self._finished = False
        self.abort_reason: str | None = None

    # writer side (the tee)
    def write(self, chunk: bytes) -> None:
        """Copy chunk into the pipe; abandon the upload if the reader stalls or is gone."""
        if self._write_fd < 0:
            return
        view = memoryview(chunk)
        try:
            with gevent.Timeout(self._stall_seconds):
                while view:
                    view = view[nb_write(self._write_fd, view) :]
        except gevent.Timeout:
            self.abort(f"the S3 upload stalled for {self._stall_seconds:g}s")
        except OSError:  # EPIPE: the upload ended early and closed its end
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


class Uploads:
    """Starts background uploads: at most one per digest and max_uploads at once, per worker."""

    def __init__(self, store, max_uploads: int, stall_seconds: float):
        self._store = store
        self._max = max_uploads
        self._stall_seconds = stall_seconds
        self._in_flight: dict[str, gevent.Greenlet] = {}

    def start(self, digest: Digest, size: int | None) -> Pipe | None:
        """A pipe to feed digest's bytes into, or None when this blob is not to be uploaded now.

        None when an upload of this digest is already running, the cap is reached, or storage
        is unavailable: the caller then just streams the blob.
        """
        key = str(digest)
        if key in self._in_flight or len(self._in_flight) >= self._max:
            return None
        if not self._store.available():
            return None
        pipe = Pipe(self._stall_seconds)
        self._in_flight[key] = gevent.spawn(self._run, digest, size, pipe)
        return pipe

    def in_flight(self) -> int:
        """How many uploads this worker runs now."""
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
