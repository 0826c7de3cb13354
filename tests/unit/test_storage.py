"""The S3 side's own bounds: a lookup on a client's request path never waits longer than
LOOKUP_SECONDS, whatever boto3's timeouts and retries would allow (issue #14 §2)."""

import gevent
from prometheus_client import REGISTRY

from bloblo import storage
from bloblo.config import Settings
from bloblo.names import parse_digest

DIGEST = parse_digest("sha256:" + "a" * 64)


class SilentClient:
    """An S3 client whose lookups never get an answer."""

    def __init__(self):
        self.lookups = 0

    def head_object(self, **_):
        self.lookups += 1
        gevent.sleep(3600)

    get_object = head_object


def _store() -> storage.BlobStore:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:1", s3_region="us-east-1")
    return storage.BlobStore(settings)


def _lookup_timeouts(operation: str) -> float:
    labels = {"operation": operation, "code": "LookupTimeout"}
    return REGISTRY.get_sample_value("bloblo_s3_errors_total", labels) or 0.0


def test_a_lookup_s3_does_not_answer_in_time_is_a_miss_and_an_s3_failure(monkeypatch):
    monkeypatch.setattr(storage, "LOOKUP_SECONDS", 0.05)
    store, client = _store(), SilentClient()
    store._client = client
    before = _lookup_timeouts("HeadObject")
    with gevent.Timeout(5):  # the test's own bound: the lookup's must come first
        assert store.contains(DIGEST) is False
    assert client.lookups == 1
    assert _lookup_timeouts("HeadObject") == before + 1
    assert store.available() is False  # the registry serves blobs during the backoff


def test_an_s3_stream_s3_does_not_start_in_time_is_left_to_the_registry(monkeypatch):
    monkeypatch.setattr(storage, "LOOKUP_SECONDS", 0.05)
    store = _store()
    store._client = SilentClient()
    before = _lookup_timeouts("GetObject")
    with gevent.Timeout(5):
        assert store.open(DIGEST, None) is None
    assert _lookup_timeouts("GetObject") == before + 1
    assert store.available() is False
