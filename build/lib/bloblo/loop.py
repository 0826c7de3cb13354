"""Giving gevent's event loop its turn while a greenlet copies bytes that never have to wait.

On loopback neither the upstream socket nor the client socket may ever block, so a greenlet
copying a blob would never yield and every other client of the worker would wait for the whole
blob (issue #7: a /healthz probe waited 1.9 s). `gevent.sleep(0)` only runs greenlets that are
already ready; a timer, however short, makes the loop poll for I/O as well (FIELD-NOTES).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import gevent

SLICE_SECONDS = 0.002  # at most this long on the loop between two chances for the others
_POLL = 1e-6  # the shortest timer: the loop polls I/O, then comes straight back


class Turns:
    """Counts the time a greenlet has held the loop; give() yields once its slice is used up."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._since = clock()

    def give(self) -> None:
        """Yield to the loop (polling I/O) if this greenlet ran for more than a slice."""
        now = self._clock()
        if now - self._since >= SLICE_SECONDS:
            gevent.sleep(_POLL)
            self._since = self._clock()


def cooperative(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """chunks, unchanged, yielding to the event loop between them when they come too fast."""
    turns = Turns()
    for chunk in chunks:
        yield chunk
        turns.give()
