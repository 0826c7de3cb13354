"""Fills shared by the workers of one host: the registry sends a new blob to one worker, and
the clients of every other worker read it from that worker's spool (issue #7, per-host fill).

The workers speak through files in the spool directory (spooldir.py: bloblo's alone), named by
a namespace (a hash of bucket and prefix: instances caching elsewhere never share a fill) and
the blob's digest:

- `bloblo-fills-<ns>.lock`: one byte-range lock per digest (fcntl), held by the worker that
  fills the blob; the kernel drops it when that process dies, however it dies. One more byte,
  past every digest's, carries a shared lock of each worker busy with fills now (downloading
  a blob, or serving one to a client);
- `bloblo-fill-<ns>-<hex>-<token>.spool`: the filling worker's spool (mode 0600), under a name
  new for every fill, while it fills;
- `bloblo-fill-<ns>-<hex>.json`: a FillState, replaced whole on each change. It stays
  STATE_GRACE_SECONDS after the fill (the workers following it must learn how it ended), or,
  when its worker was killed, until the next fill of the blob or the next prune.

Nothing read from these files is followed before FillState.parse and spooldir.open_private
accepted it (issue #13, parts 1 and 2). Pruning runs at start-up and every PRUNE_SECONDS.
A worker never asks about a digest it fills itself: POSIX locks do not conflict within a process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent.event import Event

from .errors import AbortResponse
from .names import Digest
from .spooldir import NotOurs, create_private, open_private

LOG = logging.getLogger(__name__)

STATE_VERSION = 1  # FillState's layout; a worker of another version's states are ignored
MAX_STATE_BYTES = 256 * 1024  # a state file larger than this is not one bloblo wrote
WATCH_SECONDS = 0.005  # how often a joiner looks at another worker's fill
CLOSE_GRACE_SECONDS = 1.0  # a followed fill that ended keeps its descriptor this long unread
PRUNE_SECONDS = 60.0  # files of fills over for this long are removed, this often
STATE_GRACE_SECONDS = 2.0  # a fill's state outlives it this long: its followers look every 5 ms
BUSY_BYTE = 1 << 60  # past every digest's byte (_offset takes 60 bits)
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid
_STATES = frozenset({"running", "verified", "broken", "refuted"})
_FIELDS = frozenset({"version", "spool", "size", "headers", "state", "reason"})
_LEGACY_TEMPORARY = ".bloblo-state-"  # bloblo before issue #13 wrote states through these


class BadState(ValueError):
    """A state file's content is not a FillState of this version for this blob."""


class UnusableState(Exception):
    """A blob's state file that bloblo will not follow (not its own, or not a FillState)."""


@dataclass(frozen=True)
class FillState:
    """How far a fill got, as its worker tells the host's other workers: the one record they
    share (version STATE_VERSION)."""

    spool: str  # the spool's file name in the spool directory
    size: int  # the blob's size in bytes
    headers: tuple[tuple[str, str], ...]  # the upstream's answer, for every client
    state: str  # running, verified, broken, or refuted (the upstream's bytes were wrong)
    reason: str | None = None  # why it broke

    def encode(self) -> bytes:
        """The state as its file holds it."""
        record = {
            "version": STATE_VERSION,
            "spool": self.spool,
            "size": self.size,
            "headers": [list(pair) for pair in self.headers],
            "state": self.state,
            "reason": self.reason,
        }
        return json.dumps(record).encode()

    @classmethod
    def parse(cls, data: bytes, spool_prefix: str) -> FillState:
        """The state data holds, for a blob whose spools are named `<spool_prefix><12 hex>.spool`.

        Raises BadState for anything else: not JSON, another version, a missing or unknown
        field, a value of the wrong type, or a spool of another blob or directory.
        """
        try:
            record = json.loads(data)
        except ValueError:
            raise BadState("not JSON") from None
        if not isinstance(record, dict) or set(record) != _FIELDS:
            raise BadState("not a fill's state")
        if record["version"] != STATE_VERSION:
            raise BadState(f"version {record['version']!r}, not {STATE_VERSION}")
        spool, size, headers = record["spool"], record["size"], record["headers"]
        state, reason = record["state"], record["reason"]
        pattern = re.escape(spool_prefix) + r"[0-9a-f]{12}\.spool"
        if not (isinstance(spool, str) and re.fullmatch(pattern, spool)):
            raise BadState(f"spool {spool!r} is not this blob's")
        if type(size) is not int or size < 0:
            raise BadState(f"size {size!r}")
        if not isinstance(headers, list) or not all(_is_header(pair) for pair in headers):
            raise BadState("headers")
        if state not in _STATES or not (reason is None or isinstance(reason, str)):
            raise BadState(f"state {state!r}")
        return cls(spool, size, tuple((name, value) for name, value in headers), state, reason)


def _is_header(pair) -> bool:
    return isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)


class HostFills:
    """The locks, names and states of the fills of the workers of this host.

    directory must be bloblo's alone (spooldir.prepare); namespace names bucket and prefix.
    Raises OSError when the lock file cannot be made or opened.
    """

    def __init__(self, directory: str, namespace: str):
        self.directory = directory
        self._ns = namespace
        path = os.path.join(self.directory, f"bloblo-fills-{self._ns}.lock")
        self._lock_fd = open_private(path, os.O_RDWR | os.O_CREAT)
        self._claimed: set[str] = set()  # digests this worker fills (never probed: see above)
        self._ending: set[gevent.Greenlet] = set()  # removals of ended fills' states, pending
        self._ignored: set[str] = set()  # paths already logged as ignored (bounded below)
        self.prune()
        self._pruner = gevent.spawn(self._prune_every, PRUNE_SECONDS)

    # -- the worker that fills ------------------------------------------------------------------

    def claim(self, digest: Digest) -> str | None:
        """Take the blob's lock: the path of a new spool file when this worker now fills the
        blob for the host (what an earlier fill of it left is removed), None when another
        worker fills it. Anything raised on the way leaves the lock and the claim released."""
        if not self._lock(digest):
            return None
        self._claimed.add(digest.hex)
        try:
            self._remove_fill_of(digest)
        except BaseException:
            self._claimed.discard(digest.hex)
            self._unlock(digest)
            raise
        name = f"{self._spool_prefix(digest)}{os.urandom(6).hex()}.spool"
        return os.path.join(self.directory, name)

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

    def close(self) -> None:
        """The worker stops: remove the states of its fills once their grace is over (at most
        STATE_GRACE_SECONDS from now), so that nothing of them is left behind."""
        self._pruner.kill(block=False)
        gevent.joinall(list(self._ending), timeout=STATE_GRACE_SECONDS + 1)

    def _remove_state(self, digest: Digest, spool_name: str) -> None:
        """Remove the state an ended fill left, unless a newer fill of the blob replaced it."""
        state = self.usable_state(digest)
        if state is None or state.spool != spool_name or digest.hex in self._claimed:
            return
        self._remove_unless_filled(digest, self._state_path(digest))

    def publish(self, digest: Digest, state: FillState) -> None:
        """Replace the blob's state file with state (atomically: readers see all or nothing).
        Raises OSError when it cannot be written; nothing is left behind then."""
        path = self._state_path(digest)
        temporary = f"{path}.{os.urandom(6).hex()}.tmp"
        fd = create_private(temporary)
        try:
            with open(fd, "wb", closefd=True) as out:
                out.write(state.encode())
            os.replace(temporary, path)
        except BaseException:
            self._remove(temporary)
            raise

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

    def state(self, digest: Digest) -> FillState | None:
        """The blob's last published state; None when there is none.

        Raises UnusableState (logged once per file) when the file is not one this user wrote
        as a FillState of this version for this blob: it is never followed.
        """
        path = self._state_path(digest)
        try:
            fd = open_private(path)
            with open(fd, "rb", closefd=True) as file:
                data = file.read(MAX_STATE_BYTES + 1)
            if len(data) > MAX_STATE_BYTES:
                raise BadState(f"larger than {MAX_STATE_BYTES} bytes")
            return FillState.parse(data, self._spool_prefix(digest))
        except FileNotFoundError:
            return None
        except (OSError, BadState) as exc:  # NotOurs, EACCES, EISDIR, ...
            self._ignore(path, exc)
            raise UnusableState(str(exc)) from None

    def usable_state(self, digest: Digest) -> FillState | None:
        """The blob's state; None when there is none, or none bloblo will follow (logged)."""
        try:
            return self.state(digest)
        except UnusableState:
            return None

    def open_spool(self, state: FillState) -> int:
        """A read-only descriptor of the spool a state names. Raises FileNotFoundError when the
        fill is over, NotOurs (logged) or another OSError when it cannot be followed."""
        path = os.path.join(self.directory, state.spool)
        try:
            return open_private(path)
        except NotOurs as exc:
            self._ignore(path, exc)
            raise

    def _ignore(self, path: str, exc: Exception) -> None:
        """Log, once per path (the watch looks every 5 ms), a file in the spool directory that
        bloblo will not follow."""
        if path in self._ignored:
            return
        if len(self._ignored) >= 1024:
            self._ignored.clear()
        self._ignored.add(path)
        LOG.warning("ignoring %s in the spool directory: %s", os.path.basename(path), exc)

    # -- names ----------------------------------------------------------------------------------

    def _spool_prefix(self, digest: Digest) -> str:
        return f"bloblo-fill-{self._ns}-{digest.hex}-"

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
        state = self.usable_state(digest)
        if state is not None:
            self._remove(os.path.join(self.directory, state.spool))
        self._remove(self._state_path(digest))

    def _remove_unless_filled(self, digest: Digest, path: str) -> None:
        """Remove a file of the blob's fills unless a worker of the host fills it now."""
        if self._lock(digest):
            try:
                self._remove(path)
            finally:
                self._unlock(digest)

    @staticmethod
    def _remove(*paths: str) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # never fatal: pruning tries again
                LOG.warning("cannot remove %s: %s", path, exc)

    def prune(self) -> None:
        """Remove the files of fills no worker runs that are older than PRUNE_SECONDS: state
        files and their temporary copies, and spools a killed worker left."""
        prefix, cutoff = f"bloblo-fill-{self._ns}-", time.time() - PRUNE_SECONDS
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(_LEGACY_TEMPORARY):
                    hex_ = None
                elif entry.name.startswith(prefix):
                    hex_ = re.split(r"[-.]", entry.name[len(prefix) :], maxsplit=1)[0]
                    if hex_ in self._claimed or not re.fullmatch(r"[0-9a-f]{15,}", hex_):
                        continue
                else:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                if hex_ is None:
                    self._remove(entry.path)
                else:
                    self._remove_unless_filled(Digest("sha256", hex_), entry.path)

    def _prune_every(self, seconds: float) -> None:
        while True:
            gevent.sleep(seconds)
            try:
                self.prune()
            except OSError as exc:
                LOG.warning("cannot prune the spool directory %s: %s", self.directory, exc)


def _offset(digest: Digest) -> int:
    """The lock's byte for a digest: 60 bits of it (a collision only makes two blobs take
    turns)."""
    return int(digest.hex[:15], 16)


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
        self.progress = Event()
        self._fd: int | None = None
        self._spool_name: str | None = None
        self._readers = 0
        self._host = host
        self._on_start, self._on_close = on_start, on_close
        self._starting: gevent.Greenlet | None = None

    @property
    def following(self) -> bool:
        """Whether this worker still holds a descriptor of the other worker's spool."""
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
        if self._readers == 0 and (self.verified or self.broken):
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
        # Not at once: a client whose wait_started() just answered True makes its reader
        # after this greenlet's turn (a blob verified before anyone read it).
        gevent.spawn_later(CLOSE_GRACE_SECONDS, self._close_if_unused)

    def _notify(self) -> None:
        progress, self.progress = self.progress, Event()
        progress.set()
