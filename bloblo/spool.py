"""Spool files: a blob's bytes on local disk, written once by its fill and read by many.

Each spool is an unlinked temporary file in BLOBLO_SPOOL_DIR; the disk it may take is reserved
from a per-worker budget (BLOBLO_SPOOL_MAX_MB) before the first byte is written and given back
when the last reader closes it (issue #7). Every write and read moves every byte or raises: a
short write on a full disk or past a file-size limit never leaves a gap that reads back as
zeros.
"""

from __future__ import annotations

import os
import tempfile

from . import metrics
from .spooldir import create_private


class SpoolError(OSError):
    """A spool write or read that could not move every byte."""


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


class Spool:
    """One blob's bytes on disk, appended in order and read from anywhere already written.

    Raises SpoolError on any write or read that does not complete, OSError when the file cannot
    be created. close() frees the file and the budget; it is safe to call more than once.
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
    directory), or None when the budget has no room for it.

    Raises SpoolError when the file cannot be created (a missing or read-only directory).
    """
    if not budget.reserve(size):
        return None
    try:
        return Spool(directory, size, budget, path)
    except OSError as exc:
        budget.release(size)
        raise SpoolError(exc.errno, f"cannot create a spool file in {directory}: {exc}") from None
