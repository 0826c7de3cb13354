"""A client's body read from a fill (bloblo/readers.py): when the fill ends broken under it, the
reader continues from the upstream for what the client lacks (issue #13, part 3), and a whole
blob is still never handed out complete and wrong."""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest
from gevent.event import Event

from bloblo import readers as readers_module
from bloblo.errors import AbortResponse
from bloblo.names import Digest
from bloblo.readers import TAIL, FillReader

DATA = os.urandom(3 * readers_module.CHUNK + 12_345)
DIGEST = Digest("sha256", hashlib.sha256(DATA).hexdigest())
HALF = len(DATA) // 2


class FakeFill:
    """A fill that has written `written` bytes of DATA (readers.FillView)."""

    def __init__(
        self, written: int, broken: str | None = None, refuted: bool = False, data: bytes = DATA
    ):
        self.data, self.digest = data, Digest("sha256", hashlib.sha256(data).hexdigest())
        self.size, self.written, self.readable = len(data), written, True
        self.verified, self.broken, self.refuted = False, broken, refuted
        self.progress = Event()
        self.readers = 0

    def attach(self) -> None:
        self.readers += 1

    def detach(self) -> None:
        self.readers -= 1

    def read_spool(self, position: int, count: int) -> bytes:
        if position + count > self.written:  # as the spools do
            raise AbortResponse(f"read of {position}+{count} past the {self.written} written")
        return self.data[position : position + count]


class Upstream:
    """resume(start, stop) as blobs.py gives it: the upstream's bytes, recorded."""

    def __init__(self, data: bytes = DATA):
        self.data, self.asked = data, []

    def __call__(self, start: int, stop: int):
        self.asked.append((start, stop))
        yield from (self.data[i : min(i + 100_000, stop)] for i in range(start, stop, 100_000))


def _read(reader: FillReader) -> bytes:
    got = bytearray()
    try:
        for chunk in reader:
            got += chunk
    except AbortResponse:
        raise _Short(bytes(got)) from None
    finally:
        reader.close()
    return bytes(got)


class _Short(Exception):
    def __init__(self, got: bytes):
        self.got = got


def test_a_client_of_a_fill_that_broke_gets_the_rest_from_the_upstream():
    fill, upstream = FakeFill(HALF, broken="the spool's disk is full"), Upstream()
    assert _read(FillReader(fill, 0, len(DATA), True, upstream)) == DATA
    assert upstream.asked == [(HALF, len(DATA))]  # only what the client lacked
    assert fill.readers == 0


def test_a_range_continues_from_where_the_fill_left_it():
    fill, upstream = FakeFill(HALF, broken="killed"), Upstream()
    start, stop = 1000, HALF + 5000
    assert _read(FillReader(fill, start, stop, False, upstream)) == DATA[start:stop]
    assert upstream.asked == [(HALF, stop)]


def test_a_rest_that_makes_a_wrong_blob_never_completes_it():
    wrong = DATA[:-1] + bytes([DATA[-1] ^ 1])
    fill = FakeFill(HALF, broken="cut off")
    with pytest.raises(_Short) as short:
        _read(FillReader(fill, 0, len(DATA), True, Upstream(wrong)))
    assert len(short.value.got) <= len(DATA) - TAIL  # the tail was held, and never sent


def test_a_short_rest_is_a_short_read():
    fill = FakeFill(HALF, broken="cut off")
    with pytest.raises(_Short):
        _read(FillReader(fill, 0, len(DATA), True, Upstream(DATA[: len(DATA) - 10])))


def test_a_fill_refuted_by_its_digest_is_not_resumed():
    fill, upstream = FakeFill(len(DATA), broken="content hashes to …", refuted=True), Upstream()
    with pytest.raises(_Short):
        _read(FillReader(fill, 0, len(DATA), True, upstream))
    assert upstream.asked == []


def test_without_an_upstream_to_resume_from_a_broken_fill_is_a_short_read():
    with pytest.raises(_Short) as short:
        _read(FillReader(FakeFill(HALF, broken="cut off"), 0, len(DATA), True))
    assert short.value.got == DATA[:HALF]


def test_a_fill_that_stops_moving_is_left_for_the_upstream(monkeypatch):
    monkeypatch.setattr(readers_module, "STALL_SECONDS", 0.2)
    fill, upstream = FakeFill(HALF), Upstream()  # running, but nothing more comes
    reading = gevent.spawn(_read, FillReader(fill, 0, len(DATA), True, upstream))
    assert reading.get(timeout=5) == DATA
    assert upstream.asked == [(HALF, len(DATA))]


def test_a_range_to_the_end_that_starts_past_what_the_fill_got_is_resumed_from_there():
    # containerd's `bytes=N-` chunks join a fill that then breaks before reaching N.
    fill, upstream = FakeFill(readers_module.CHUNK, broken="cut off"), Upstream()
    start = 2 * readers_module.CHUNK + 10
    assert _read(FillReader(fill, start, len(DATA), True, upstream)) == DATA[start:]
    # Asked from what the spool holds: the blob is hashed whole before its tail goes.
    assert upstream.asked == [(readers_module.CHUNK, len(DATA))]


def test_an_empty_blob_whose_fill_broke_asks_the_upstream_nothing():
    fill, upstream = FakeFill(0, broken="cut off", data=b""), Upstream(b"")
    assert _read(FillReader(fill, 0, 0, True, upstream)) == b""
    assert upstream.asked == []
