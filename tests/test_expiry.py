"""Issue #8, part 6: expiry that works. A deleted object stops being redirected to within
BLOBLO_CACHE_CHECK_SECONDS (at most 60); with BLOBLO_CACHE_REFRESH_SECONDS an object still in use
is copied in place, so that a lifecycle rule counting days since the last write spares it; a
presigned URL never outlives the temporary credentials that signed it.

Real docker-registry, real LocalStack, bloblo under gunicorn; the credential_process of the last
tests is the one boto3 runs for temporary credentials (as SSO, vault and friends do)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.stack.cache import blob_key, cached
from tests.stack.images import push_big_blob, unique_tag
from tests.stack.procs import poll
from tests.stack.regclient import RegistryClient

MIB = 1024 * 1024


def _cached_blob(registry, bloblo, s3, bucket, tmp_path, size=2 * MIB):
    """A fresh blob pushed to registry and filled into the bucket through bloblo."""
    tmp_path.mkdir(exist_ok=True)
    blob = push_big_blob(RegistryClient(registry.url), "team/app", unique_tag(), size, tmp_path)
    url = f"{bloblo.url}/v2/team/app/blobs/{blob.digest}"
    first = requests.get(url, allow_redirects=False, timeout=60)
    assert first.status_code == 200
    assert hashlib.sha256(first.content).hexdigest() == blob.digest.split(":")[1]
    poll(lambda: cached(s3, bucket, blob.digest) is not None, timeout=30)
    return blob, url


def _last_modified(s3, bucket, digest):
    return s3.client().head_object(Bucket=bucket, Key=blob_key(digest))["LastModified"]


def test_a_deleted_object_is_no_longer_redirected_to_within_the_check_interval(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    bloblo = start_bloblo(plain_registry, BLOBLO_CACHE_CHECK_SECONDS="2")
    blob, url = _cached_blob(plain_registry, bloblo, s3, bucket, tmp_path / "a")
    other, other_url = _cached_blob(plain_registry, bloblo, s3, bucket, tmp_path / "b")
    assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307

    s3.client().delete_object(Bucket=bucket, Key=blob_key(blob.digest))
    deleted_at = time.monotonic()
    while True:  # redirects (to a missing object) last at most the check interval
        # Another blob's lookups keep S3 answering, as in a busy worker.
        assert requests.get(other_url, allow_redirects=False, timeout=30).status_code == 307
        answer = requests.get(url, allow_redirects=False, timeout=60)
        if answer.status_code != 307:
            break
        assert time.monotonic() - deleted_at < 2 + 1.5, "still redirected to a deleted object"
        time.sleep(0.1)
    assert answer.status_code == 200  # from the upstream, through a fresh fill
    assert hashlib.sha256(answer.content).hexdigest() == blob.digest.split(":")[1]
    poll(lambda: cached(s3, bucket, blob.digest) is not None, timeout=30)  # filled again
    assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307
    # Without BLOBLO_CACHE_REFRESH_SECONDS nothing is copied in place.
    assert "bloblo_cache_refreshes_total{" not in requests.get(f"{bloblo.url}/metrics").text


def test_an_object_in_use_is_refreshed_by_a_copy_in_place(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    bloblo = start_bloblo(
        plain_registry, BLOBLO_CACHE_REFRESH_SECONDS="2", BLOBLO_CACHE_CHECK_SECONDS="0"
    )
    blob, url = _cached_blob(plain_registry, bloblo, s3, bucket, tmp_path)
    written = _last_modified(s3, bucket, blob.digest)
    assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307
    time.sleep(0.5)
    assert _last_modified(s3, bucket, blob.digest) == written  # younger than 2 s: left alone

    time.sleep(3)  # S3's LastModified has a resolution of one second
    assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307
    poll(lambda: _last_modified(s3, bucket, blob.digest) > written, timeout=30)
    head = s3.client().head_object(Bucket=bucket, Key=blob_key(blob.digest))
    assert head["ContentType"] == "application/octet-stream"
    assert hashlib.sha256(cached(s3, bucket, blob.digest)).hexdigest() == blob.digest.split(":")[1]
    metrics = requests.get(f"{bloblo.url}/metrics", timeout=30).text
    assert 'bloblo_cache_refreshes_total{result="copied"} 1.0' in metrics


def test_a_refresh_that_failed_is_not_retried_on_every_redirect(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    bloblo = start_bloblo(
        plain_registry, BLOBLO_CACHE_REFRESH_SECONDS="1", BLOBLO_CACHE_CHECK_SECONDS="60"
    )
    blob, url = _cached_blob(plain_registry, bloblo, s3, bucket, tmp_path)
    assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307  # remembered
    client = s3.client()  # made before: the steps below must fit in the worker's 2 s of trust
    time.sleep(1.2)  # older than BLOBLO_CACHE_REFRESH_SECONDS
    # Gone behind the worker's back: the copy in place fails (no source), the redirect stands.
    client.delete_object(Bucket=bucket, Key=blob_key(blob.digest))
    failed = 'bloblo_cache_refreshes_total{result="failed"} 1.0'
    for _ in range(5):
        assert requests.get(url, allow_redirects=False, timeout=30).status_code == 307
        poll(lambda: failed in requests.get(f"{bloblo.url}/metrics").text, timeout=30)
    assert "could not refresh" in bloblo.log_text() and "next try in 300s" in bloblo.log_text()


def _store(s3, bucket, **settings):
    """A BlobStore of this test process on the test bucket (boto3's credential chain decides)."""
    from bloblo.config import Settings
    from bloblo.storage import BlobStore

    return BlobStore(
        Settings(
            s3_bucket=bucket,
            s3_endpoint_url=s3.endpoint_url,
            s3_public_endpoint_url=s3.endpoint_url,
            s3_region="us-east-1",
            **settings,
        )
    )


def test_an_object_above_the_copy_limit_is_refreshed_in_parts(s3, bucket, monkeypatch):
    from bloblo.names import parse_digest

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    data = os.urandom(11 * MIB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    metadata = {"canonical-digest": "sha512:" + hashlib.sha512(data).hexdigest()}
    s3.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=data, Metadata=metadata)
    written = _last_modified(s3, bucket, digest)
    time.sleep(1.1)

    _store(s3, bucket).refresh(parse_digest(digest), largest_copy=5 * MIB)  # 5 + 5 + 1 MiB

    head = s3.client().head_object(Bucket=bucket, Key=blob_key(digest))
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of three parts
    assert head["LastModified"] > written
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == metadata  # the pair a canonical digest is checked against
    assert cached(s3, bucket, digest) == data
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_refresh_keeps_the_objects_canonical_digest(s3, bucket, monkeypatch):
    from bloblo.names import parse_digest

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    data = os.urandom(1000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    metadata = {"canonical-digest": "sha256:" + hashlib.sha256(data).hexdigest()}
    s3.client().put_object(Bucket=bucket, Key=blob_key(digest), Body=data, Metadata=metadata)

    _store(s3, bucket).refresh(parse_digest(digest))

    assert s3.client().head_object(Bucket=bucket, Key=blob_key(digest))["Metadata"] == metadata


@pytest.fixture
def temporary_credentials(tmp_path, monkeypatch):
    """boto3 gets credentials from a credential_process that expires them in 900 s."""
    script = tmp_path / "credentials.py"
    script.write_text(
        "import datetime, json\n"
        "expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=900)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': 'test', 'SecretAccessKey': 'test',\n"
        "    'SessionToken': 'session-token', 'Expiration': expiry.isoformat()}))\n"
    )
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    return config


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])


def test_a_presigned_url_never_outlives_temporary_credentials(s3, bucket, temporary_credentials):
    from bloblo.names import parse_digest

    data = b"a blob signed with temporary credentials\n"
    digest = parse_digest("sha256:" + hashlib.sha256(data).hexdigest())
    store = _store(s3, bucket, presign_expires=3600)
    store.put(digest, data)

    url = store.presigned_url(digest)
    assert 850 <= _expires(url) <= 900  # capped at the credentials' 900 s, not 3600
    assert "X-Amz-Security-Token=session-token" in url
    fetched = requests.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content == data


def test_static_credentials_keep_the_configured_expiry(s3, bucket, monkeypatch):
    from bloblo.names import parse_digest

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    digest = parse_digest("sha256:" + "0" * 64)
    assert _expires(_store(s3, bucket, presign_expires=3600).presigned_url(digest)) == 3600


def test_bloblo_redirects_with_urls_capped_at_its_temporary_credentials(
    plain_registry, s3, bucket, start_bloblo, tmp_path, temporary_credentials
):
    bloblo = start_bloblo(
        plain_registry,
        AWS_ACCESS_KEY_ID="",  # no static keys: boto3's chain reaches the credential_process
        AWS_SECRET_ACCESS_KEY="",
        AWS_CONFIG_FILE=str(temporary_credentials),
        BLOBLO_PRESIGN_EXPIRES="3600",
    )
    blob, url = _cached_blob(plain_registry, bloblo, s3, bucket, tmp_path)
    redirect = requests.get(url, allow_redirects=False, timeout=30)
    assert redirect.status_code == 307
    assert 850 <= _expires(redirect.headers["Location"]) <= 900
    fetched = requests.get(redirect.headers["Location"], timeout=30)
    assert hashlib.sha256(fetched.content).hexdigest() == blob.digest.split(":")[1]
