"""Reading a fill while it runs: the response body of every client a fill serves (issue #7).

A fill, in this worker or in another worker of the host (host.SharedFill), offers what a reader
needs: `digest`, `size`, `spool.written` (bytes there so far), `verified`, `broken` (why it
failed, or None), `progress` (an Event set and replaced whenever any of those move), `readers`
(a count the reader keeps), read_spool(position, count) and close_if_unused().
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from . import metrics
from .errors import AbortResponse
from .loop import Turns

CHUNK = 1024 * 1024
TAIL = 64 * 1024  # a whole-blob response holds back this much until the blob is verified


class FillReader:
    """Bytes [start, stop) of a fill's blob, as the fill writes them: a WSGI response body.

    With hold_tail the last TAIL bytes wait until the blob is verified. Iterating raises
    AbortResponse (the client sees a short read) when the download breaks before the bytes
    arrive. close() (the WSGI server calls it, also when the body never started) lets the fill
    free its spool.
    """

    def __init__(self, fill, start: int, stop: int, hold_tail: bool):
        self._fill = fill
        self._start, self._stop, self._hold_tail = start, stop, hold_tail
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        fill.readers += 1

    def __iter__(self) -> Iterator[bytes]:
        fill, turns, position = self._fill, Turns(), self._start
        while position < self._stop:
            progress = fill.progress
            ready = fill.spool.written
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
                progress.wait()
        while self._hold_tail and not (fill.verified or fill.broken):  # an empty blob
            fill.progress.wait()
        if self._hold_tail and not fill.verified:
            raise AbortResponse(f"the fill of {fill.digest} broke: {fill.broken}")

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call callback once, when the reader is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Done reading (safe to call more than once)."""
        if not self._closed:
            self._closed = True
            self._fill.readers -= 1
            self._fill.close_if_unused()
            for callback in self._on_close:
                callback()
