"""Issue #13: HTTP at the edges. Ranges that reach past or up to the blob's end, conditional and
unsatisfiable requests of clients served from S3, and an upstream that closes idle keep-alive
connections as requests arrive."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import requests

from tests.stack.cache import put_in_cache
from tests.stack.downloads import fetch
from tests.stack.fake_upstream import FakeUpstream, Reply, blob_headers
from tests.stack.idle_relay import IdleClosingRelay
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.regclient import RegistryClient
from tests.stack.registry_log import requests_served
from tests.stack.scrape import scrape

MIB = 1024 * 1024
TAIL = 64 * 1024  # what a response to the end of a blob holds back until it is verified
OLD_CLIENT = {"User-Agent": "ancient-client/0.9"}  # matched by BLOBLO_STREAM_USER_AGENTS below


def _push_raw_blob(registry, data: bytes, tmp_path) -> str:
    """Push data as a blob of team/app straight to the registry; return its digest."""
    path = tmp_path / f"blob-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    client = RegistryClient(registry.url)
    try:
        return client.push_blob("team/app", path)
    finally:
        client.close()


def _gets_served(registry, path: str, at_least: int) -> int:
    """The registry's count of GETs of path, once it has logged at least at_least of them."""
    poll(lambda: requests_served(registry, "GET", path) >= at_least)
    time.sleep(0.3)  # a GET more than expected (a fill) would be logged by now
    return requests_served(registry, "GET", path)


def _answer(response: requests.Response) -> tuple[int, str | None, bytes]:
    return response.status_code, response.headers.get("Content-Range"), response.content


def _described(response: requests.Response) -> tuple[int, str | None, str, str | None]:
    """Status, Content-Range, Content-Type's media type, and ETag of an answer."""
    media_type = response.headers.get("Content-Type", "").split(";")[0]
    return (
        response.status_code,
        response.headers.get("Content-Range"),
        media_type,
        response.headers.get("ETag"),
    )


# --- item 2: a suffix range longer than the blob is the whole blob ------------------------------


def test_a_suffix_range_longer_than_the_blob_is_served_whole_from_its_fill(
    plain_registry, start_bloblo, tmp_path
):
    data = os.urandom(100)
    digest = _push_raw_blob(plain_registry, data, tmp_path)
    path = f"/v2/team/app/blobs/{digest}"
    bloblo = start_bloblo(plain_registry)

    got = fetch(bloblo.url + path, {"Range": "bytes=-500"})
    assert (got.status, bytes(got.kept)) == (206, data)
    assert got.response.headers["Content-Range"] == "bytes 0-99/100"  # RFC 9110 §14.1.2
    assert _gets_served(plain_registry, path, at_least=1) == 1  # the fill's, nothing passed on


# --- item 3: a range to the blob's end holds its tail until the blob is verified --------------


@pytest.mark.parametrize("start", [0, 3 * MIB // 2, 3 * MIB - 1000])
def test_a_range_to_the_end_of_a_wrong_blob_is_a_short_read(start, s3, bucket, start_bloblo):
    real = os.urandom(3 * MIB)
    digest = "sha256:" + hashlib.sha256(real).hexdigest()
    wrong = real[:-1] + bytes([real[-1] ^ 1])  # the right length, one bit off at the very end

    with FakeUpstream(lambda seen: Reply(200, blob_headers(digest, len(real)), [wrong])) as up:
        bloblo = start_bloblo(up.url)
        url = f"{bloblo.url}/v2/team/app/blobs/{digest}"
        if start > len(real) - TAIL:  # every byte is in the held tail: not even headers
            with pytest.raises(requests.ConnectionError):
                fetch(url, {"Range": f"bytes={start}-"})
        else:
            got = fetch(url, {"Range": f"bytes={start}-"})
            assert (got.status, got.length) == (206, len(real) - start)
            assert got.short_read and not got.complete  # never a clean 206 of a wrong blob
        assert poll(lambda: f"fill of {digest}: digest_mismatch" in bloblo.log_text())


# --- item 4: clients served from S3 get the registry's answer to what S3 would answer otherwise


@pytest.fixture
def streamed_blob(plain_registry, s3, bucket, start_bloblo, tmp_path):
    """(bloblo, registry path, data) of a blob in the registry and the bucket, with bloblo
    streaming cached blobs from S3 to OLD_CLIENT."""
    data = os.urandom(5000)
    digest = _push_raw_blob(plain_registry, data, tmp_path)
    assert put_in_cache(s3, bucket, data) == digest
    bloblo = start_bloblo(plain_registry, BLOBLO_STREAM_USER_AGENTS="^ancient-client/")
    return bloblo, f"/v2/team/app/blobs/{digest}", data


def test_an_s3_streamed_range_is_the_registrys_answer_and_never_a_new_fill(
    plain_registry, streamed_blob
):
    bloblo, path, data = streamed_blob
    # distribution 2.8.2 answers 416 (Content-Range: bytes */5000) with a body shorter than its
    # Content-Length, and several ranges as multipart/byteranges with a boundary of its own:
    # the status and the headers that describe the answer are compared, not the bodies.
    asks = ["bytes=5000-", "bytes=9000-9999", "bytes=-0", "bytes=x-y", "bytes=0-1,10-11"]
    statuses = []
    with local_session() as session:
        for ask in asks:
            headers = {**OLD_CLIENT, "Range": ask}
            with (
                session.get(plain_registry.url + path, headers=headers, stream=True) as direct,
                session.get(bloblo.url + path, headers=headers, stream=True) as proxied,
            ):
                assert _described(proxied) == _described(direct), ask
                statuses.append(direct.status_code)
        # What S3 can serve as the registry would, it serves: a suffix longer than the blob too.
        whole = session.get(bloblo.url + path, headers={**OLD_CLIENT, "Range": "bytes=-9000"})
    assert _answer(whole) == (206, "bytes 0-4999/5000", data)
    assert statuses == [416, 416, 206, 416, 206]
    outcomes = {
        labels[0][1]: value
        for (name, labels), value in scrape(bloblo).items()
        if name == "bloblo_blob_requests_total"
    }
    assert outcomes == {"upstream": len(asks), "s3_stream": 1}  # never a fill of the blob


def test_a_conditional_request_of_an_s3_streamed_blob_gets_the_registrys_answer(
    plain_registry, streamed_blob
):
    bloblo, path, data = streamed_blob
    digest = path.rsplit("/", 1)[1]
    conditions = [
        {"If-None-Match": f'"{digest}"'},  # the registry's ETag, not S3's: 304
        {"If-Range": '"sha256:other"', "Range": "bytes=0-9"},  # no match: the whole blob
        {"If-Range": f'"{digest}"', "Range": "bytes=0-9"},
    ]
    statuses = []
    with local_session() as session:
        for condition in conditions:
            headers = {**OLD_CLIENT, **condition}
            direct = session.get(plain_registry.url + path, headers=headers, timeout=30)
            proxied = session.get(bloblo.url + path, headers=headers, timeout=30)
            assert _answer(proxied) == _answer(direct), condition
            assert proxied.headers.get("ETag") == direct.headers.get("ETag"), condition
            statuses.append(direct.status_code)
    assert statuses == [304, 200, 206]


# --- item 7: an upstream that closes idle connections ------------------------------------------


def test_requests_meeting_a_connection_the_upstream_closed_when_idle_are_retried_once(
    plain_registry, start_bloblo, tmp_path
):
    data = os.urandom(200_000)
    digest = _push_raw_blob(plain_registry, data, tmp_path)
    path = f"/v2/team/app/blobs/{digest}"
    with IdleClosingRelay(LOOPBACK, plain_registry.port, idle_seconds=1.0) as relay:
        bloblo = start_bloblo(relay.url)
        with local_session() as session:
            answers = []
            for method, target in [("GET", "/v2/"), ("GET", "/v2/"), ("GET", path), ("HEAD", path)]:
                answers.append(session.request(method, bloblo.url + target, timeout=30))
                time.sleep(1.5)  # longer than the upstream keeps an idle connection
        assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
        assert answers[1].headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert answers[2].content == data
        assert answers[3].headers["Docker-Content-Digest"] == digest
        assert relay.dropped >= 3  # the GET, the blob GET's HEAD, the HEAD met a closed one


def test_only_idempotent_requests_without_a_body_are_sent_again(start_bloblo):
    def answer(seen):
        again = [s for s in upstream.seen if (s.method, s.target) == (seen.method, seen.target)]
        if seen.target == "/first":
            return Reply(200, body=b"ok")
        return Reply(hang_up=True) if len(again) == 1 else Reply(200, body=b"second try")

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        with local_session() as session:
            for method, body, status in [("GET", None, 200), ("PUT", b"layer", 502)]:
                assert session.get(bloblo.url + "/first", timeout=30).status_code == 200
                answer_ = session.request(method, bloblo.url + "/dropped", data=body, timeout=30)
                assert answer_.status_code == status, method
        sent = [(s.method, s.body) for s in upstream.seen if s.target == "/dropped"]
    assert sent == [("GET", b""), ("GET", b""), ("PUT", b"layer")]


def test_a_read_timeout_is_not_retried(start_bloblo):
    def answer(seen):
        if seen.target == "/slow":
            time.sleep(2)
        return Reply(200, body=b"ok")

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url, BLOBLO_UPSTREAM_READ_TIMEOUT="1")
        with local_session() as session:
            assert session.get(bloblo.url + "/fast", timeout=30).status_code == 200
            started = time.monotonic()
            slow = session.get(bloblo.url + "/slow", timeout=30)
            waited = time.monotonic() - started
        assert slow.status_code == 504
        assert waited < 1.9  # one read timeout, not two
        assert poll(lambda: len(upstream.seen) >= 2)
        time.sleep(0.5)
        assert [s.target for s in upstream.seen] == ["/fast", "/slow"]
