"""Spool files: a blob's bytes on local disk, written once by its fill and read by many.

Each spool is a file in BLOBLO_SPOOL_DIR; the disk it may take is taken from a per-worker budget
(BLOBLO_SPOOL_MAX_MB) and reserved on the filesystem before the first byte is written, and both
are given back when the last reader closes it (issues #7, #13 §3). Every write and read moves
every byte or raises: a short write on a full disk or past a file-size limit never leaves a gap
that reads back as zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import tempfile

from . import metrics
from .spooldir import create_private

LOG = logging.getLogger(__name__)

MIB = 1024 * 1024
FALLOC_FL_KEEP_SIZE = 1  # <linux/falloc.h>: allocate blocks, leave the file's size as it is
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # the blob cannot be spooled
# The filesystem (or the C library) cannot reserve space: spools are written unreserved.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class SpoolError(OSError):
    """A spool write or read that could not move every byte."""


class SpoolDiskFull(SpoolError):
    """The filesystem of the spool directory has no room for the blob (ENOSPC, a quota, or a
    file larger than it takes)."""


class SpoolBudget:
    """The disk one worker's spools may take, in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0

    def reserve(self, size: int) -> bool:
        """Take size bytes of the budget; False (nothing taken) when that is more than is left."""
        if self.used + size > self.max_bytes:
            return False
        self.used += size
        metrics.SPOOL_BYTES.inc(size)
        return True

    def release(self, size: int) -> None:
        """Give size bytes back."""
        self.used -= size
        metrics.SPOOL_BYTES.dec(size)

    def shortfall(self, size: int) -> str:
        """Why size bytes do not fit (reserve() said False), naming the setting that makes room."""
        limit = f"BLOBLO_SPOOL_MAX_MB ({self.max_bytes // MIB} MiB per worker)"
        if size > self.max_bytes:
            return f"its {size} bytes are more than {limit}; raise it to cache blobs this large"
        return (
            f"its {size} bytes are more than the fills under way leave of {limit} "
            f"({self.max_bytes - self.used} bytes); raise it to cache blobs this large alongside"
            " others"
        )


class Spool:
    """One blob's bytes on disk, appended in order and read from anywhere already written.

    Raises SpoolError on any write or read that does not complete, OSError when the file cannot
    be created or its disk reserved (then no file is left). close() frees the file and the
    budget; it is safe to call more than once.
    """

    def __init__(
        self, directory: str | None, size: int, budget: SpoolBudget, path: str | None = None
    ):
        self.size = size
        self.written = 0
        self._budget = budget
        if path is None:  # unlinked from the start: a killed worker leaves nothing behind
            self._file = tempfile.TemporaryFile(dir=directory, prefix="bloblo-fill-")  # noqa: SIM115
        else:  # named, for the other workers of the host (host.py); a new file, never reused
            self._file = open(create_private(path), "r+b")  # noqa: SIM115
        self._fd = self._file.fileno()
        try:
            _reserve(self._fd, size, directory if path is None else os.path.dirname(path))
        except OSError:
            self._file.close()
            if path is not None:
                with contextlib.suppress(OSError):  # the reason to report is the first one
                    os.unlink(path)
            raise

    def append(self, data: bytes | memoryview) -> None:
        """Write data after what is already there."""
        view = memoryview(data)
        try:
            while view:
                count = os.pwrite(self._fd, view, self.written)
                if count <= 0:
                    raise SpoolError(f"spool write moved no bytes at offset {self.written}")
                view = view[count:]
                self.written += count
        except SpoolError:
            raise
        except OSError as exc:  # ENOSPC, EFBIG (past RLIMIT_FSIZE), EIO
            raise SpoolError(exc.errno, f"spool write failed at {self.written}: {exc}") from None

    def read(self, offset: int, size: int) -> bytes:
        """size bytes from offset; they must have been written already."""
        if offset + size > self.written:
            raise SpoolError(f"read of {offset}+{size} past the {self.written} bytes written")
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as exc:
            raise SpoolError(exc.errno, f"spool read failed at {offset}: {exc}") from None
        if len(data) != size:
            raise SpoolError(f"spool read {len(data)} of {size} bytes at {offset}")
        return data

    @property
    def closed(self) -> bool:
        """Whether close() freed the file."""
        return self._fd < 0

    def fileno(self) -> int:
        """The spool file's descriptor (for splice(2)); valid until close()."""
        return self._fd

    def close(self) -> None:
        """Free the file and give its budget back."""
        if self._fd >= 0:
            self._file.close()
            self._fd = -1
            self._budget.release(self.size)


def open_spool(
    directory: str | None, size: int, budget: SpoolBudget, path: str | None = None
) -> Spool | None:
    """A spool for a blob of size bytes (a new file at path, else an unnamed one in
    directory), its disk reserved, or None when the budget has no room for it.

    The file's blocks are reserved without changing its size (the host's other workers read
    how far a fill got from it), so that every byte of the blob can be written however full the
    disk gets meanwhile (issue #13 §3). On a filesystem that cannot reserve space the spool is
    written unreserved (logged once per directory at INFO).

    Raises SpoolDiskFull when the filesystem has no room for size bytes, SpoolError when the
    file cannot be created (a missing or read-only directory); either way no file is left and
    the budget is given back.
    """
    if not budget.reserve(size):
        return None
    try:
        return Spool(directory, size, budget, path)
    except OSError as exc:
        budget.release(size)
        if exc.errno in NO_ROOM:
            where = directory or tempfile.gettempdir()
            raise SpoolDiskFull(
                exc.errno, f"no room for {size} bytes on the disk of {where} ({exc.strerror})"
            ) from None
        raise SpoolError(exc.errno, f"cannot create a spool file in {directory}: {exc}") from None


_UNRESERVED_LOGGED: set[str | None] = set()  # directories whose filesystem cannot reserve


def _reserve(fd: int, size: int, directory: str | None) -> None:
    """Reserve size bytes of disk for fd, or nothing where the filesystem cannot; raises
    OSError (ENOSPC, ...) when it can but has no room."""
    if size <= 0:
        return
    try:
        _reserve_disk(fd, size)
    except OSError as exc:
        if exc.errno not in UNSUPPORTED:
            raise
        if directory not in _UNRESERVED_LOGGED:
            _UNRESERVED_LOGGED.add(directory)
            LOG.info(
                "spools in %s are not reserved on disk (fallocate: %s): a disk that fills up "
                "breaks the fills under way",
                directory or tempfile.gettempdir(),
                exc.strerror,
            )


def _reserve_disk(fd: int, size: int) -> None:
    """fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size): Linux allocates the blocks, st_size stays.
    (os.posix_fallocate would set the size, and the C library's emulation writes zeros.)"""
    if _FALLOCATE is None:
        raise OSError(errno.ENOSYS, "fallocate is not in this C library")
    while _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def _load_fallocate():
    """The C library's fallocate with 64-bit offsets (glibc's fallocate64, musl's fallocate),
    or None outside Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _load_fallocate()
