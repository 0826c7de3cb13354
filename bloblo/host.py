"""The protocol between the workers of one host that share their fills: the registry sends a
new blob to one worker, and the clients of every other worker read it from that worker's spool
(issue #7, per-host fill; followers.py reads it). This module owns the locks, the names, the
state files and their pruning.

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
import logging
import os
import re
import struct
import time
from dataclasses import dataclass

import gevent

from .fillstate import BadState, FillState
from .names import Digest
from .spooldir import NotOurs, create_private, open_private

LOG = logging.getLogger(__name__)

MAX_STATE_BYTES = 256 * 1024  # a state file larger than this is not one bloblo wrote
PRUNE_SECONDS = 60.0  # files of fills over for this long are removed, this often
STATE_GRACE_SECONDS = 2.0  # a fill's state outlives it this long: its followers look every 5 ms
BUSY_BYTE = 1 << 60  # past every digest's byte (_offset takes 60 bits)
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid
_LEGACY_TEMPORARY = ".bloblo-state-"  # bloblo before issue #13 wrote states through these


@dataclass(frozen=True)
class Claim:
    """This worker fills a blob for the host: its spool's path, and whether the blob's last
    fill ended verified moments ago (its state was still there): then the bucket may hold the
    blob already, published after this worker asked S3."""

    spool_path: str
    after_verified: bool = False


class UnusableState(Exception):
    """A blob's state file that bloblo will not follow (not its own, or not a FillState)."""


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

    def claim(self, digest: Digest) -> Claim | None:
        """Take the blob's lock: a Claim (the path of a new spool file) when this worker now
        fills the blob for the host (what an earlier fill of it left is removed), None when
        another worker fills it. Anything raised on the way leaves the lock and the claim
        released."""
        if not self._lock(digest):
            return None
        self._claimed.add(digest.hex)
        try:
            earlier = self._remove_fill_of(digest)
        except BaseException:
            self._claimed.discard(digest.hex)
            self._unlock(digest)
            raise
        name = f"{self._spool_prefix(digest)}{os.urandom(6).hex()}.spool"
        verified = earlier is not None and earlier.state == "verified"
        return Claim(os.path.join(self.directory, name), after_verified=verified)

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
        return self._held_elsewhere(BUSY_BYTE)

    def _held_elsewhere(self, offset: int) -> bool:
        """Whether another process holds a lock on the lock file's byte at offset (F_GETLK:
        asks, takes nothing, and never sees this process's own locks)."""
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        try:
            answer = fcntl.fcntl(self._lock_fd, fcntl.F_GETLK, query)
        except OSError:
            return False
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    # -- the workers that follow ------------------------------------------------------------------

    def filled_elsewhere(self, digest: Digest) -> bool:
        """Whether another worker of the host holds the blob's lock (fills it now).

        Asks with F_GETLK, which takes nothing: a lock taken to look would make another
        worker's claim of the blob fail at that instant, and its client pass through uncached
        (issue #14: two workers looking at each other's claims made a herd read a blob from
        the registry five times)."""
        if digest.hex in self._claimed:  # ours: F_GETLK does not see this process's locks
            return False
        return self._held_elsewhere(_offset(digest))

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

    def _lock(self, digest: Digest) -> bool:
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(digest))
        except OSError:  # EAGAIN or EACCES: another process holds it
            return False
        return True

    def _unlock(self, digest: Digest) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _offset(digest))

    def _remove_fill_of(self, digest: Digest) -> FillState | None:
        """Remove what an earlier fill of the blob left (its state, and the spool of a worker
        that was killed) and return its state; the caller holds the blob's lock."""
        state = self.usable_state(digest)
        if state is not None:
            self._remove(os.path.join(self.directory, state.spool))
        self._remove(self._state_path(digest))
        return state

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
