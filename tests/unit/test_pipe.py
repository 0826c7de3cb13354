"""The pipe between tee and upload: whole reads, abort on anything but a verified end, no stall."""

import time

import gevent
import pytest

from bloblo.uploads import Pipe, UploadAborted


def _writer(pipe, data, chunk=64 * 1024, then="finish"):
    for i in range(0, len(data), chunk):
        pipe.write(data[i : i + chunk])
    getattr(pipe, then)(*(["test"] if then == "abort" else []))


def test_read_returns_whole_parts_until_the_verified_end():
    pipe, data = Pipe(stall_seconds=5), bytes(range(256)) * 20_000  # 5 MB, more than the pipe
    writer = gevent.spawn(_writer, pipe, data)
    parts = []
    while part := pipe.read(1_000_000):
        parts.append(part)
    writer.join()
    assert [len(p) for p in parts[:-1]] == [1_000_000] * (len(parts) - 1)
    assert b"".join(parts) == data


def test_read_all_for_a_single_put():
    pipe = Pipe(stall_seconds=5)
    gevent.spawn(_writer, pipe, b"small blob")
    assert pipe.read() == b"small blob"


def test_an_aborted_stream_raises_instead_of_ending():
    pipe = Pipe(stall_seconds=5)
    gevent.spawn(_writer, pipe, b"a" * 100_000, then="abort")
    with pytest.raises(UploadAborted):
        while pipe.read(30_000):
            pass


def test_a_writer_that_vanishes_without_finishing_is_not_a_clean_end():
    pipe = Pipe(stall_seconds=5)
    pipe.write(b"partial")
    pipe._close_writer()
    with pytest.raises(UploadAborted):
        pipe.read(100)


def test_a_stalled_reader_costs_the_writer_at_most_the_stall_time():
    pipe = Pipe(stall_seconds=0.3)
    started = time.monotonic()
    for _ in range(64):  # 16 MiB: far more than the pipe holds, and nobody reads
        pipe.write(b"s" * 256 * 1024)
    assert time.monotonic() - started < 10  # without the stall bound it would hang
    assert "stalled" in pipe.abort_reason
    with pytest.raises(UploadAborted):
        pipe.read(10)


def test_a_reader_that_closes_early_releases_the_writer():
    pipe = Pipe(stall_seconds=30)
    pipe.close()
    pipe.write(b"x" * 2_000_000)
    assert pipe.abort_reason == "the S3 upload ended early"
