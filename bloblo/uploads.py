"""The S3 side of a fill: a kernel pipe into boto3's upload_fileobj, and the reader that checks
the bytes S3 receives against the blob's digest.

The fill splices its spool into the pipe; boto3 reads the other end in a background greenlet. Both
ends are non-blocking and wait through gevent's hub, so neither stalls the worker. The digest
is checked where the bytes leave for S3 (VerifiedReader), not on a copy of them: whatever went
wrong before (a short spool, an upstream that lied), S3 completes the upload only when what it
received is the blob (issue #7).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from gevent.os import make_nonblocking, nb_read
from gevent.socket import wait_write

from .names import Digest

LOG = logging.getLogger(__name__)

PIPE_CAPACITY = 1024 * 1024


class UploadAborted(Exception):
    """The blob did not arrive whole and verified: the upload must not publish it."""


class Pipe:
    """A one-way kernel pipe from a fill to an upload, cooperative under gevent.

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

    # writer side (the fill)
    @property
    def open(self) -> bool:
        """Whether the writer side still takes bytes."""
        return self._write_fd >= 0

    def splice(self, source_fd: int, offset: int, count: int) -> int:
        """Move count bytes of the file source_fd from offset into the pipe without copying
        them through Python (splice(2), Linux), waiting cooperatively for room. Returns the
        bytes moved: fewer than count only if the file ends first or the upload went away.
        Raises OSError when the file cannot be read."""
        moved = 0
        try:
            while moved < count and self.open:
                try:
                    n = os.splice(
                        source_fd,
                        self._write_fd,
                        count - moved,
                        offset_src=offset + moved,
                        flags=os.SPLICE_F_NONBLOCK,
                    )
                except BlockingIOError:
                    wait_write(self._write_fd)
                    continue
                if n == 0:
                    break
                moved += n
        except BrokenPipeError:
            self.abort("the S3 upload ended early")
        return moved

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


class VerifiedReader:
    """What upload_fileobj reads: the pipe's bytes, hashed as they leave for S3.

    read() raises UploadAborted at the end unless exactly size bytes hashing to digest went
    through it: s3transfer then aborts the multipart upload, or never sends the single PUT.
    """

    def __init__(self, pipe: Pipe, digest: Digest, size: int):
        self._pipe = pipe
        self._digest = digest
        self._size = size
        self._hasher = digest.hasher()
        self._received = 0

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all when size < 0), fewer only at the verified end of the blob."""
        data = self._pipe.read(size)
        self._hasher.update(data)
        self._received += len(data)
        if size is None or size < 0 or len(data) < size:
            self._check()
        return data

    def _check(self) -> None:
        if self._received != self._size:
            raise UploadAborted(f"S3 would receive {self._received} bytes of {self._size}")
        if self._hasher.hexdigest() != self._digest.hex:
            raise UploadAborted(f"S3 would receive bytes hashing to {self._hasher.hexdigest()}")
