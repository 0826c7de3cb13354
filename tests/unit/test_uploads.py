"""Uploads: one per digest per worker, a cap per worker, and part sizes that fit S3's limits."""

import gevent

from bloblo.names import Digest
from bloblo.storage import MIB, part_size
from bloblo.uploads import Uploads


class BlockingStore:
    """Stands in for S3: an upload reads its pipe to the end (as boto3 would) and records it."""

    def __init__(self, available=True):
        self.uploaded, self._available = [], available

    def available(self):
        return self._available

    def upload(self, pipe, digest, size):
        while pipe.read(MIB):
            pass
        self.uploaded.append(str(digest))

    def report_failure(self, exc):
        raise AssertionError(exc)


def _digest(n: int) -> Digest:
    return Digest("sha256", f"{n:064x}")


def test_one_upload_per_digest_and_at_most_the_cap_at_once():
    store = BlockingStore()
    uploads = Uploads(store, max_uploads=2, buffer_bytes=MIB, stall_seconds=5)
    first = uploads.start(_digest(1), 10)
    assert first is not None
    assert uploads.start(_digest(1), 10) is None  # the same blob is already on its way
    second = uploads.start(_digest(2), 10)
    assert second is not None
    assert uploads.start(_digest(3), 10) is None  # the cap: streamed without caching
    for pipe in (first, second):
        pipe.write(b"0123456789")
        pipe.finish()
    gevent.wait(timeout=5)
    assert sorted(store.uploaded) == [str(_digest(1)), str(_digest(2))]
    assert uploads.in_flight() == 0
    assert uploads.start(_digest(3), 10) is not None  # room again


def test_nothing_is_uploaded_while_storage_is_unavailable():
    assert Uploads(BlockingStore(available=False), 4, MIB, 5).start(_digest(1), 10) is None


def test_part_size_keeps_any_blob_within_s3s_part_count():
    assert part_size(None) == part_size(0) == part_size(100 * MIB) == 8 * MIB
    for size in (78 * 1024 * MIB, 200 * 1024 * MIB, 5 * 1024 * 1024 * MIB):
        part = part_size(size)
        assert part % MIB == 0 and part >= 8 * MIB
        assert -(-size // part) <= 10_000
