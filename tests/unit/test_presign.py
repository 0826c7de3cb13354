"""A presigned URL is handed out again for a short part of its life (issue #14: the signature
was 15% of a warm redirect's CPU), never with less than 95% of its expiry left."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from bloblo.config import Settings
from bloblo.names import parse_digest
from bloblo.storage import BlobStore

A = parse_digest("sha256:" + "a" * 64)
B = parse_digest("sha256:" + "b" * 64)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, expires: int) -> BlobStore:
    return BlobStore(
        Settings(
            s3_bucket="bucket",
            s3_endpoint_url="http://127.0.0.1:9",
            s3_public_endpoint_url="http://127.0.0.1:9",
            s3_region="us-east-1",
            s3_access_key="key",
            s3_secret_key="secret",
            presign_expires=expires,
        ),
        wall_clock=clock,
    )


def _count_signatures(store: BlobStore) -> list[int]:
    """A counter of the signatures botocore makes for store (wrapping its presigner)."""
    signed = [0]
    presign = store._presigner.generate_presigned_url

    def counting(*args, **kwargs):
        signed[0] += 1
        return presign(*args, **kwargs)

    store._presigner.generate_presigned_url = counting
    return signed


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_a_url_is_handed_out_again_for_a_twentieth_of_its_life_at_most_a_minute():
    clock = Clock()
    store = _store(clock, expires=1200)  # 5% of 1200 s: 60 s
    signed = _count_signatures(store)
    first = store.presigned_url(A)
    clock.now += 59
    assert store.presigned_url(A) == first and signed == [1]
    clock.now += 2  # 61 s after: a new signature, again for the whole expiry
    assert _expires(store.presigned_url(A)) == 1200 and signed == [2]


def test_a_short_expiry_is_reused_for_a_twentieth_of_it():
    clock = Clock()
    store = _store(clock, expires=100)  # 5 s
    signed = _count_signatures(store)
    first = store.presigned_url(A)
    clock.now += 4.9
    assert store.presigned_url(A) == first and signed == [1]
    clock.now += 0.2
    store.presigned_url(A)
    assert signed == [2]


def test_each_blob_has_its_own_url():
    store = _store(Clock(), expires=1200)
    a, b = store.presigned_url(A), store.presigned_url(B)
    assert a != b and "/blobs/sha256/" + "a" * 64 in a and "/blobs/sha256/" + "b" * 64 in b
    assert store.presigned_url(A) == a
