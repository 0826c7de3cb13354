"""Fills shared by the workers of a host (bloblo/host.py): a filling worker in a child process,
a joiner in this one. POSIX locks only conflict between processes, so the filler must be one."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import gevent
import pytest

from bloblo import host as host_module
from bloblo.errors import AbortResponse
from bloblo.host import HostFills, SharedFill
from bloblo.names import Digest

DATA = os.urandom(300_000)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())
HALF = len(DATA) // 2


def _filler(directory: str, commands, done) -> None:
    """A worker that fills DIGEST step by step, as the parent tells it."""
    host = HostFills(directory, "bucket", "")
    path = host.claim(DIGEST)
    done.send(path is not None)
    state = {"spool": os.path.basename(path), "size": len(DATA), "headers": [["A", "b"]]}
    with open(path, "xb", buffering=0) as spool:
        for command in iter(commands.recv, "stop"):
            if command == "half":
                spool.write(DATA[:HALF])
                host.publish(DIGEST, {**state, "state": "running"})
            elif command == "rest":
                spool.write(DATA[HALF:])
            elif command in ("verified", "broken"):
                host.publish(DIGEST, {**state, "state": command, "reason": "wrong bytes"})
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
    reader = fill.reader(0, fill.size, hold_tail=hold_tail)
    try:
        return b"".join(reader)
    finally:
        reader.close()


def test_a_joiner_reads_the_other_workers_fill_as_it_grows_and_ends(filler, tmp_path):
    host = HostFills(str(tmp_path), "bucket", "")
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
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), "bucket", ""))
    filler("half")
    assert fill.wait_started(5)
    filler("rest")
    filler("broken")
    with pytest.raises(AbortResponse, match="wrong bytes"):
        _read(fill)


def test_a_filling_worker_that_dies_gives_its_joiners_a_short_read(filler, tmp_path):
    host = HostFills(str(tmp_path), "bucket", "")
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
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), "bucket", ""))
    filler("release")
    assert not fill.wait_started(5)


def test_instances_caching_in_other_buckets_never_share_a_fill(filler, tmp_path):
    assert not HostFills(str(tmp_path), "another-bucket", "").filled_elsewhere(DIGEST)


def test_a_worker_follows_another_workers_fill_once_for_all_its_clients(filler, tmp_path):
    from bloblo.config import Settings
    from bloblo.fills import Fills

    host = HostFills(str(tmp_path), "bucket", "")
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
    assert first.spool is None
    assert fills.running(DIGEST) is None  # over: nothing to follow, nothing filled elsewhere


def test_a_fill_verified_before_anyone_reads_it_still_serves_its_first_reader(filler, tmp_path):
    fill = SharedFill(DIGEST, HostFills(str(tmp_path), "bucket", ""))
    filler("half")
    filler("rest")
    filler("verified")
    assert fill.wait_started(5)
    gevent.sleep(0.01)  # the follower's turn: it sees the fill verified, its watch is over
    assert _read(fill) == DATA


def test_a_worker_busy_with_fills_is_seen_by_the_others_until_it_is_idle_or_dies(filler, tmp_path):
    host = HostFills(str(tmp_path), "bucket", "")
    assert not host.busy_elsewhere()
    filler("busy")
    assert host.busy_elsewhere()
    assert not HostFills(str(tmp_path), "another-bucket", "").busy_elsewhere()
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
    host = HostFills(str(tmp_path), "bucket", "")
    filler("busy")
    filler("idle")
    assert host.filled_elsewhere(DIGEST)  # the filler's lock on the blob is still there


def _filled_and_released(host: HostFills) -> str:
    """Fill DIGEST in this process (its spool and state), end the fill; the spool's name."""
    path = host.claim(DIGEST)
    with open(path, "xb") as spool:
        spool.write(DATA)
    state = {"spool": os.path.basename(path), "size": len(DATA), "headers": []}
    host.publish(DIGEST, {**state, "state": "verified"})
    host.release(DIGEST, path)
    return os.path.basename(path)


def _fill_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "fill-" in p.name)


def test_an_ended_fill_leaves_nothing_behind_once_its_followers_had_time_to_look(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.2)
    host = HostFills(str(tmp_path), "bucket", "")
    _filled_and_released(host)
    assert [name[-5:] for name in _fill_files(tmp_path)] == [".json"]  # for its followers
    gevent.sleep(0.4)
    assert _fill_files(tmp_path) == []


def test_the_state_of_a_newer_fill_of_the_blob_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.2)
    host = HostFills(str(tmp_path), "bucket", "")
    _filled_and_released(host)
    host.publish(DIGEST, {"spool": "a-newer-fill.spool", "size": 1, "headers": []})
    gevent.sleep(0.4)
    assert host.state(DIGEST)["spool"] == "a-newer-fill.spool"


def test_a_stopping_worker_tidies_its_ended_fills_before_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(host_module, "STATE_GRACE_SECONDS", 0.3)
    host = HostFills(str(tmp_path), "bucket", "")
    _filled_and_released(host)
    host.close()
    assert _fill_files(tmp_path) == []
