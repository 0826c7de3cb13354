"""Issue #8, part 4: /livez and /readyz answer in JSON, are bloblo's own (never forwarded), and
only the upstream makes bloblo unready: S3 is reported, never a reason to drop an instance."""

from __future__ import annotations

from tests.stack.procs import LOOPBACK, free_port, local_session


def _get(bloblo, path: str):
    with local_session() as session:
        return session.get(bloblo.url + path, timeout=30)


def test_livez_and_healthz_answer_json_and_are_never_forwarded(recording_upstream, start_bloblo):
    bloblo = start_bloblo(recording_upstream.url)
    recording_upstream.seen.clear()
    for path in ("/livez", "/healthz"):
        answer = _get(bloblo, path)
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok", "checks": {}}
    assert recording_upstream.seen == []


def test_readyz_is_ok_while_the_registry_and_the_bucket_answer(plain_registry, start_bloblo):
    answer = _get(start_bloblo(plain_registry), "/readyz")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert body["checks"]["upstream"] == {"status": "ok", "detail": "GET /v2/ answered 200"}
    assert body["checks"]["s3"]["status"] == "ok"


def test_readyz_is_503_when_the_upstream_does_not_answer(start_bloblo):
    answer = _get(start_bloblo(f"http://{LOOPBACK}:{free_port()}"), "/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "fail"
    assert body["checks"]["upstream"]["status"] == "fail"
    assert body["checks"]["s3"]["status"] == "ok"


def test_an_s3_outage_is_reported_but_keeps_bloblo_ready(plain_registry, start_bloblo):
    dead_s3 = f"http://{LOOPBACK}:{free_port()}"
    answer = _get(start_bloblo(plain_registry, BLOBLO_S3_ENDPOINT_URL=dead_s3), "/readyz")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert body["checks"]["s3"]["status"] == "fail"
    assert "BLOBLO_S3_ENDPOINT_URL" in body["checks"]["s3"]["detail"]


def test_readiness_is_checked_at_most_every_few_seconds(recording_upstream, start_bloblo):
    bloblo = start_bloblo(recording_upstream.url)
    recording_upstream.seen.clear()
    for _ in range(10):
        assert _get(bloblo, "/readyz").status_code == 200
    assert [seen.target for seen in recording_upstream.seen] == ["/v2/"]
