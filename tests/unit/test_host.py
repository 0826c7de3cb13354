"""Fills shared by the workers of a host (bloblo/host.py): a filling worker in a child process,
a joiner in this one. POSIX locks only conflict between processes, so the filler must be one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import replace

import gevent
import pytest

from bloblo import host as host_module
from bloblo import readers as readers_module
from bloblo.config import Settings
from bloblo.errors import AbortResponse
from bloblo.fillstate import FillState
from bloblo.followers import CLOSE_GRACE_SECONDS, SharedFill
from bloblo.host import HostFills
from bloblo.names import Digest
from bloblo.readers import FillReader

DATA = os.urandom(300_000)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())
HALF = len(DATA) // 2
NS = Settings(s3_bucket="bucket").namespace
OTHER_NS = Settings(s3_bucket="another-bucket").namespace


def _filler(directory: str, commands, done) -> None:
    """A worker that fills DIGEST step by step, as the parent tells it."""
    host = HostFills(directory, NS)
    claim = host.claim(DIGEST)
    done.send(claim is not None)
    path = claim.spool_path
    state = FillState(os.path.basename(path), len(DATA), (("A", "b"),), "running")
    with open(path, "xb", buffering=0) as spool:
        for command in iter(commands.recv, "stop"):
            if command == "half":
                spool.write(DATA[:HALF])
                host.publish(DIGEST, state)
            elif command == "rest":
                spool.write(DATA[HALF:])
            elif command in ("verified", "broken"):
                host.publish(DIGEST, replace(state, state=command, reason="wrong bytes"))
            elif command == "release":
                host.release(DIGEST, path)
            elif command in ("busy", "idle"):
                host.busy(command == "busy")
            elif command == "die":
                os._exit(1)  # no release: the kernel drops the lock
            done.send(command)


@pytest.fixture
def filler(tmp_path):
    """Start the filling worker; returns send(command), which waits until it is done."""
    context = multiprocessing.get_context("fork")
    commands, child_commands = context.Pipe()
    done, child_done = context.Pipe()
    process = context.Process(target=_filler, args=(str(tmp_path), child_commands, child_done))
    process.start()
    assert done.recv() is True  # it holds the lock

    def send(command: str) -> None:
        commands.send(command)
        if command == "die":
            process.join(10)
        else:
            assert done.recv() == command

    yield send
    if process.is_alive():
        commands.send("stop")
        process.join(10)


def _read(fill: SharedFill, hold_tail=True) -> bytes:
    reader = FillReader(fill, 0, fill.size, hold_tail)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def test_a_joiner_reads_the_other_workers_fill_as_it_grows_and_ends(filler, tmp_path):
    host = HostFills(str(tmp_path), NS)
    assert host.filled_elsewhere(DIGEST) and host.claim(DIGEST) is None
    fill = SharedFill(DIGEST, host)
    filler("half")
    assert fill.wait_started(5) and fill.size == len(DATA) and fill.headers == [("A", "b")]
    reading = gevent.spawn(_read, fill)
    gevent.sleep(0.1)
    assert not reading.ready()  # waits for the rest
    filler("rest")
    gevent.sleep(0.1)
    assert not reading.ready()  # the tail waits until the blob is verified
    filler("verified")
    filler("release")
    assert reading.get(timeout=5) == DATA
    assert not host.filled_elsewhere(DIGEST)
    assert [p.suffix for p in tmp_path.iterdir() if "fill-" in p.name] == [".json"]


def test_a_fill_that_broke_gives_its_joiners_a_short_read(filler, tmp_path):
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    filler("half")
    assert fill.wait_started(5)
    filler("rest")
    filler("broken")
    with pytest.raises(AbortResponse, match="wrong bytes"):
        _read(fill)


def test_a_filling_worker_that_dies_gives_its_joiners_a_short_read(filler, tmp_path):
    host = HostFills(str(tmp_path), NS)
    fill = SharedFill(DIGEST, host)
    filler("half")
    assert fill.wait_started(5)
    filler("die")
    with pytest.raises(AbortResponse, match="stopped"):
        _read(fill)
    # The next worker to fill it takes over, and what the dead one left is gone.
    assert host.claim(DIGEST) is not None
    assert [p for p in tmp_path.iterdir() if "fill-" in p.name] == []


def test_a_fill_cancelled_before_it_began_is_not_joined(filler, tmp_path):
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    filler("release")
    assert not fill.wait_started(5)


def test_instances_caching_in_other_buckets_never_share_a_fill(filler, tmp_path):
    assert not HostFills(str(tmp_path), OTHER_NS).filled_elsewhere(DIGEST)


def test_a_worker_follows_another_workers_fill_once_for_all_its_clients(filler, tmp_path):
    from bloblo.fills import Fills

    host = HostFills(str(tmp_path), NS)
    fills = Fills(Settings(spool_dir=str(tmp_path)), store=None, host=host)
    first = fills.running(DIGEST)
    filler("half")
    assert isinstance(first, SharedFill) and first.wait_started(5)
    second = fills.running(DIGEST)
    assert second is first and second.wait_started(5)  # one follower, one descriptor
    readers = [gevent.spawn(_read, fill) for fill in (first, second)]
    filler("rest")
    filler("verified")
    filler("release")
    assert [r.get(timeout=5) for r in readers] == [DATA, DATA]
    gevent.sleep(0.05)  # the follower sees the end and closes its descriptor
    assert not first.readable
    assert fills.running(DIGEST) is None  # over: nothing to follow, nothing filled elsewhere


def test_a_fill_verified_before_anyone_reads_it_still_serves_its_first_reader(filler, tmp_path):
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    filler("half")
    filler("rest")
    filler("verified")
    assert fill.wait_started(5)
    gevent.sleep(0.01)  # the follower's turn: it sees the fill verified, its watch is over
    assert _read(fill) == DATA


def test_a_worker_busy_with_fills_is_seen_by_the_others_until_it_is_idle_or_dies(filler, tmp_path):
    host = HostFills(str(tmp_path), NS)
    assert not host.busy_elsewhere()
    filler("busy")
    assert host.busy_elsewhere()
    assert not HostFills(str(tmp_path), OTHER_NS).busy_elsewhere()
    filler("idle")
    assert not host.busy_elsewhere()
    host.busy(True)  # this worker's own lock is no other worker's
    assert not host.busy_elsewhere()
    filler("busy")
    assert host.busy_elsewhere()
    host.busy(False)
    assert host.busy_elsewhere()
    filler("die")
    assert not host.busy_elsewhere()


def test_being_busy_leaves_the_digest_locks_alone(filler, tmp_path):
    host = HostFills(str(tmp_path), NS)
    filler("busy")
    filler("idle")
    assert host.filled_elsewhere(DIGEST)  # the filler's lock on the blob is still there


def _filled_and_released(host: HostFills) -> str:
    """Fill DIGEST in this process (its spool and state), end the fill; the spool's name."""
    path = host.claim(DIGEST).spool_path
    with open(path, "xb") as spool:
        spool.write(DATA)
    host.publish(DIGEST, FillState(os.path.basename(path), len(DATA), (), "verified"))
    host.release(DIGEST, path)
    return os.path.basename(path)


def _fill_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "fill-" in p.name)


def test_an_ended_fill_leaves_nothing_behind_once_its_followers_had_time_to_look(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.2)
    host = HostFills(str(tmp_path), NS)
    _filled_and_released(host)
    assert [name[-5:] for name in _fill_files(tmp_path)] == [".json"]  # for its followers
    gevent.sleep(0.4)
    assert _fill_files(tmp_path) == []


def test_the_state_of_a_newer_fill_of_the_blob_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.2)
    host = HostFills(str(tmp_path), NS)
    _filled_and_released(host)
    newer = f"bloblo-fill-{NS}-{DIGEST.hex}-{'0' * 12}.spool"
    host.publish(DIGEST, FillState(newer, 1, (), "running"))
    gevent.sleep(0.4)
    assert host.state(DIGEST).spool == newer


def test_a_stopping_worker_tidies_its_ended_fills_before_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.3)
    host = HostFills(str(tmp_path), NS)
    _filled_and_released(host)
    host.close()
    assert _fill_files(tmp_path) == []


# --- issue #13: races, bounds, and files bloblo did not write ---------------------------------


def test_a_fill_verified_between_two_looks_of_its_follower_is_read_to_its_end(
    filler, tmp_path, monkeypatch
):
    host = HostFills(str(tmp_path), NS)
    fill = SharedFill(DIGEST, host)
    filler("half")
    assert fill.wait_started(5)
    looked, real_state = [], host.state

    def state_once_the_rest_is_published(digest):
        # The race, injected: between the follower's reads of the spool's size and of the
        # state, the filler writes its last bytes and publishes `verified`.
        if not looked:
            looked.append(digest)
            filler("rest")
            filler("verified")
        return real_state(digest)

    monkeypatch.setattr(host, "state", state_once_the_rest_is_published)
    assert gevent.spawn(_read, fill).get(timeout=5) == DATA


def test_a_reader_of_a_fill_that_stops_moving_ends_short(filler, tmp_path, monkeypatch):
    monkeypatch.setattr(readers_module, "STALL_SECONDS", 0.3)
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    filler("half")
    assert fill.wait_started(5)
    reading = gevent.spawn(_read, fill, False)
    with pytest.raises(AbortResponse, match="has not moved"):
        reading.get(timeout=5)


def _spool_descriptors(directory) -> list[str]:
    """The spools in directory this process holds open."""
    fds = "/proc/self/fd"
    links = []
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            links.append(os.readlink(os.path.join(fds, fd)))
    return [link for link in links if link.startswith(str(directory)) and link.endswith(".spool")]


def _state_file(tmp_path):
    return tmp_path / f"bloblo-fill-{NS}-{DIGEST.hex}.json"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda state: {**state, "version": 2}, id="another-version"),
        pytest.param(lambda state: {k: v for k, v in state.items() if k != "size"}, id="no-size"),
        pytest.param(lambda state: {**state, "size": "300000"}, id="size-a-string"),
        pytest.param(lambda state: {**state, "headers": [["A"]]}, id="odd-headers"),
        pytest.param(lambda state: {**state, "spool": "../elsewhere.spool"}, id="spool-elsewhere"),
        pytest.param(lambda state: {**state, "state": "done"}, id="unknown-state"),
        pytest.param(lambda state: [state], id="not-an-object"),
    ],
)
def test_an_unexpected_state_is_skipped_and_leaks_nothing(filler, tmp_path, change, caplog):
    from bloblo.fills import Fills

    filler("half")
    path = _state_file(tmp_path)
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    host = HostFills(str(tmp_path), NS)
    fills = Fills(Settings(spool_dir=str(tmp_path)), store=None, host=host)
    fill = fills.running(DIGEST)
    assert isinstance(fill, SharedFill) and not fill.wait_started(0.3)
    assert fills._shared == {}  # no dead entry: the next client asks afresh
    assert _spool_descriptors(tmp_path) == []
    assert "ignoring" in caplog.text and caplog.text.count("ignoring") == 1  # once, not per look


@pytest.mark.parametrize("kind", ["directory", "symlink", "other-users"])
def test_a_spool_that_is_not_bloblos_regular_file_is_never_followed(filler, tmp_path, kind, caplog):
    filler("half")
    state = json.loads(_state_file(tmp_path).read_text())
    spool = tmp_path / state["spool"]
    planted = tmp_path / "planted"
    planted.write_bytes(b"x" * len(DATA))
    spool.unlink()  # the filler keeps writing its descriptor; the name is the attacker's now
    if kind == "directory":
        spool.mkdir()
    elif kind == "symlink":
        spool.symlink_to(planted)
    else:
        os.rename(planted, spool)
        os.chown(spool, 65534, 65534)
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    assert not fill.wait_started(0.3)
    assert _spool_descriptors(tmp_path) == []
    assert "ignoring" in caplog.text or kind == "directory"


def test_a_state_written_by_another_user_is_never_followed(filler, tmp_path, caplog):
    filler("half")
    filler("rest")
    filler("verified")
    os.chown(_state_file(tmp_path), 65534, 65534)  # as a local user would plant it
    host = HostFills(str(tmp_path), NS)
    with pytest.raises(host_module.UnusableState):
        host.state(DIGEST)
    assert not SharedFill(DIGEST, host).wait_started(0.3)
    assert "belongs to uid 65534" in caplog.text


def _lock_is_free(directory: str) -> bool:
    """Whether a process other than this one could take DIGEST's lock now."""
    context = multiprocessing.get_context("fork")
    answer, child_answer = context.Pipe()
    child = context.Process(
        target=lambda: child_answer.send(not HostFills(directory, NS).filled_elsewhere(DIGEST))
    )
    child.start()
    try:
        return answer.recv()
    finally:
        child.join(10)


def test_a_claim_that_fails_half_way_releases_the_lock_and_the_claim(tmp_path, monkeypatch):
    host = HostFills(str(tmp_path), NS)

    def refused(digest):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(host, "_remove_fill_of", refused)
    with pytest.raises(PermissionError):
        host.claim(DIGEST)
    assert DIGEST.hex not in host._claimed
    assert _lock_is_free(str(tmp_path))


def test_what_a_killed_worker_left_is_pruned_at_start_up_and_on_a_timer(tmp_path, monkeypatch):
    old = time.time() - host_module.PRUNE_SECONDS - 10
    left = [
        tmp_path / f"bloblo-fill-{NS}-{DIGEST.hex}-{'a' * 12}.spool",
        tmp_path / f"bloblo-fill-{NS}-{DIGEST.hex}.json",
        tmp_path / f"bloblo-fill-{NS}-{DIGEST.hex}.json.{'b' * 12}.tmp",
        tmp_path / ".bloblo-state-abc123",  # what bloblo before issue #13 left
    ]
    for path in left:
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    young = tmp_path / f"bloblo-fill-{NS}-{'c' * 64}-{'d' * 12}.spool"
    young.write_bytes(b"x")
    other_ns = tmp_path / f"bloblo-fill-{OTHER_NS}-{DIGEST.hex}.json"
    other_ns.write_bytes(b"x")
    os.utime(other_ns, (old, old))

    monkeypatch.setattr(host_module, "PRUNE_SECONDS", 0.5)
    host = HostFills(str(tmp_path), NS)  # start-up: the old ones go
    assert [p.exists() for p in left] == [False] * len(left)
    assert young.exists() and other_ns.exists()
    gevent.sleep(1.2)  # young is older than PRUNE_SECONDS now: the timer takes it
    assert not young.exists() and other_ns.exists()
    host.close()


def test_a_state_carries_the_canonical_digest_its_fill_verifies():
    prefix = f"bloblo-fill-{NS}-{DIGEST.hex}-"
    state = FillState(f"{prefix}{'e' * 12}.spool", 5, (("A", "b"),), "running", None, "sha256:ab")
    assert FillState.parse(state.encode(), prefix) == state


def test_a_verified_fill_stays_readable_for_a_late_client_until_its_worker_lets_it_go(
    filler, tmp_path
):
    """Issue #14: a client that found a followed fill while its S3 lookup ran must still find
    it readable once its last reader left, as long as the other worker holds it (uploads)."""
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), NS))
    filler("half")
    assert fill.wait_started(5)
    filler("rest")
    filler("verified")
    assert _read(fill) == DATA  # the last reader leaves the verified fill
    gevent.sleep(CLOSE_GRACE_SECONDS + 0.2)
    assert fill.readable and _read(fill) == DATA  # the upload still runs: a late client joins
    filler("release")
    assert poll_greenlets(lambda: not fill.readable, 5)  # let go: closed after the grace


def test_looking_at_another_workers_fill_takes_no_lock_a_claim_could_meet(tmp_path, monkeypatch):
    """Issue #14: a lock taken to look made another worker's claim of the blob fail at that
    instant, and its client read the registry instead of the fill."""
    host = HostFills(str(tmp_path), NS)
    taken = []
    monkeypatch.setattr(fcntl, "lockf", lambda *args: taken.append(args))
    assert not host.filled_elsewhere(DIGEST)
    assert taken == []


def poll_greenlets(predicate, timeout: float) -> bool:
    """Let gevent run until predicate() is true (or timeout seconds pass)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.05)
    return True
