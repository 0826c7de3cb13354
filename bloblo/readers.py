"""Reading a fill while it runs: the response body of every client a fill serves (issue #7).

A fill in this worker (fills.Fill) and one in another worker of the host
(followers.SharedFill) offer the same interface, FillView: the readers cannot tell them apart.
When the fill ends broken under a reader (a failed spool write, a killed filling worker, an
upstream cut off, nothing moving for STALL_SECONDS), the reader continues from the upstream with
a Range request for what its client still lacks (issue #13, part 3); only a fill whose bytes
were wrong is not resumed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from gevent.event import Event

from . import metrics
from .errors import AbortResponse
from .loop import Turns
from .names import Digest

LOG = logging.getLogger(__name__)

CHUNK = 1024 * 1024
TAIL = 64 * 1024  # a whole-blob response holds back this much until the blob is verified
# A reader that sees neither a new byte nor the fill's end for this long stops waiting for it:
# no wait on another greenlet or worker is unbounded (issue #13, part 2).
STALL_SECONDS = 60.0

# resume(start, stop): bytes [start, stop) of the blob from the upstream, for this client;
# raises AbortResponse when the upstream does not answer with exactly them.
Resume = Callable[[int, int], Iterator[bytes]]


class FillView(Protocol):
    """What a reader sees of a fill."""

    digest: Digest
    size: int  # the blob's bytes
    written: int  # bytes of the blob in the spool so far
    verified: bool  # every byte is there and hashes to the digest
    broken: str | None  # why the fill failed, or None
    refuted: bool  # it failed because the upstream's bytes do not hash to the digest
    progress: Event  # set (and replaced) whenever written, verified or broken move
    readable: bool  # its spool is open: a reader that attaches now keeps it so

    def attach(self) -> None:
        """One more reader: the spool stays open until it detaches."""

    def detach(self) -> None:
        """A reader is done with the spool."""

    def read_spool(self, position: int, count: int) -> bytes:
        """count bytes from position (written already); raises AbortResponse if it cannot."""


class _FillEnded(Exception):
    """The fill will not bring the reader's next byte."""


class FillReader:
    """Bytes [start, stop) of a fill's blob, as the fill writes them: a WSGI response body.

    With hold_tail the blob's last TAIL bytes (those of them in the range) wait until the blob
    is verified: by the fill, or, when the rest came from the upstream through resume, by this
    reader hashing the whole blob (the spool's bytes it had, then the upstream's). Iterating
    raises AbortResponse (the client sees a short read) when neither the fill nor resume
    brings the bytes, or they are wrong. close() (the WSGI server calls it, also when the body
    never started) lets the fill free its spool.
    """

    def __init__(
        self,
        fill: FillView,
        start: int,
        stop: int,
        hold_tail: bool,
        resume: Resume | None = None,
    ):
        self._fill = fill
        self._start, self._stop, self._hold_tail = start, stop, hold_tail
        self._resume = resume
        self._position = start
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        fill.attach()

    def __iter__(self) -> Iterator[bytes]:
        fill = self._fill
        try:
            yield from self._from_fill()
        except _FillEnded as ended:
            if self._resume is None or fill.refuted:
                raise AbortResponse(f"the fill of {fill.digest} broke: {ended}") from None
            LOG.warning(
                "the fill of %s broke (%s): its client continues from the upstream at byte %d",
                fill.digest,
                ended,
                self._position,
            )
            yield from self._from_upstream()

    def _from_fill(self) -> Iterator[bytes]:
        fill, turns = self._fill, Turns()
        while self._position < self._stop:
            progress = fill.progress
            ready = fill.written
            if self._hold_tail and not fill.verified:
                ready = min(ready, fill.size - TAIL)
            if self._position < ready:
                count = min(CHUNK, ready - self._position, self._stop - self._position)
                yield fill.read_spool(self._position, count)
                metrics.BLOB_BYTES.labels("spool").inc(count)
                self._position += count
                turns.give()
            elif fill.broken:
                raise _FillEnded(fill.broken)
            else:
                self._wait(progress)
        while self._hold_tail and not (fill.verified or fill.broken):  # the tail, or no bytes
            self._wait(fill.progress)
        if self._hold_tail and not fill.verified:
            raise _FillEnded(fill.broken)

    def _wait(self, progress: Event) -> None:
        if not progress.wait(STALL_SECONDS):
            raise _FillEnded(
                f"it has not moved for {STALL_SECONDS:g} s at {self._fill.written} of "
                f"{self._fill.size} bytes"
            )

    def _from_upstream(self) -> Iterator[bytes]:
        """The rest of the range from the upstream. With hold_tail the whole blob is hashed:
        what the spool holds (at most up to the reader's position), then the upstream's bytes
        from there, of which only those from the reader's position on are sent; the last
        TAIL bytes go only if the blob hashes to its digest."""
        fill, turns = self._fill, Turns()
        hasher, ask_from = None, self._position
        if self._hold_tail:
            hasher, ask_from = fill.digest.hasher(), min(self._position, fill.written)
            for offset in range(0, ask_from, CHUNK):
                hasher.update(fill.read_spool(offset, min(CHUNK, ask_from - offset)))
                turns.give()
        rest = self._resume(ask_from, self._stop) if ask_from < self._stop else iter(())
        skip, held, received = self._position - ask_from, bytearray(), 0
        for chunk in rest:
            received += len(chunk)
            if received > self._stop - ask_from:
                raise AbortResponse(f"the upstream sent more of {fill.digest} than asked")
            if hasher is None:
                yield chunk
                continue
            hasher.update(chunk)
            if skip:  # bytes the client had from a range's start: hashed, not sent
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            held += chunk
            if len(held) > TAIL:
                out = bytes(held[:-TAIL])
                del held[:-TAIL]
                yield out
        if received != self._stop - ask_from:
            raise AbortResponse(f"the upstream sent {received} of the rest of {fill.digest}")
        if hasher is not None and hasher.hexdigest() != fill.digest.hex:
            raise AbortResponse(f"the upstream's rest of {fill.digest} makes a wrong blob")
        if held:
            yield bytes(held)

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
