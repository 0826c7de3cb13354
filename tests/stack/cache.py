"""What bloblo's bucket holds: the helpers tests use to look into it and to fill it by hand."""

from __future__ import annotations

import hashlib

from tests.stack.s3 import S3Server


def blob_key(digest: str) -> str:
    """The object key bloblo stores a blob under (no BLOBLO_S3_PREFIX)."""
    return "blobs/" + digest.replace(":", "/", 1)


def cached(s3: S3Server, bucket: str, digest: str) -> bytes | None:
    """The bytes cached for digest, or None when the bucket has no such object."""
    client = s3.client()
    try:
        return client.get_object(Bucket=bucket, Key=blob_key(digest))["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def bucket_keys(s3: S3Server, bucket: str) -> list[str]:
    """Every key in the bucket, sorted."""
    listing = s3.client().list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def assert_nothing_published(s3: S3Server, bucket: str) -> None:
    """No object, and no multipart upload left open either."""
    assert bucket_keys(s3, bucket) == []
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def put_in_cache(
    s3: S3Server,
    bucket: str,
    data: bytes,
    algorithm: str = "sha256",
    canonical: str | None = None,
) -> str:
    """Put data in the bucket as a cached blob under its `algorithm` digest, as bloblo would
    (with the registry's `canonical` digest of it, when given); return its digest."""
    digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    metadata = {"canonical-digest": canonical} if canonical else {}
    s3.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=data, Metadata=metadata)
    return digest
