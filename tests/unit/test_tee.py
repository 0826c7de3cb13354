"""The tee hands the client only a verified blob and lets the upload publish only that."""

import hashlib

import pytest

from bloblo.errors import AbortResponse
from bloblo.names import Digest
from bloblo.tee import verified_stream


class RecordingFeed:
    def __init__(self):
        self.data, self.finished, self.aborted = b"", False, None

    def write(self, chunk):
        self.data += chunk

    def finish(self):
        self.finished = True

    def abort(self, reason):
        self.aborted = reason


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def _chunks(data: bytes, size: int = 1000):
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_a_right_blob_reaches_client_and_feed_and_is_published():
    blob, feed = bytes(range(256)) * 40, RecordingFeed()
    got = b"".join(verified_stream(_chunks(blob), _digest(blob), len(blob), feed))
    assert got == blob == feed.data
    assert feed.finished and feed.aborted is None


def test_a_wrong_blob_is_cut_short_and_never_published():
    blob, feed = b"x" * 5000, RecordingFeed()
    received = []
    with pytest.raises(AbortResponse):
        for chunk in verified_stream(_chunks(blob), _digest(b"y" * 5000), 5000, feed):
            received.append(chunk)
    assert len(b"".join(received)) < len(blob)  # the last chunk was held back
    assert not feed.finished and feed.aborted


def test_a_short_blob_is_cut_and_never_published():
    blob, feed = b"z" * 3000, RecordingFeed()
    with pytest.raises(AbortResponse, match="3000 bytes of 4000"):
        list(verified_stream(_chunks(blob), _digest(blob), 4000, feed))
    assert feed.aborted and not feed.finished


def test_a_client_that_goes_away_aborts_the_upload():
    blob, feed = b"q" * 5000, RecordingFeed()
    stream = verified_stream(_chunks(blob), _digest(blob), len(blob), feed)
    next(stream)
    next(stream)
    stream.close()
    assert feed.aborted and not feed.finished
