"""The pipe from a fill to its upload, and the reader S3 takes its bytes from: whole reads, a
clean end only when finished and verified at the last boundary (issue #7)."""

import hashlib
import os
import tempfile

import gevent
import pytest

from bloblo.names import Digest
from bloblo.uploads import Pipe, UploadAborted, VerifiedReader

MIB = 1024 * 1024


def _write_all(pipe, data, chunk=64 * 1024, finish=True):
    """Splice data into the pipe from a file, chunk by chunk, as a fill's pump does."""
    with tempfile.TemporaryFile() as spool:
        spool.write(data)
        spool.flush()
        for i in range(0, len(data), chunk):
            pipe.splice(spool.fileno(), i, min(chunk, len(data) - i))
    if finish:
        pipe.finish()


def _read_all(reader, size=MIB):
    parts = []
    while part := reader.read(size):
        parts.append(part)
    return parts


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def test_read_returns_whole_parts_until_the_end():
    pipe = Pipe()
    data = bytes(range(256)) * 20_000  # 5 MB, more than the pipe holds
    gevent.spawn(_write_all, pipe, data)
    parts = _read_all(pipe, 1_000_000)
    assert [len(p) for p in parts[:-1]] == [1_000_000] * (len(parts) - 1)
    assert b"".join(parts) == data


def test_read_all_for_a_single_put():
    pipe = Pipe()
    _write_all(pipe, b"small blob")
    assert pipe.read() == b"small blob"


def test_an_aborted_stream_raises_instead_of_ending():
    pipe = Pipe()
    gevent.spawn(lambda: (_write_all(pipe, b"a" * (4 * MIB), finish=False), pipe.abort("test")))
    with pytest.raises(UploadAborted, match="test"):
        _read_all(pipe)


def test_a_writer_that_vanishes_without_finishing_is_not_a_clean_end():
    pipe = Pipe()
    _write_all(pipe, b"partial", finish=False)
    pipe._close_writer()
    with pytest.raises(UploadAborted):
        pipe.read(100)


def test_a_reader_that_closes_early_releases_the_writer():
    pipe = Pipe()
    pipe.close()
    _write_all(pipe, b"x" * (4 * MIB), finish=False)
    assert pipe.abort_reason == "the S3 upload ended early"


def test_s3_gets_a_clean_end_only_for_the_blob_itself():
    data = bytes(range(256)) * 40_000
    pipe = Pipe()
    gevent.spawn(_write_all, pipe, data)
    reader = VerifiedReader(pipe, _digest(data), len(data))
    assert b"".join(_read_all(reader, 8 * MIB)) == data


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"w" * 3_000_000, "hashing to"),
        (b"r" * 2_999_999, "2999999 bytes of 3000000"),
        (b"r" * 3_000_001, "3000001 bytes of 3000000"),
    ],
)
def test_s3_never_gets_a_clean_end_for_other_bytes(sent, why):
    real = b"r" * 3_000_000
    pipe = Pipe()
    gevent.spawn(_write_all, pipe, sent)
    reader = VerifiedReader(pipe, _digest(real), len(real))
    with pytest.raises(UploadAborted, match=why):
        _read_all(reader, MIB)


def test_a_single_put_read_is_verified_too():
    pipe = Pipe()
    _write_all(pipe, b"not the blob")
    with pytest.raises(UploadAborted):
        VerifiedReader(pipe, _digest(b"the blob...."), 12).read()


def _splice_all(pipe, fd, size, chunk=MIB):
    moved = 0
    while moved < size:
        step = pipe.splice(fd, moved, min(chunk, size - moved))
        moved += step
        if step < min(chunk, size - moved + step):
            break
    pipe.finish()
    return moved


def test_splice_moves_a_files_bytes_into_the_pipe_in_order():
    data = os.urandom(5 * MIB + 123)  # more than the pipe holds: the splice waits for room
    with tempfile.TemporaryFile() as spool:
        spool.write(data)
        spool.flush()
        pipe = Pipe()
        writer = gevent.spawn(_splice_all, pipe, spool.fileno(), len(data))
        assert b"".join(_read_all(pipe)) == data
        assert writer.get() == len(data)


def test_splice_past_the_end_of_the_file_moves_what_there_is():
    with tempfile.TemporaryFile() as spool:
        spool.write(b"x" * 1000)
        spool.flush()
        pipe = Pipe()
        assert pipe.splice(spool.fileno(), 0, 4000) == 1000
        assert pipe.splice(spool.fileno(), 1000, 10) == 0
