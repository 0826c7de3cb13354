"""Fills shared by the workers of one host: the registry sends a new blob to one worker, and
the clients of every other worker read it from that worker's spool (issue #7, per-host fill).

All of it lives in BLOBLO_SPOOL_DIR, named by a namespace (a hash of bucket and prefix, so that
instances caching elsewhere never share a fill) and the blob's digest:

- `bloblo-fills-<ns>.lock`: one byte-range lock per digest (fcntl), held by the worker that
  fills the blob; the kernel drops it when that process dies, however it dies. One more byte,
  past every digest's, carries a shared lock of each worker busy with fills now (downloading
  a blob, or serving one to a client);
- `bloblo-fill-<ns>-<hex>-<token>.spool`: the filling worker's spool, under a name (new for
  every fill) while it fills;
- `bloblo-fill-<ns>-<hex>.json`: how far it got, replaced whole on each change:
  `{"spool", "size", "headers", "state": "running" | "verified" | "broken", "reason"}`. It stays
  STATE_GRACE_SECONDS after the fill (the workers following it must learn how it ended), or,
  when its worker was killed, until the next fill of the blob or the next prune.

A worker never asks about a digest it fills itself: POSIX locks do not conflict within a process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable

import gevent
from gevent.event import Event

from .errors import AbortResponse
from .names import Digest
from .readers import FillReader

LOG = logging.getLogger(__name__)

WATCH_SECONDS = 0.005  # how often a joiner looks at another worker's fill
CLOSE_GRACE_SECONDS = 1.0  # a followed fill that ended keeps its descriptor this long unread
PRUNE_SECONDS = 60.0  # state files of fills over for this long are removed (at most this often)
STATE_GRACE_SECONDS = 2.0  # a fill's state outlives it this long: its followers look every 5 ms
BUSY_BYTE = 1 << 60  # past every digest's byte (_offset takes 60 bits)
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid


class HostFills:
    """The locks, names and states of the fills of the workers of this host."""

    def __init__(self, directory: str | None, bucket: str, prefix: str):
        self.directory = directory or tempfile.gettempdir()
        self._ns = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:12]
        path = os.path.join(self.directory, f"bloblo-fills-{self._ns}.lock")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._claimed: set[str] = set()  # digests this worker fills (never probed: see above)
        self._ending: set[gevent.Greenlet] = set()  # removals of ended fills' states, pending
        self._pruned_at = time.monotonic()

    # -- the worker that fills ------------------------------------------------------------------

    def claim(self, digest: Digest) -> str | None:
        """Take the blob's lock: the path of a new spool file when this worker now fills the
        blob for the host (what an earlier fill of it left is removed), None when another
        worker fills it."""
        if not self._lock(digest):
            return None
        self._claimed.add(digest.hex)
        self._remove_fill_of(digest)
        return os.path.join(
            self.directory, f"bloblo-fill-{self._ns}-{digest.hex}-{os.urandom(6).hex()}.spool"
        )

    def release(self, digest: Digest, spool_path: str | None) -> None:
        """The fill is over: drop the spool's name (readers keep their descriptors) and the
        lock; the state stays for the workers that have not looked yet."""
        if spool_path:
            self._remove(spool_path)
        self._unlock(digest)
        self._claimed.discard(digest.hex)
        if spool_path:
            removal = gevent.spawn_later(
                STATE_GRACE_SECONDS, self._remove_state, digest, os.path.basename(spool_path)
            )
            self._ending.add(removal)
            removal.link(self._ending.discard)
        self._prune()

    def close(self) -> None:
        """The worker stops: remove the states of its fills once their grace is over (at most
        STATE_GRACE_SECONDS from now), so that nothing of them is left behind."""
        gevent.joinall(list(self._ending), timeout=STATE_GRACE_SECONDS + 1)

    def _remove_state(self, digest: Digest, spool_name: str) -> None:
        """Remove the state an ended fill left, unless a newer fill of the blob replaced it."""
        state = self.state(digest)
        if state is None or state.get("spool") != spool_name or digest.hex in self._claimed:
            return
        self._remove_unless_filled(digest, self._state_path(digest))

    def publish(self, digest: Digest, state: dict) -> None:
        """Replace the blob's state file with state (atomically: readers see all or nothing)."""
        path = self._state_path(digest)
        with tempfile.NamedTemporaryFile(
            "w", dir=self.directory, prefix=".bloblo-state-", delete=False
        ) as out:
            json.dump(state, out)
        os.replace(out.name, path)

    def busy(self, active: bool) -> None:
        """Say whether this worker is busy with fills now: downloading a blob or serving one
        to a client (a shared lock on BUSY_BYTE, which the kernel drops if the worker dies)."""
        mode = fcntl.LOCK_SH | fcntl.LOCK_NB if active else fcntl.LOCK_UN
        try:
            fcntl.lockf(self._lock_fd, mode, 1, BUSY_BYTE)
        except OSError as exc:  # only uploads held for the others' clients depend on it
            LOG.warning("cannot tell the host's workers that this one is busy: %s", exc)

    def busy_elsewhere(self) -> bool:
        """Whether another worker of the host is busy with fills now (F_GETLK: asks, takes
        nothing, and never sees this worker's own locks)."""
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, BUSY_BYTE, 1, 0)
        try:
            answer = fcntl.fcntl(self._lock_fd, fcntl.F_GETLK, query)
        except OSError:
            return False
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    # -- the workers that join ------------------------------------------------------------------

    def filled_elsewhere(self, digest: Digest) -> bool:
        """Whether another worker of the host holds the blob's lock (fills it now)."""
        if digest.hex in self._claimed:  # ours: probing would release it (POSIX locks)
            return False
        if not self._lock(digest, exclusive=False):
            return True
        self._unlock(digest)
        return False

    def state(self, digest: Digest) -> dict | None:
        """The blob's last published state, if any."""
        try:
            with open(self._state_path(digest)) as state:
                loaded = json.load(state)
        except (FileNotFoundError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    def spool_of(self, state: dict) -> str:
        """The path of the spool a state names (a file name in this directory)."""
        name = state["spool"]
        if not isinstance(name, str) or os.sep in name:
            raise KeyError("spool")
        return os.path.join(self.directory, name)

    # -- names ----------------------------------------------------------------------------------

    def _state_path(self, digest: Digest) -> str:
        return os.path.join(self.directory, f"bloblo-fill-{self._ns}-{digest.hex}.json")

    def _lock(self, digest: Digest, exclusive: bool = True) -> bool:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.lockf(self._lock_fd, mode | fcntl.LOCK_NB, 1, _offset(digest))
        except OSError:  # EAGAIN or EACCES: another process holds it
            return False
        return True

    def _unlock(self, digest: Digest) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _offset(digest))

    def _remove_fill_of(self, digest: Digest) -> None:
        """Remove what an earlier fill of the blob left (its state, and the spool of a worker
        that was killed); the caller holds the blob's lock."""
        state = self.state(digest) or {}
        spool = state.get("spool") if isinstance(state, dict) else None
        if isinstance(spool, str) and os.sep not in spool:
            self._remove(os.path.join(self.directory, spool))
        self._remove(self._state_path(digest))

    def _remove_unless_filled(self, digest: Digest, path: str) -> None:
        """Remove a file of the blob's fills unless a worker of the host fills it now."""
        if self._lock(digest):
            self._remove(path)
            self._unlock(digest)

    @staticmethod
    def _remove(*paths: str) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _prune(self) -> None:
        """Remove the files of fills no worker runs that are older than PRUNE_SECONDS (state
        files, and spools a killed worker left); at most once every PRUNE_SECONDS."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_SECONDS:
            return
        self._pruned_at = now
        prefix, cutoff = f"bloblo-fill-{self._ns}-", time.time() - PRUNE_SECONDS
        with os.scandir(self.directory) as entries:
            for entry in entries:
                hex_ = entry.name[len(prefix) :].split(".")[0].split("-")[0]
                if not entry.name.startswith(prefix) or hex_ in self._claimed or len(hex_) < 15:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime >= cutoff:
                        continue
                self._remove_unless_filled(Digest("sha256", hex_), entry.path)


def _offset(digest: Digest) -> int:
    """The lock's byte for a digest: 60 bits of it (a collision only makes two blobs take
    turns)."""
    return int(digest.hex[:15], 16)


class SharedFill:
    """A fill another worker of this host runs, as seen by this worker's clients: the same
    reading interface as fills.Fill (readers.py), fed by looking at the other worker's spool
    file and state every WATCH_SECONDS. One per blob and worker serves every client of the
    worker (Fills keeps it from the start until its descriptor is closed: `on_start` and
    `on_close`)."""

    def __init__(
        self,
        digest: Digest,
        host: HostFills,
        on_start: Callable[[SharedFill], None] = lambda fill: None,
        on_close: Callable[[SharedFill], None] = lambda fill: None,
    ):
        self.digest = digest
        self.size = 0
        self.headers: list[tuple[str, str]] = []
        self.spool: _SharedSpool | None = None
        self.verified = False
        self.broken: str | None = None
        self.progress = Event()
        self.readers = 0
        self._host = host
        self._on_start, self._on_close = on_start, on_close
        self._starting: gevent.Greenlet | None = None

    def wait_started(self, timeout: float) -> bool:
        """Wait until the other worker's fill runs (True); False when it was cancelled, ended
        before this worker could open its spool, or did not start within timeout seconds.
        The first caller starts following it; the others wait for the same answer."""
        if self._starting is None:
            self._on_start(self)
            self._starting = gevent.spawn(self._start, timeout)
        self._starting.join(timeout)
        return bool(self._starting.successful() and self._starting.value)

    def _start(self, timeout: float) -> bool:
        if self._follow(timeout):
            return True
        self._on_close(self)
        return False

    def _follow(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self._host.filled_elsewhere(self.digest)
            state = self._host.state(self.digest)
            if state is not None and self._open(state):
                self._apply(state, held)
                gevent.spawn(self._watch)
                return True
            if not held:
                return False
            gevent.sleep(WATCH_SECONDS)
        return False

    def reader(self, start: int, stop: int, hold_tail: bool) -> FillReader:
        """A reader of bytes [start, stop); the spool stays open until it is closed."""
        return FillReader(self, start, stop, hold_tail)

    def read_spool(self, position: int, count: int) -> bytes:
        """count bytes from position (there already); a failed read raises AbortResponse."""
        data = os.pread(self.spool.fd, count, position)
        if len(data) != count:
            raise AbortResponse(f"the shared spool of {self.digest} is short at {position}")
        return data

    def close_if_unused(self) -> None:
        """Close this worker's descriptor of the spool once no reader is left."""
        if self.readers == 0 and self.spool is not None and (self.verified or self.broken):
            os.close(self.spool.fd)
            self.spool = None
            self._on_close(self)

    def _open(self, state: dict) -> bool:
        try:
            fd = os.open(self._host.spool_of(state), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, KeyError, TypeError):  # over, or not this worker's to read
            return False
        self.size = int(state["size"])
        self.headers = [(name, value) for name, value in state["headers"]]
        self.spool = _SharedSpool(fd, self.size, state["spool"])
        return True

    def _apply(self, state: dict | None, held: bool) -> None:
        """Take in the state published, and whether its worker still holds the lock (read
        before the state: a state read after the lock was released is the final one)."""
        if self.verified or self.broken:
            return
        if state is None or state.get("spool") != self.spool.name:
            self.broken = "the fill was replaced"  # a newer fill of the blob took its place
        elif state.get("state") == "verified":
            self.verified = True
        elif state.get("state") == "broken":
            self.broken = state.get("reason") or "the fill broke"
        elif not held:  # no longer filled, and never verified: its worker stopped
            self.broken = "the worker filling it stopped"

    def _watch(self) -> None:
        """Follow the other worker's fill until it is verified or broken."""
        while not (self.verified or self.broken) and self.spool is not None:
            gevent.sleep(WATCH_SECONDS)
            held = self._host.filled_elsewhere(self.digest)  # before the state: see _apply
            before = self.spool.written
            self.spool.refresh()
            self._apply(self._host.state(self.digest), held)
            if self.spool.written != before or self.verified or self.broken:
                progress, self.progress = self.progress, Event()
                progress.set()
        # Not at once: a client whose wait_started() just answered True makes its reader
        # after this greenlet's turn (a blob verified before anyone read it).
        gevent.spawn_later(CLOSE_GRACE_SECONDS, self.close_if_unused)


class _SharedSpool:
    """Another worker's spool file, read through a descriptor of this worker's."""

    def __init__(self, fd: int, size: int, name: str):
        self.fd = fd
        self.size = size
        self.name = name
        self.written = 0
        self.refresh()

    def refresh(self) -> None:
        """Look again at how much of the blob the file holds."""
        self.written = min(os.fstat(self.fd).st_size, self.size)
