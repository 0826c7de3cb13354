"""A fill on its own: one download feeds every reader and a verified upload; anything that goes
wrong on the way publishes nothing and ends every reader with a short read (issue #7)."""

import hashlib
import time

import gevent
import pytest

from bloblo import holds
from bloblo.config import Settings
from bloblo.errors import AbortResponse
from bloblo.fills import Fills
from bloblo.names import Digest
from bloblo.readers import FillReader
from bloblo.spool import Spool, SpoolError
from bloblo.uploads import Pipe

MIB = 1024 * 1024
DATA = bytes(range(256)) * (12 * 4096)  # 12 MiB


class FakeRaw:
    """An upstream body: chunks, optionally cut short."""

    def __init__(self, chunks):
        self._chunks = chunks
        self.closed = False
        self.length_remaining = 0

    def stream(self, size, decode_content=False):
        for chunk in self._chunks:
            gevent.sleep(0)
            yield chunk

    def release_conn(self):
        pass

    def drain_conn(self):
        pass


class FakeResponse:
    def __init__(self, chunks):
        self.raw = FakeRaw(chunks)

    def close(self):
        pass


class RecordingStore:
    """Stands in for S3: reads what the upload is given, as boto3 would, and keeps it only if
    the reader ended cleanly."""

    def __init__(self):
        self.published: dict[str, bytes] = {}
        self.canonical: dict[str, Digest | None] = {}

    def available(self):
        return True

    def upload(self, reader, digest, size, canonical=None):
        parts = []
        while part := reader.read(8 * MIB):
            parts.append(part)
        self.published[str(digest)] = b"".join(parts)
        self.canonical[str(digest)] = canonical

    def report_failure(self, exc):
        raise AssertionError(exc)


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _fill(tmp_path, store, chunks, digest=None, **settings):
    fills = Fills(Settings(spool_dir=str(tmp_path), **settings), store)
    fill = fills.reserve(digest or _digest(DATA))
    assert fill.begin(FakeResponse(chunks), len(DATA), [("Content-Type", "x")])
    return fills, fill


def _chunks(data=DATA, size=MIB):
    return [data[i : i + size] for i in range(0, len(data), size)]


def _read(reader) -> bytes:
    try:
        return b"".join(reader)
    finally:
        reader.close()


def test_every_reader_gets_the_blob_and_it_is_published_once(tmp_path):
    store = RecordingStore()
    fills, fill = _fill(tmp_path, store, _chunks())
    readers = [
        gevent.spawn(_read, FillReader(fill, 0, len(DATA), hold_tail=True)) for _ in range(3)
    ]
    ranged = gevent.spawn(_read, FillReader(fill, 5 * MIB, 7 * MIB, hold_tail=False))
    gevent.joinall([*readers, ranged], raise_error=True)
    assert [r.value for r in readers] == [DATA] * 3
    assert ranged.value == DATA[5 * MIB : 7 * MIB]
    fill.done.wait(10)
    assert store.published == {str(fill.digest): DATA}
    assert fills.in_progress() == 0 and fills.budget.used == 0


def test_a_wrong_blob_reaches_readers_short_and_is_not_published(tmp_path):
    store = RecordingStore()
    wrong = DATA[:-1] + b"!"
    _, fill = _fill(tmp_path, store, _chunks(wrong))
    got = bytearray()
    with pytest.raises(AbortResponse):
        for chunk in FillReader(fill, 0, len(DATA), hold_tail=True):
            got += chunk
    assert len(got) < len(DATA)  # the tail was held back
    fill.done.wait(10)
    assert store.published == {} and fill.result == "digest_mismatch"


def test_an_upstream_that_breaks_off_publishes_nothing(tmp_path):
    store = RecordingStore()
    _, fill = _fill(tmp_path, store, _chunks()[:5])
    with pytest.raises(AbortResponse):
        _read(FillReader(fill, 0, len(DATA), hold_tail=True))
    fill.done.wait(10)
    assert store.published == {} and "bytes of" in fill.broken


@pytest.mark.parametrize("fault", ["write", "read"])
def test_a_spool_that_fails_publishes_nothing_and_hangs_nobody(fault, tmp_path, monkeypatch):
    real = {"write": Spool.append, "read": Spool.read}[fault]
    calls = []

    def failing(self, *args):
        calls.append(1)
        if len(calls) >= 4:  # from then on: a disk that went bad
            raise SpoolError(5, "Input/output error")
        return real(self, *args)

    monkeypatch.setattr(Spool, {"write": "append", "read": "read"}[fault], failing)
    if fault == "read":  # a disk gone bad fails the upload's splice from the spool as well

        def failing_splice(self, *args):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(Pipe, "splice", failing_splice)
    store = RecordingStore()
    _, fill = _fill(tmp_path, store, _chunks())
    reader = gevent.spawn(_read, FillReader(fill, 0, len(DATA), hold_tail=True))
    reader.join(10)
    assert reader.ready()  # nobody hangs
    fill.done.wait(10)
    assert fill.done.is_set()
    assert store.published == {}
    assert reader.exception is not None or reader.value == DATA  # right bytes, or a short read


def test_the_spool_budget_and_the_fill_cap_say_no_instead_of_waiting(tmp_path):
    fills = Fills(Settings(spool_dir=str(tmp_path), spool_max_bytes=MIB, max_fills=1), None)
    fill = fills.reserve(_digest(b"a"))
    assert fills.reserve(_digest(b"b")) is None  # the cap
    assert fills.reserve(_digest(b"a")) is None  # one per digest
    assert not fill.begin(FakeResponse([]), 2 * MIB, [])  # larger than the budget
    fill.cancel()
    assert fills.in_progress() == 0 and fills.reserve(_digest(b"b")) is not None


def test_a_fill_waiting_for_its_upload_leaves_its_place_to_a_new_blob(tmp_path):
    """Issue #14: under load every place of BLOBLO_MAX_FILLS was taken by fills held for their
    upload, and new blobs, a herd's too, passed through uncached. Downloads are capped, and
    uploads apart: at most BLOBLO_MAX_FILLS at once."""
    store = RecordingStore()
    settings = {"spool_dir": str(tmp_path), "max_fills": 1, "upload_hold_seconds": 30}
    fills = Fills(Settings(**settings), store)
    first = fills.reserve(_digest(DATA))
    assert fills.reserve(_digest(b"b")) is None  # its download takes the one place
    client = fills.hold.serving(FillReader(first, 0, len(DATA), hold_tail=True))
    assert first.begin(FakeResponse(_chunks()), len(DATA), [])
    assert _read_open(client) == DATA  # verified; its upload is held while the client is open
    second_data = DATA[: 2 * MIB]
    second = fills.reserve(_digest(second_data))
    assert second is not None and fills.in_progress() == 2  # the held one left its place
    assert second.begin(FakeResponse(_chunks(second_data)), len(second_data), [])
    gevent.sleep(0.2)
    assert store.published == {}
    client.close()
    assert first.done.wait(10) and second.done.wait(10)
    assert set(store.published) == {str(first.digest), str(second.digest)}


def _read_open(reader) -> bytes:
    """Everything reader gives, leaving it open (its client still there)."""
    return b"".join(reader)


# --- the upload waits for the worker's clients (BLOBLO_UPLOAD_HOLD_SECONDS) --------------------


def test_an_upload_waits_while_the_worker_serves_a_client_of_a_fill(tmp_path):
    store = RecordingStore()
    fills = Fills(Settings(spool_dir=str(tmp_path), upload_hold_seconds=30), store)
    other_data = DATA[: 3 * MIB]
    other = fills.reserve(_digest(other_data))
    assert other.begin(FakeResponse(_chunks(other_data)), len(other_data), [])
    client = fills.hold.serving(
        FillReader(other, 0, MIB, hold_tail=False)
    )  # reads, then stays open
    assert len(b"".join(client)) == MIB
    fill = fills.reserve(_digest(DATA))
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [])
    assert _read(FillReader(fill, 0, len(DATA), hold_tail=True)) == DATA
    gevent.sleep(0.5)
    assert store.published == {}  # both verified, both held for the open client
    client.close()
    fill.done.wait(10)
    other.done.wait(10)
    assert set(store.published) == {str(fill.digest), str(other.digest)}


def test_a_held_upload_goes_after_upload_hold_seconds_whatever_the_clients_do(tmp_path):
    store = RecordingStore()
    fills = Fills(Settings(spool_dir=str(tmp_path), upload_hold_seconds=0.5), store)
    fill = fills.reserve(_digest(DATA))
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [])
    stalled = fills.hold.serving(FillReader(fill, 0, len(DATA), hold_tail=True))
    next(iter(stalled))  # one chunk, then the client reads nothing more
    started = time.monotonic()
    assert fill.done.wait(10)
    assert 0.4 < time.monotonic() - started < 5
    assert store.published == {str(fill.digest): DATA}
    stalled.close()


def test_serving_counts_a_client_once_however_often_its_reader_is_closed(tmp_path):
    fills = Fills(Settings(spool_dir=str(tmp_path), upload_hold_seconds=0.5), RecordingStore())
    fill = fills.reserve(_digest(DATA))
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [])
    first = fills.hold.serving(FillReader(fill, 0, MIB, hold_tail=False))
    second = fills.hold.serving(FillReader(fill, 0, MIB, hold_tail=False))
    first.close()
    first.close()  # WSGI servers may close twice
    started = time.monotonic()
    fill.done.wait(10)
    assert time.monotonic() - started > 0.4  # still held: the second client is there
    second.close()


def test_a_held_upload_waits_for_a_quiet_host_and_goes_at_once_when_the_worker_stops(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(holds, "QUIET_SECONDS", 0.3)
    fills = Fills(Settings(spool_dir=str(tmp_path), upload_hold_seconds=30), RecordingStore())
    fills.hold.busy(+1)  # a download, say
    fills.hold.busy(-1)
    assert 0.25 < fills.hold.wait() < 2  # quiet for 0.3 s
    assert fills.hold.wait() < 0.1  # idle for long enough already
    fills.hold.busy(+1)
    fills.hold.busy(-1)
    comeback = gevent.spawn_later(0.2, fills.hold.busy, +1)  # the pull's next blob, a moment later
    gevent.spawn_later(0.4, fills.hold.busy, -1)
    assert 0.6 < fills.hold.wait() < 3
    assert comeback.dead
    fills.hold.busy(+1)  # a client that stays
    stop = gevent.spawn_later(0.3, fills.drain, 5)
    assert 0.25 < fills.hold.wait() < 2  # no longer held once the worker drains
    stop.join()


# --- blobs without Content-Length, and canonical digests (issue #13 §6) -------------------------


def test_a_body_longer_than_the_size_breaks_the_fill_before_it_spools_past_the_size(tmp_path):
    store = RecordingStore()
    _, fill = _fill(tmp_path, store, _chunks(DATA + b"more"))
    with pytest.raises(AbortResponse):
        _read(FillReader(fill, 0, len(DATA), hold_tail=True))
    fill.done.wait(10)
    assert store.published == {} and "more than" in fill.broken
    assert fill.spool.written <= len(DATA)


@pytest.mark.parametrize("canonical_matches", [True, False])
def test_a_fill_with_a_canonical_digest_is_verified_only_when_both_digests_match(
    canonical_matches, tmp_path
):
    store = RecordingStore()
    digest = Digest("sha512", hashlib.sha512(DATA).hexdigest())
    canonical = _digest(DATA if canonical_matches else b"other bytes")
    fills = Fills(Settings(spool_dir=str(tmp_path)), store)
    fill = fills.reserve(digest, canonical)
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [])
    fill.done.wait(10)
    if canonical_matches:
        assert fill.verified and store.published == {str(digest): DATA}
        assert store.canonical == {str(digest): canonical}
    else:
        assert not fill.verified and fill.result == "digest_mismatch"
        assert store.published == {}


def test_a_fill_knows_its_canonical_digest_from_its_reservation_and_says_when_its_spool_closed(
    tmp_path,
):
    digest = Digest("sha512", hashlib.sha512(DATA).hexdigest())
    fills = Fills(Settings(spool_dir=str(tmp_path)), RecordingStore())
    fill = fills.reserve(digest, _digest(DATA))
    assert fill.canonical == _digest(DATA)  # before it began: its first joiners may check it
    assert fill.begin(FakeResponse(_chunks()), len(DATA), [])
    assert fill.readable
    fill.done.wait(10)
    assert not fill.readable  # over, and read by no one: a late joiner must not attach
