"""The feed from tee to upload: whole reads, a clean end only when finished, a slow upload
spooled to disk instead of slowing the client, and a bounded wait when it falls too far behind."""

import time

import gevent
import pytest

from bloblo.uploads import Feed, Pipe, UploadAborted

MIB = 1024 * 1024


def _feed(buffer_bytes=64 * MIB, stall_seconds=5.0):
    pipe = Pipe()
    return pipe, Feed(pipe, buffer_bytes, stall_seconds)


def _write_all(feed, data, chunk=MIB):
    for i in range(0, len(data), chunk):
        feed.write(data[i : i + chunk])


def _read_all(pipe, size=MIB):
    parts = []
    while part := pipe.read(size):
        parts.append(part)
    return parts


def test_read_returns_whole_parts_until_the_verified_end():
    pipe, feed = _feed()
    data = bytes(range(256)) * 20_000  # 5 MB, more than the pipe holds

    def writer():
        _write_all(feed, data, chunk=64 * 1024)
        feed.finish()

    gevent.spawn(writer)
    parts = _read_all(pipe, 1_000_000)
    assert [len(p) for p in parts[:-1]] == [1_000_000] * (len(parts) - 1)
    assert b"".join(parts) == data


def test_read_all_for_a_single_put():
    pipe, feed = _feed()
    feed.write(b"small blob")
    feed.finish()
    assert pipe.read() == b"small blob"


def test_a_slow_upload_never_holds_the_writer_back_and_gets_every_byte_in_order():
    pipe, feed = _feed()
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB, sixteen times the pipe
    started = time.monotonic()
    _write_all(feed, data)  # nobody reads yet: all but the pipe's share goes to the spool
    feed.finish()
    assert time.monotonic() - started < 5  # it did not wait for a reader
    assert b"".join(_read_all(pipe)) == data


def test_an_aborted_stream_raises_instead_of_ending():
    pipe, feed = _feed()
    _write_all(feed, b"a" * (4 * MIB))
    feed.abort("test")
    with pytest.raises(UploadAborted, match="test"):
        _read_all(pipe)


def test_a_writer_that_vanishes_without_finishing_is_not_a_clean_end():
    pipe = Pipe()
    pipe.write_nowait(memoryview(b"partial"))
    pipe._close_writer()
    with pytest.raises(UploadAborted):
        pipe.read(100)


def test_an_upload_that_falls_too_far_behind_is_dropped_after_the_stall_time():
    pipe, feed = _feed(buffer_bytes=2 * MIB, stall_seconds=0.3)
    started = time.monotonic()
    _write_all(feed, b"s" * (16 * MIB))  # nobody reads: the spool fills, then the upload goes
    assert time.monotonic() - started < 10  # without the stall bound it would hang
    assert "stalled" in pipe.abort_reason
    with pytest.raises(UploadAborted):
        pipe.read(10)


def test_a_reader_that_closes_early_releases_the_writer():
    pipe, feed = _feed(buffer_bytes=2 * MIB, stall_seconds=30)
    pipe.close()
    _write_all(feed, b"x" * (8 * MIB))
    assert pipe.abort_reason == "the S3 upload ended early"


def test_a_spool_that_cannot_be_written_drops_the_upload_not_the_stream(monkeypatch):
    pipe, feed = _feed()

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bloblo.uploads.os.pwrite", disk_full)
    _write_all(feed, b"d" * (4 * MIB))  # more than the pipe: it must spool, and cannot
    assert "No space left" in pipe.abort_reason
    with pytest.raises(UploadAborted):
        _read_all(pipe)
