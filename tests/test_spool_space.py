"""Issue #13 §3, the spool's disk: a fill reserves its spool's disk before it begins, so a disk
that is too full refuses the blob at once (streamed whole from the upstream, uncached) instead
of breaking the fill halfway; and a blob that does not fit the spool budget is counted and named
in the log, once per digest and worker, with the setting to raise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack.cache import blob_key, bucket_keys
from tests.stack.disks import small_filesystem
from tests.stack.downloads import fetch
from tests.stack.images import BigBlob, push_big_blob, unique_tag
from tests.stack.procs import poll
from tests.stack.regclient import RegistryClient
from tests.stack.scrape import delta, scrape

MIB = 1024 * 1024
REPO = "team/app"
SKIPPED = "bloblo_fills_skipped_total"


def _push_blob(registry, size: int, workdir: Path) -> BigBlob:
    workdir.mkdir(exist_ok=True)
    client = RegistryClient(registry.url)
    try:
        return push_big_blob(client, REPO, unique_tag(), size, workdir)
    finally:
        client.close()


def _url(bloblo, blob: BigBlob) -> str:
    return f"{bloblo.url}/v2/{REPO}/blobs/{blob.digest}"


@pytest.fixture
def small_spool_disk(tmp_path) -> Iterator[Path]:
    """A spool directory on a 4 MiB filesystem (requested before start_bloblo, it is unmounted
    after bloblo stopped)."""
    with small_filesystem(tmp_path / "spool", 4 * MIB) as directory:
        yield directory


def test_a_blob_larger_than_the_free_spool_disk_is_answered_whole_from_the_upstream(
    small_spool_disk, plain_registry, s3, bucket, start_bloblo, tmp_path
):
    big = _push_blob(plain_registry, 8 * MIB, tmp_path / "big")
    small = _push_blob(plain_registry, 1 * MIB, tmp_path / "small")
    bloblo = start_bloblo(plain_registry, BLOBLO_SPOOL_DIR=str(small_spool_disk))
    before = scrape(bloblo)

    for _ in range(2):  # every time, not only once the first fill broke
        got = fetch(_url(bloblo, big), keep=False)
        assert (got.status, got.complete, got.digest) == (200, True, big.digest)
    after = scrape(bloblo)
    assert delta(before, after, SKIPPED, reason="spool_disk") == 2
    assert delta(before, after, "bloblo_blob_requests_total", outcome="upstream") == 2
    assert delta(before, after, "bloblo_fills_total", result="aborted") == 0
    said = [line for line in bloblo.log_text().splitlines() if big.digest in line]
    assert any("no room" in line and "BLOBLO_SPOOL_DIR" in line for line in said), said
    assert not [p for p in small_spool_disk.iterdir() if p.suffix == ".spool"]

    # A blob the disk has room for is still cached there.
    got = fetch(_url(bloblo, small), keep=False)
    assert (got.status, got.complete, got.digest) == (200, True, small.digest)
    assert poll(lambda: bucket_keys(s3, bucket) == [blob_key(small.digest)], timeout=30)


def test_a_blob_larger_than_the_spool_budget_is_counted_and_named_once_in_the_log(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob = _push_blob(plain_registry, 2 * MIB, tmp_path)
    bloblo = start_bloblo(plain_registry, BLOBLO_SPOOL_MAX_MB="1")
    before = scrape(bloblo)

    for _ in range(2):
        got = fetch(_url(bloblo, blob), keep=False)
        assert (got.status, got.complete, got.digest) == (200, True, blob.digest)
    after = scrape(bloblo)
    assert delta(before, after, SKIPPED, reason="spool_budget") == 2
    assert delta(before, after, "bloblo_blob_requests_total", outcome="upstream") == 2
    warnings = [
        line
        for line in bloblo.log_text().splitlines()
        if blob.digest in line and "BLOBLO_SPOOL_MAX_MB" in line
    ]
    assert len(warnings) == 1, bloblo.log_text()[-3000:]
    assert "[WARNING]" in warnings[0]
    assert bucket_keys(s3, bucket) == []
