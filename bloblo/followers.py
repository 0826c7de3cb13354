"""Following a fill another worker of the host runs: this worker's view of it, fed by looking
at the other worker's state and spool (host.py) every WATCH_SECONDS; its clients read it
through the same interface as a fill of their own (readers.FillView)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import gevent
from gevent.event import Event

from .errors import AbortResponse
from .fillstate import FillState
from .host import HostFills, UnusableState
from .names import Digest, parse_digest

LOG = logging.getLogger(__name__)

WATCH_SECONDS = 0.005  # how often a follower looks at another worker's fill
UPLOAD_WATCH_SECONDS = 0.05  # how often, once it is verified, until its worker lets it go
CLOSE_GRACE_SECONDS = 1.0  # a followed fill that ended keeps its descriptor this long unread


class SharedFill:
    """A fill another worker of this host runs, as seen by this worker's clients: the reading
    interface of readers.py, fed by looking at the other worker's spool file and state every
    WATCH_SECONDS. One per blob and worker serves every client of the worker (Fills keeps it
    from the start until its descriptor is closed: `on_start` and `on_close`)."""

    def __init__(
        self,
        digest: Digest,
        host: HostFills,
        on_start: Callable[[SharedFill], None] = lambda fill: None,
        on_close: Callable[[SharedFill], None] = lambda fill: None,
    ):
        self.digest = digest
        self.size = 0
        self.written = 0  # bytes of the blob in the other worker's spool, as last seen
        self.headers: list[tuple[str, str]] = []
        self.verified = False
        self.broken: str | None = None
        self.refuted = False
        self.canonical: Digest | None = None  # the other digest the fill verifies (fillstate.py)
        self.progress = Event()
        self._fd: int | None = None
        self._spool_name: str | None = None
        self._readers = 0
        self._host = host
        self._on_start, self._on_close = on_start, on_close
        self._starting: gevent.Greenlet | None = None
        self._let_go = False  # its worker no longer holds it (uploaded, or gave up)

    @property
    def readable(self) -> bool:
        """Whether this worker still holds a descriptor of the other worker's spool: a reader
        that attaches now keeps it open."""
        return self._fd is not None

    def wait_started(self, timeout: float) -> bool:
        """Wait until the other worker's fill runs (True); False when it was cancelled, ended
        before this worker could open its spool, did not start within timeout seconds, or left
        files that cannot be followed. The first caller starts following it; the others wait
        for the same answer."""
        if self._starting is None:
            self._on_start(self)
            self._starting = gevent.spawn(self._start, timeout)
        self._starting.join(timeout)
        return bool(self._starting.successful() and self._starting.value)

    def _start(self, timeout: float) -> bool:
        try:
            if self._follow(timeout):
                return True
        except Exception as exc:  # never a dead follower kept for the worker's life
            LOG.warning("cannot follow the fill of %s: %s", self.digest, exc)
        self._close()
        return False

    def _follow(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self._host.filled_elsewhere(self.digest)
            try:
                state = self._host.state(self.digest)
                if state is not None and self._open(state):
                    self._apply(state, held)
                    gevent.spawn(self._watch)
                    return True
            except UnusableState:  # logged: the client fetches the blob itself
                return False
            if not held:
                return False
            gevent.sleep(WATCH_SECONDS)
        return False

    def _open(self, state: FillState) -> bool:
        try:
            self._fd = self._host.open_spool(state)
        except FileNotFoundError:  # over already
            return False
        except OSError as exc:  # not a file this worker may follow: the client fetches it
            raise UnusableState(str(exc)) from None
        self.size, self.headers, self._spool_name = state.size, list(state.headers), state.spool
        self.canonical = parse_digest(state.canonical) if state.canonical else None
        self._refresh()
        return True

    # -- the reading interface (readers.py) -----------------------------------------------------

    def attach(self) -> None:
        """One more reader: the spool stays open for it."""
        self._readers += 1

    def detach(self) -> None:
        """A reader is done; the spool is closed once the fill ended and none is left."""
        self._readers -= 1
        self._close_if_unused()

    def read_spool(self, position: int, count: int) -> bytes:
        """count bytes from position (there already); a failed read raises AbortResponse."""
        try:
            data = os.pread(self._fd, count, position)
        except (OSError, TypeError) as exc:
            reason = f"the shared spool of {self.digest} cannot be read: {exc}"
            raise AbortResponse(reason) from None
        if len(data) != count:
            raise AbortResponse(f"the shared spool of {self.digest} is short at {position}")
        return data

    # -- following the other worker -------------------------------------------------------------

    def _close_if_unused(self) -> None:
        """Close the descriptor once no reader is left and the fill is over: broken, or
        verified and let go by its worker. Until then a client that found it a moment ago
        (while it asked S3) can still join it, as it can a fill of this worker's own."""
        if self._readers == 0 and (self.broken or (self.verified and self._let_go)):
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._on_close(self)

    def _refresh(self) -> None:
        self.written = min(os.fstat(self._fd).st_size, self.size)

    def _apply(self, state: FillState | None, held: bool) -> None:
        """Take in the state published, and whether its worker still holds the lock (read
        before the state: a state read after the lock was released is the final one)."""
        if self.verified or self.broken:
            return
        if state is None or state.spool != self._spool_name:
            self.broken = "the fill was replaced"  # a newer fill of the blob took its place
        elif state.state == "verified":
            self.verified = True
        elif state.state in ("broken", "refuted"):
            self.broken = state.reason or "the fill broke"
            self.refuted = state.state == "refuted"
        elif not held:  # no longer filled, and never verified: its worker stopped
            self.broken = "the worker filling it stopped"

    def _watch(self) -> None:
        """Follow the other worker's fill until it is verified or broken. Each look reads the
        lock, then the state, then the spool's size: a state is never paired with a size read
        before it (a verified state read after the size could miss the last bytes, and its
        readers would wait for bytes that never come)."""
        try:
            while not (self.verified or self.broken) and self._fd is not None:
                gevent.sleep(WATCH_SECONDS)
                held = self._host.filled_elsewhere(self.digest)  # before the state: see _apply
                state = self._host.usable_state(self.digest)
                before = self.written
                self._refresh()
                self._apply(state, held)
                if self.written != before or self.verified or self.broken:
                    self._notify()
        except (OSError, TypeError) as exc:  # the descriptor went: nothing more to follow
            self.broken = self.broken or f"cannot follow the fill: {exc}"
            self._notify()
        # Verified: its worker uploads it now. Readable until that is over (issue #14: a
        # client of a herd found the descriptor closed under it and read the registry).
        while self.verified and self._fd is not None and self._host.filled_elsewhere(self.digest):
            gevent.sleep(UPLOAD_WATCH_SECONDS)
        self._let_go = True
        # Not at once: a client whose wait_started() just answered True makes its reader
        # after this greenlet's turn (a blob verified before anyone read it).
        gevent.spawn_later(CLOSE_GRACE_SECONDS, self._close_if_unused)

    def _notify(self) -> None:
        progress, self.progress = self.progress, Event()
        progress.set()
