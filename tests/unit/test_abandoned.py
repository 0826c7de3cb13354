"""Multipart uploads that killed workers left (bloblo/abandoned.py, storage.stale_uploads):
which are old enough to abort, by S3's clock, and what a sweep logs and counts."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from botocore.exceptions import ClientError, EndpointConnectionError

from bloblo import metrics
from bloblo.abandoned import AbandonedUploads
from bloblo.config import Settings
from bloblo.storage import s3_time, stale_uploads

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def _upload(key: str, age: float) -> dict:
    return {
        "Key": key,
        "UploadId": f"id-{key}",
        "Initiated": datetime.fromtimestamp(NOW - age, tz=UTC),
    }


def test_only_uploads_older_than_the_limit_by_s3s_clock_resolution_are_stale():
    uploads = [_upload("young", 10), _upload("at-limit", 60), _upload("half-a-second-past", 60.5)]
    uploads += [_upload("a-second-past", 61), _upload("old", 3600)]
    assert [u["Key"] for u in stale_uploads(uploads, NOW, older_than=60)] == [
        "a-second-past",
        "old",
    ]


def test_the_age_of_an_upload_is_read_on_s3s_clock_from_the_date_of_its_answer():
    answer = {"ResponseMetadata": {"HTTPHeaders": {"date": "Fri, 01 May 2026 12:00:00 GMT"}}}
    assert s3_time(answer) == NOW
    assert s3_time({"ResponseMetadata": {"HTTPHeaders": {}}}) is None
    assert s3_time({"ResponseMetadata": {"HTTPHeaders": {"date": "yesterday"}}}) is None


class FakeStore:
    def __init__(self, answers):
        self.answers, self.asked, self.up = list(answers), [], True

    def available(self) -> bool:
        return self.up

    def abort_stale_uploads(self, older_than: float) -> int:
        self.asked.append(older_than)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _sweeper(store: FakeStore, deadline: float = 3600) -> AbandonedUploads:
    settings = Settings(s3_bucket="layers", s3_prefix="p/", fill_deadline_seconds=deadline)
    return AbandonedUploads(settings, store)


def _aborted_total() -> float:
    return metrics.STALE_UPLOADS_ABORTED._value.get()


def test_a_sweep_aborts_what_is_older_than_the_fill_deadline_and_logs_and_counts_it(caplog):
    store, before = FakeStore([2, 0]), _aborted_total()
    sweeper = _sweeper(store, deadline=90)
    with caplog.at_level(logging.INFO, logger="bloblo"):
        assert sweeper.sweep() == 2
        assert sweeper.sweep() == 0
    assert store.asked == [90, 90]
    assert _aborted_total() - before == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("aborted 2 multipart uploads under s3://layers/p/blobs/ begun more")


def test_a_sweep_that_s3_refuses_is_logged_once_with_the_permission_to_give(caplog):
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListUploads")
    store = FakeStore([denied, denied, 1, denied])
    sweeper = _sweeper(store)
    with caplog.at_level(logging.INFO, logger="bloblo"):
        assert [sweeper.sweep() for _ in range(4)] == [0, 0, 1, 0]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # refused, aborted 1, refused again after a success
    assert "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload" in lines[0]
    assert lines[2] == lines[0]


def test_a_sweep_asks_nothing_of_an_s3_that_just_failed_and_survives_one_that_fails(caplog):
    store = FakeStore([EndpointConnectionError(endpoint_url="http://s3.invalid")])
    sweeper = _sweeper(store)
    store.up = False
    assert sweeper.sweep() == 0
    assert store.asked == []
    store.up = True
    with caplog.at_level(logging.INFO, logger="bloblo"):
        assert sweeper.sweep() == 0
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Could not connect" in line and "ListBucketMultipartUploads" not in line
