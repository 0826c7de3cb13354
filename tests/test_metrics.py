"""Issue #8, part 3: /metrics counts what bloblo did, correctly across gunicorn's workers, and is
served only to the networks in BLOBLO_METRICS_NETWORKS (never forwarded upstream)."""

from __future__ import annotations

import socket

from tests.stack.cache import bucket_keys
from tests.stack.images import push_big_blob, unique_tag
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.regclient import RegistryClient
from tests.stack.scrape import delta, scrape

MIB = 1024 * 1024


def test_a_cold_and_a_warm_pull_move_the_counters_exactly(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    size = 3 * MIB + 17
    blob = push_big_blob(
        RegistryClient(plain_registry.url), "team/app", unique_tag(), size, tmp_path
    )
    bloblo = start_bloblo(plain_registry, workers=2)
    before = scrape(bloblo)
    url = f"{bloblo.url}/v2/team/app/blobs/{blob.digest}"
    with local_session() as session:
        cold = session.get(url, timeout=60)
        assert (cold.status_code, len(cold.content)) == (200, size)
        assert poll(lambda: bucket_keys(s3, bucket))
        assert poll(lambda: delta(before, scrape(bloblo), "bloblo_fills_total", result="published"))
        warm = session.get(url, allow_redirects=False, timeout=60)
        assert warm.status_code == 307
    after = scrape(bloblo)
    assert delta(before, after, "bloblo_blob_requests_total", outcome="fill") == 1
    assert delta(before, after, "bloblo_blob_requests_total", outcome="redirect") == 1
    assert delta(before, after, "bloblo_blob_bytes_total", source="spool") == size
    assert delta(before, after, "bloblo_blob_bytes_total", source="s3") == size
    assert delta(before, after, "bloblo_blob_bytes_total", source="upstream") == 0
    assert delta(before, after, "bloblo_upstream_bytes_total") == size
    assert delta(before, after, "bloblo_fills_total", result="published") == 1
    assert delta(before, after, "bloblo_http_requests_total", method="GET", code="307") == 1
    assert delta(before, after, "bloblo_http_requests_total", method="GET", code="200") >= 1
    assert after[("bloblo_fills_in_progress", ())] == 0
    assert after[("bloblo_spool_bytes", ())] == 0
    assert after[("bloblo_s3_available", ())] == 1


def test_metrics_are_bloblos_own_and_only_for_the_configured_networks(
    recording_upstream, start_bloblo
):
    bloblo = start_bloblo(recording_upstream.url, BLOBLO_METRICS_NETWORKS="127.0.0.2/32")
    recording_upstream.seen.clear()
    for source, status in (("127.0.0.2", 200), (LOOPBACK, 404)):
        with socket.create_connection((LOOPBACK, bloblo.port), source_address=(source, 0)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
    assert recording_upstream.seen == []
