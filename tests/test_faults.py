"""Issue #14 §2: faults of the registry and of S3. For each, nothing wrong is published, nothing
is lost (the client gets the right blob or a clean registry JSON error, and the next pull works
and is cached), and bloblo's log and /metrics show the condition.

The registry, S3 and bloblo are the real ones; where a real one cannot misbehave on cue, a front
between them does (tests/stack/registry_front.py before the registry, tests/stack/s3_front.py
before LocalStack). Each kind of fault shares one bloblo behind one front (module fixtures);
every test pulls fresh blobs and reads the metrics as they moved during the test."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack.bloblo import BlobloServer
from tests.stack.cache import blob_key, cached, put_in_cache
from tests.stack.downloads import Download, fetch
from tests.stack.procs import LOOPBACK, free_port, local_session, poll, stop_all
from tests.stack.regclient import RegistryClient
from tests.stack.registry_front import RegistryFront, Spoil
from tests.stack.s3 import S3Server
from tests.stack.s3_front import Rule, S3Front
from tests.stack.scrape import Samples, delta, scrape

KIB = 1024
MIB = 1024 * KIB
REPO = "team/app"
READ_TIMEOUT = 2  # BLOBLO_UPSTREAM_READ_TIMEOUT of the bloblo behind the registry front
BACKOFF = 1  # BLOBLO_S3_BACKOFF_SECONDS of the bloblo behind the S3 front


class Blob:
    """Random bytes pushed to the registry's team/app as one blob."""

    def __init__(self, registry, size: int, workdir: Path):
        self.data = os.urandom(size)
        self.size = size
        self.digest = "sha256:" + hashlib.sha256(self.data).hexdigest()
        self.path = f"/v2/{REPO}/blobs/{self.digest}"
        file = Path(workdir) / f"blob-{uuid.uuid4().hex[:8]}"
        file.write_bytes(self.data)
        client = RegistryClient(registry.url)
        try:
            client.push_blob(REPO, file, self.digest)
        finally:
            client.close()


def _pulled_whole(bloblo, blob: Blob) -> None:
    """A GET of the blob through bloblo gets it whole, as the registry has it."""
    got = fetch(bloblo.url + blob.path, keep=False)
    assert (got.status, got.complete, got.digest) == (200, True, blob.digest), bloblo.log_text()[
        -3000:
    ]


def _redirected(bloblo, blob: Blob) -> bool:
    """Whether a GET of the blob is answered 307 to S3, and S3 then gives the blob."""
    with local_session() as session:
        answer = session.get(bloblo.url + blob.path, allow_redirects=False, timeout=30)
        if answer.status_code != 307:
            answer.close()
            return False
        followed = session.get(answer.headers["Location"], timeout=30)
    return followed.content == blob.data


def _next_pull_is_cached(bloblo, blob: Blob, s3: S3Server, bucket: str) -> None:
    """The next GET of the blob gets it whole and publishes it: the bucket holds exactly the
    blob, and the GET after is a 307 to it."""
    _pulled_whole(bloblo, blob)
    assert poll(lambda: cached(s3, bucket, blob.digest) == blob.data), bloblo.log_text()[-3000:]
    assert _redirected(bloblo, blob)


def _pulls_are_cached_after_the_backoff(bloblo, blob: Blob, s3: S3Server, bucket: str) -> None:
    """GETs of the blob get it whole from the registry while bloblo leaves S3 alone after a
    failure (BLOBLO_S3_BACKOFF_SECONDS); the fill of the first one after that publishes it,
    and the GET after is a 307 to exactly the blob."""

    def pulled_and_published() -> bool:
        ended = f"fill of {blob.digest}: "
        fills_before = bloblo.log_text().count(ended)
        _pulled_whole(bloblo, blob)
        assert poll(lambda: bloblo.log_text().count(ended) > fills_before, timeout=30)
        return cached(s3, bucket, blob.digest) is not None

    assert poll(pulled_and_published, timeout=30), bloblo.log_text()[-3000:]
    assert cached(s3, bucket, blob.digest) == blob.data
    assert _redirected(bloblo, blob)


def _streamed_whole(bloblo, blob: Blob) -> bool:
    """A GET of the blob: False for a 307; otherwise it gets the blob whole, and True."""
    with Download(bloblo.url + blob.path) as got:
        if got.status == 307:
            return False
        got.read_to_end()
    assert (got.status, got.complete, got.digest) == (200, True, blob.digest)
    return True


def _errors(before: Samples, after: Samples, operation: str) -> dict[str, float]:
    """How bloblo_s3_errors_total moved for operation, by code (codes that did not move left
    out)."""
    codes = {
        dict(labels)["code"]
        for name, labels in after
        if name == "bloblo_s3_errors_total" and dict(labels).get("operation") == operation
    }
    moved = {
        code: delta(before, after, "bloblo_s3_errors_total", operation=operation, code=code)
        for code in codes
    }
    return {code: count for code, count in moved.items() if count}


def _nothing_published(s3: S3Server, bucket: str, blob: Blob) -> bool:
    """Neither an object nor a multipart upload left open under the blob's key."""
    uploads = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return cached(s3, bucket, blob.digest) is None and not any(
        upload["Key"] == blob_key(blob.digest) for upload in uploads
    )


def _json_error(download: Download) -> str:
    """The code of the registry JSON error a download got."""
    assert download.response.headers["Content-Type"].startswith("application/json")
    return json.loads(bytes(download.kept))["errors"][0]["code"]


@pytest.fixture(scope="module")
def module_bucket(s3: S3Server) -> str:
    """A bucket for this module's shared bloblos (every test pulls blobs of its own)."""
    return s3.create_bucket(f"faults-{uuid.uuid4().hex[:12]}")


def _shared_bloblo(tmp_path_factory, upstream_url: str, s3_url: str, bucket: str, **env: str):
    """A bloblo for a module's tests (uploads at once), stopped when they are done."""
    server = BlobloServer(
        tmp_path_factory.mktemp("bloblo-faults"),
        upstream_url=upstream_url,
        s3_endpoint_url=s3_url,
        bucket=bucket,
        env={"BLOBLO_UPLOAD_HOLD_SECONDS": "0", **env},
    )
    try:
        yield server
    finally:
        stop_all([server])


# --- the registry -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_front(plain_registry) -> Iterator[RegistryFront]:
    with RegistryFront(plain_registry.url) as front:
        yield front


@pytest.fixture(scope="module")
def bloblo_behind_front(registry_front, s3, module_bucket, tmp_path_factory) -> Iterator:
    """bloblo in front of the registry front, giving up on an answer after READ_TIMEOUT."""
    yield from _shared_bloblo(
        tmp_path_factory,
        registry_front.url,
        s3.endpoint_url,
        module_bucket,
        BLOBLO_UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT),
    )


@pytest.fixture
def front(registry_front) -> Iterator[RegistryFront]:
    """The registry front, spoiling nothing but what the test asks for."""
    registry_front.clear()
    yield registry_front
    registry_front.clear()


def test_a_registry_that_refuses_connections_is_a_502_in_json_and_the_next_pull_is_cached(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob = Blob(plain_registry, MIB, tmp_path)
    port = free_port()  # nothing listens there yet: connections are refused
    bloblo = start_bloblo(f"http://{LOOPBACK}:{port}")
    before = scrape(bloblo)

    refused = fetch(bloblo.url + blob.path)
    assert (refused.status, _json_error(refused)) == (502, "UNAVAILABLE")
    assert f"http://{LOOPBACK}:{port}" not in bytes(refused.kept).decode()
    after = scrape(bloblo)
    assert delta(before, after, "bloblo_upstream_requests_total", method="HEAD", code="unreachable")
    assert delta(before, after, "bloblo_http_requests_total", method="GET", code="502") == 1
    assert f"upstream http://{LOOPBACK}:{port} unreachable on HEAD {blob.path}" in bloblo.log_text()
    assert _nothing_published(s3, bucket, blob)

    with RegistryFront(plain_registry.url, port=port):  # the registry is back
        _next_pull_is_cached(bloblo, blob, s3, bucket)


@pytest.mark.parametrize("delay", [READ_TIMEOUT / 4, READ_TIMEOUT + 3], ids=["within", "beyond"])
def test_a_blob_get_whose_status_line_comes_late_is_served_or_a_504_and_then_cached(
    delay, front, bloblo_behind_front, plain_registry, s3, module_bucket, tmp_path
):
    bloblo, blob = bloblo_behind_front, Blob(plain_registry, 2 * MIB, tmp_path)
    front.spoil(Spoil(delay=delay))
    before = scrape(bloblo)
    got = fetch(bloblo.url + blob.path)
    after = scrape(bloblo)
    assert front.spoiled == 1
    if delay < READ_TIMEOUT:  # a slow registry within BLOBLO_UPSTREAM_READ_TIMEOUT is waited for
        assert (got.status, got.complete, got.digest) == (200, True, blob.digest)
        assert poll(lambda: cached(s3, module_bucket, blob.digest) == blob.data)
        assert _redirected(bloblo, blob)
        return
    assert (got.status, _json_error(got)) == (504, "UNAVAILABLE")
    assert delta(before, after, "bloblo_upstream_requests_total", method="GET", code="timeout") == 1
    assert delta(before, after, "bloblo_http_requests_total", method="GET", code="504") == 1
    assert f"upstream {front.url} timed out on GET {blob.path}" in bloblo.log_text()
    assert _nothing_published(s3, module_bucket, blob)
    _next_pull_is_cached(bloblo, blob, s3, module_bucket)


@pytest.mark.parametrize("cut", ["stall", "reset", "close"])
def test_a_blob_body_the_registry_breaks_off_reaches_the_client_whole_and_the_next_pull_is_cached(
    cut, front, bloblo_behind_front, plain_registry, s3, module_bucket, tmp_path
):
    """A stall longer than BLOBLO_UPSTREAM_READ_TIMEOUT, a reset (RST) or a clean close short
    of Content-Length, after a bit more than 1 MiB of a 4 MiB blob: the fill is aborted, and
    its client gets the rest from the registry with a Range request (issue #13 §3)."""
    bloblo, blob = bloblo_behind_front, Blob(plain_registry, 4 * MIB, tmp_path)
    front.spoil(Spoil(after=MIB + 4321, cut=cut, stall=READ_TIMEOUT + 3))
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert poll(lambda: f"fill of {blob.digest}: aborted" in bloblo.log_text())
    after = scrape(bloblo)
    assert front.spoiled == 1
    assert f"fill of {blob.digest} broke off: " in bloblo.log_text()
    assert delta(before, after, "bloblo_fills_total", result="aborted") == 1
    assert delta(before, after, "bloblo_upstream_requests_total", method="GET", code="206") == 1
    assert _nothing_published(s3, module_bucket, blob)
    _next_pull_is_cached(bloblo, blob, s3, module_bucket)


def test_a_blob_the_registry_sends_with_a_wrong_byte_is_a_short_read_and_the_next_pull_is_cached(
    front, bloblo_behind_front, plain_registry, s3, module_bucket, tmp_path
):
    bloblo, blob = bloblo_behind_front, Blob(plain_registry, 2 * MIB, tmp_path)
    front.spoil(Spoil(wrong=True))
    before = scrape(bloblo)
    got = fetch(bloblo.url + blob.path, keep=False)
    assert (got.status, got.short_read) == (200, True)
    assert got.received <= blob.size - 64 * KIB  # the tail was held back, never sent
    assert poll(lambda: f"fill of {blob.digest}: digest_mismatch" in bloblo.log_text())
    after = scrape(bloblo)
    assert f"the upstream sent a wrong blob for {blob.digest}: not cached" in bloblo.log_text()
    assert delta(before, after, "bloblo_fills_total", result="digest_mismatch") == 1
    assert _nothing_published(s3, module_bucket, blob)
    _next_pull_is_cached(bloblo, blob, s3, module_bucket)


def test_a_5xx_to_the_authorization_head_is_never_redirected_the_client_gets_the_registrys_get(
    front, bloblo_behind_front, plain_registry, s3, module_bucket, tmp_path
):
    bloblo, blob = bloblo_behind_front, Blob(plain_registry, MIB, tmp_path)
    _next_pull_is_cached(bloblo, blob, s3, module_bucket)  # cached: a HEAD's 200 would redirect
    front.spoil(Spoil(method="HEAD", status=503))
    before = scrape(bloblo)
    with Download(bloblo.url + blob.path) as got:  # no redirect followed
        got.read_to_end()
    after = scrape(bloblo)
    assert front.spoiled == 1
    assert "Location" not in got.response.headers
    assert (got.status, got.complete, got.digest) == (200, True, blob.digest)  # the registry's
    assert delta(before, after, "bloblo_upstream_requests_total", method="HEAD", code="503") == 1
    assert delta(before, after, "bloblo_blob_requests_total", outcome="redirect") == 0
    assert delta(before, after, "bloblo_blob_bytes_total", source="upstream") == blob.size
    assert (
        f"the upstream answered 503 to the HEAD authorizing {blob.digest}: its own answer to "
        "the GET goes to the client, uncached" in bloblo.log_text()
    )
    assert _redirected(bloblo, blob)  # the next pull: the registry says yes again


# --- S3 -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_front(s3) -> Iterator[S3Front]:
    with S3Front(s3.port) as front:
        yield front


@pytest.fixture(scope="module")
def bloblo_behind_s3_front(plain_registry, s3_front, module_bucket, tmp_path_factory) -> Iterator:
    """bloblo whose S3 is the S3 front (its redirects signed for it too), asking S3 again
    BACKOFF seconds after a failure."""
    yield from _shared_bloblo(
        tmp_path_factory,
        plain_registry.url,
        s3_front.url,
        module_bucket,
        BLOBLO_S3_BACKOFF_SECONDS=str(BACKOFF),
    )


@pytest.fixture(scope="module")
def cached_probe(bloblo_behind_s3_front, plain_registry, s3, module_bucket, tmp_path_factory):
    """A small blob the S3 front's bucket holds: redirected whenever bloblo asks S3."""
    probe = Blob(plain_registry, KIB, tmp_path_factory.mktemp("probe"))
    _next_pull_is_cached(bloblo_behind_s3_front, probe, s3, module_bucket)
    return probe


@pytest.fixture
def faulty_s3(s3_front, bloblo_behind_s3_front, cached_probe) -> Iterator[S3Front]:
    """The S3 front with no rules, once bloblo asks S3 again (a backoff an earlier test left is
    over: the probe is redirected)."""
    s3_front.clear()
    s3_front.up()
    assert poll(lambda: _redirected(bloblo_behind_s3_front, cached_probe), timeout=30)
    s3_front.clear()
    yield s3_front
    s3_front.clear()
    s3_front.up()


def test_an_unreachable_s3_leaves_pulls_to_the_registry_and_the_next_pull_is_cached(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 2 * MIB, tmp_path)
    before = scrape(bloblo)
    faulty_s3.down()
    _pulled_whole(bloblo, blob)
    assert poll(lambda: f"fill of {blob.digest}: failed" in bloblo.log_text())
    after = scrape(bloblo)
    assert after[("bloblo_s3_available", ())] == 0
    lookups = _errors(before, after, "HeadObject")
    assert sum(lookups.values()) == 3 and "EndpointConnectionError" in lookups  # 3 attempts
    assert delta(before, after, "bloblo_fills_total", result="failed") == 1
    log = bloblo.log_text()
    assert f"S3 bucket {module_bucket} failed (" in log
    assert "check BLOBLO_S3_ENDPOINT_URL and that S3 is reachable" in log

    faulty_s3.up()
    assert _nothing_published(s3, module_bucket, blob)
    _pulls_are_cached_after_the_backoff(bloblo, blob, s3, module_bucket)


def test_an_s3_that_holds_the_lookup_is_given_up_after_two_seconds_and_the_pull_streams(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    """A HEAD of the blob that S3 sits on: boto3 alone would wait 10 s per attempt, three times;
    bloblo gives the lookup 2 s in all (LOOKUP_SECONDS), then serves the registry's bytes."""
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 2 * MIB, tmp_path)
    faulty_s3.rules.append(Rule("HEAD", key=blob_key(blob.digest), code=None, delay=60, times=1))
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert faulty_s3.count("HEAD") == 1  # one attempt, still held, and no other
    after = scrape(bloblo)
    assert _errors(before, after, "HeadObject") == {"LookupTimeout": 1}
    assert f"S3 bucket {module_bucket} failed (no answer from S3 in 2s)" in bloblo.log_text()
    _pulls_are_cached_after_the_backoff(bloblo, blob, s3, module_bucket)


def test_an_s3_that_answers_slowdown_once_to_each_part_gets_each_part_again_and_publishes(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 20 * MIB, tmp_path)  # 3 parts
    faulty_s3.rules.append(Rule("PUT", query="partNumber", code="SlowDown", times=1, each=True))
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert poll(lambda: cached(s3, module_bucket, blob.digest) == blob.data, timeout=30)
    after = scrape(bloblo)
    parts = [faulty_s3.count("PUT", "partNumber", str(n)) for n in (1, 2, 3)]
    assert parts == [2, 2, 2]  # each refused once, sent again once
    assert _errors(before, after, "UploadPart") == {"SlowDown": 3}
    assert delta(before, after, "bloblo_fills_total", result="published") == 1
    assert _redirected(bloblo, blob)


def test_an_s3_that_answers_slowdown_to_every_part_gets_three_attempts_and_nothing_is_published(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 20 * MIB, tmp_path)
    faulty_s3.rules.append(Rule("PUT", query="partNumber", code="SlowDown"))
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert poll(lambda: f"fill of {blob.digest}: failed" in bloblo.log_text(), timeout=30)
    after = scrape(bloblo)
    parts = [faulty_s3.count("PUT", "partNumber", str(n)) for n in (1, 2, 3)]
    assert max(parts) == 3 and all(count <= 3 for count in parts), parts  # retries are bounded
    # Every attempt is counted: the failed part's 3 SlowDowns, and the others' (the attempts
    # under way when boto3 gave the upload up end as HTTPClientError).
    failed = _errors(before, after, "UploadPart")
    assert failed["SlowDown"] >= 3 and sum(failed.values()) == sum(parts), failed
    assert delta(before, after, "bloblo_fills_total", result="failed") == 1
    assert faulty_s3.count("DELETE", "uploadId") == 1  # the multipart upload was aborted
    log = bloblo.log_text()
    assert f"S3 upload of {blob.digest} failed, the blob stays uncached" in log
    assert "SlowDown" in log and "S3 throttles this key prefix" in log
    assert _nothing_published(s3, module_bucket, blob)
    faulty_s3.clear()
    _pulls_are_cached_after_the_backoff(bloblo, blob, s3, module_bucket)


def test_an_s3_that_answers_slowdown_to_the_lookup_leaves_the_pull_to_the_registry(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 2 * MIB, tmp_path)
    put_in_cache(s3, module_bucket, blob.data)  # cached: a lookup that got through redirects
    faulty_s3.rules.append(Rule("HEAD", key=blob_key(blob.digest), code="SlowDown", times=3))
    before = scrape(bloblo)
    assert _streamed_whole(bloblo, blob)
    after = scrape(bloblo)
    assert faulty_s3.count("HEAD") == 3  # three attempts, then the registry's bytes
    assert _errors(before, after, "HeadObject") == {"503": 3}
    assert delta(before, after, "bloblo_blob_requests_total", outcome="fill") == 1
    log = bloblo.log_text()
    assert f"S3 bucket {module_bucket} failed (An error occurred (503) when calling the " in log
    assert "S3 is unavailable or throttling (HEAD answers carry no error code)" in log
    assert poll(lambda: _redirected(bloblo, blob), timeout=10)


def test_an_s3_that_denies_the_put_leaves_the_blob_uncached_and_the_next_pull_is_cached(
    faulty_s3, bloblo_behind_s3_front, s3, module_bucket, plain_registry, tmp_path
):
    bloblo, blob = bloblo_behind_s3_front, Blob(plain_registry, 2 * MIB, tmp_path)  # one PUT
    faulty_s3.rules.append(Rule("PUT", key=blob_key(blob.digest), code="AccessDenied", status=403))
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert poll(lambda: f"fill of {blob.digest}: failed" in bloblo.log_text())
    after = scrape(bloblo)
    assert faulty_s3.count("PUT") == 1  # a refusal is not retried
    assert _errors(before, after, "PutObject") == {"AccessDenied": 1}
    assert "the credentials lack s3:GetObject/PutObject on the bucket" in bloblo.log_text()
    assert _nothing_published(s3, module_bucket, blob)
    faulty_s3.clear()
    _pulls_are_cached_after_the_backoff(bloblo, blob, s3, module_bucket)


def test_a_missing_bucket_leaves_pulls_to_the_registry_until_it_exists_then_they_are_cached(
    plain_registry, s3, start_bloblo, tmp_path
):
    """The real S3 answers this one itself: no front."""
    missing = f"faults-missing-{uuid.uuid4().hex[:8]}"
    bloblo = start_bloblo(
        plain_registry, bucket_name=missing, BLOBLO_S3_BACKOFF_SECONDS=str(BACKOFF)
    )
    blob = Blob(plain_registry, 2 * MIB, tmp_path)
    before = scrape(bloblo)
    _pulled_whole(bloblo, blob)
    assert poll(lambda: f"fill of {blob.digest}: failed" in bloblo.log_text())
    after = scrape(bloblo)
    assert _errors(before, after, "PutObject") == {"NoSuchBucket": 1}
    assert "create the bucket, or set BLOBLO_S3_BUCKET_NAME" in bloblo.log_text()
    _pulled_whole(bloblo, blob)  # and again: still from the registry

    s3.create_bucket(missing)
    _pulls_are_cached_after_the_backoff(bloblo, blob, s3, missing)
