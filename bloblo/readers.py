"""Reading a fill while it runs: the response body of every client a fill serves (issue #7).

A fill in this worker (fills.Fill) and one in another worker of the host (host.SharedFill) offer
the same interface, FillView: the readers cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from gevent.event import Event

from . import metrics
from .errors import AbortResponse
from .loop import Turns
from .names import Digest

CHUNK = 1024 * 1024
TAIL = 64 * 1024  # a whole-blob response holds back this much until the blob is verified
# A reader that sees neither a new byte nor the fill's end for this long ends its response
# short: no wait on another greenlet or worker is unbounded (issue #13, part 2).
STALL_SECONDS = 60.0


class FillView(Protocol):
    """What a reader sees of a fill."""

    digest: Digest
    size: int  # the blob's bytes
    written: int  # bytes of the blob in the spool so far
    verified: bool  # every byte is there and hashes to the digest
    broken: str | None  # why the fill failed, or None
    progress: Event  # set (and replaced) whenever written, verified or broken move

    def attach(self) -> None:
        """One more reader: the spool stays open until it detaches."""

    def detach(self) -> None:
        """A reader is done with the spool."""

    def read_spool(self, position: int, count: int) -> bytes:
        """count bytes from position (written already); raises AbortResponse if it cannot."""


class FillReader:
    """Bytes [start, stop) of a fill's blob, as the fill writes them: a WSGI response body.

    With hold_tail the blob's last TAIL bytes (those of them in the range) wait until the blob
    is verified. Iterating raises AbortResponse (the client sees a short read) when the
    download breaks before the bytes arrive, or nothing moves for STALL_SECONDS. close() (the
    WSGI server calls it, also when the body never started) lets the fill free its spool.
    """

    def __init__(self, fill: FillView, start: int, stop: int, hold_tail: bool):
        self._fill = fill
        self._start, self._stop, self._hold_tail = start, stop, hold_tail
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        fill.attach()

    def __iter__(self) -> Iterator[bytes]:
        fill, turns, position = self._fill, Turns(), self._start
        while position < self._stop:
            progress = fill.progress
            ready = fill.written
            if self._hold_tail and not fill.verified:
                ready = min(ready, fill.size - TAIL)
            if position < ready:
                count = min(CHUNK, ready - position, self._stop - position)
                yield fill.read_spool(position, count)
                metrics.BLOB_BYTES.labels("spool").inc(count)
                position += count
                turns.give()
            elif fill.broken:
                raise AbortResponse(f"the fill of {fill.digest} broke: {fill.broken}")
            else:
                self._wait(progress)
        while self._hold_tail and not (fill.verified or fill.broken):  # the tail, or no bytes
            self._wait(fill.progress)
        if self._hold_tail and not fill.verified:
            raise AbortResponse(f"the fill of {fill.digest} broke: {fill.broken}")

    def _wait(self, progress: Event) -> None:
        if not progress.wait(STALL_SECONDS):
            raise AbortResponse(
                f"the fill of {self._fill.digest} has not moved for {STALL_SECONDS:g} s: "
                f"{self._fill.written} of {self._fill.size} bytes"
            )

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call callback once, when the reader is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Done reading (safe to call more than once)."""
        if not self._closed:
            self._closed = True
            self._fill.detach()
            for callback in self._on_close:
                callback()
