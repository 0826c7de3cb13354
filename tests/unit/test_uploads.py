"""Part sizes that keep any blob within S3's limits."""

from bloblo.storage import MIB, part_size


def test_part_size_keeps_any_blob_within_s3s_part_count():
    assert part_size(None) == part_size(0) == part_size(100 * MIB) == 8 * MIB
    for size in (78 * 1024 * MIB, 200 * 1024 * MIB, 5 * 1024 * 1024 * MIB):
        part = part_size(size)
        assert part % MIB == 0 and part >= 8 * MIB
        assert -(-size // part) <= 10_000
