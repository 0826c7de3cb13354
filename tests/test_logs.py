"""Issue #8, part 5: logs an operator can read and ship. Clients that try HTTPS first on the
plain-HTTP port leave an INFO line that says so; BLOBLO_LOG_FORMAT=json makes every line one
JSON object with one access line per request; request IDs go upstream and back; no credential,
token or presigned URL is ever logged."""

from __future__ import annotations

import base64
import json
import socket
import ssl

import pytest

from tests.stack.fake_upstream import FakeUpstream, Reply
from tests.stack.images import pull, push, unique_tag
from tests.stack.procs import LOOPBACK, local_session, poll


def test_a_tls_handshake_on_the_plain_port_is_logged_as_what_it_is(
    recording_upstream, start_bloblo
):
    bloblo = start_bloblo(recording_upstream.url)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection((LOOPBACK, bloblo.port), timeout=10) as sock,
        pytest.raises(ssl.SSLError),
    ):
        context.wrap_socket(sock, server_hostname="registry.example")
    assert poll(lambda: "TLS handshake on the plain-HTTP port from 127.0.0.1" in bloblo.log_text())
    assert "Invalid request" not in bloblo.log_text()
    assert recording_upstream.seen == []


def test_a_skopeo_pull_leaves_no_warning_in_the_log(
    plain_registry, start_bloblo, make_image, tmp_path
):
    image = make_image([2000])
    tag = unique_tag()
    push(image, plain_registry.host, "team/app", tag)
    bloblo = start_bloblo(plain_registry)
    pull(bloblo.host, "team/app", tag, tmp_path / "out")
    log = bloblo.log_text()
    assert "TLS handshake on the plain-HTTP port" in log  # skopeo tried HTTPS first
    assert "[WARNING]" not in log and "[ERROR]" not in log


# --- BLOBLO_LOG_FORMAT=json -------------------------------------------------------------------


def _json_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.strip()]


def test_json_logs_have_one_object_per_line_and_one_access_line_per_request(
    token_registry, token_issuer, alice, start_bloblo, make_image, tmp_path
):
    image = make_image([5000, 7000])
    tag = unique_tag()
    bloblo = start_bloblo(token_registry, BLOBLO_LOG_FORMAT="json")
    push(image, bloblo.host, "team/app", tag, alice)
    pull(bloblo.host, "team/app", tag, tmp_path / "cold", alice)
    token = token_issuer.mint(
        "alice", [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    )
    layer = image.layer_digests[0]
    url = f"{bloblo.url}/v2/team/app/blobs/{layer}"
    auth = {"Authorization": f"Bearer {token}"}
    with local_session() as session:
        # Once the layer is in the bucket (uploads wait a moment after a pull), one GET with
        # an X-Request-Id of the client's.
        assert poll(
            lambda: (
                session.get(url, headers=auth, allow_redirects=False, timeout=30).status_code == 307
            )
        )
        warm = session.get(
            url, headers={**auth, "X-Request-Id": "req-42"}, allow_redirects=False, timeout=30
        )
    assert warm.headers["X-Request-Id"] == "req-42"
    assert poll(lambda: '"request_id": "req-42"' in bloblo.log_text())  # written after the answer
    log = bloblo.log_text()
    lines = _json_lines(log)  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert access and all(
        {"method", "path", "status", "bytes", "duration_ms", "client", "user_agent", "request_id"}
        <= set(line)
        for line in access
    )
    mine = [line for line in access if line["request_id"] == "req-42"]
    assert mine[-1]["outcome"] == "redirect" and mine[-1]["status"] == 307
    blob_gets = [
        line for line in access if "/blobs/sha256:" in line["path"] and line["method"] == "GET"
    ]
    assert {"fill", "redirect"} <= {line["outcome"] for line in blob_gets}
    assert all("?" not in line["path"] for line in access)
    assert len({line["request_id"] for line in access}) == len(access)  # one each
    for secret in (
        alice[1],
        base64.b64encode(f"{alice[0]}:{alice[1]}".encode()).decode(),
        token,
        warm.headers["Location"],
        "X-Amz-Signature",
    ):
        assert secret not in log


def test_request_ids_go_upstream_and_an_upstream_id_comes_back_unchanged(start_bloblo):
    def answer(seen):
        if seen.target == "/v2/own-id":
            return Reply(200, [("X-Request-Id", "upstream-7")], b"")
        return Reply(200, [], b"")

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        with local_session() as session:
            sent = session.get(f"{bloblo.url}/v2/", headers={"X-Request-Id": "abc"}, timeout=30)
            made = session.get(f"{bloblo.url}/v2/", timeout=30)
            own = session.get(f"{bloblo.url}/v2/own-id", headers={"X-Request-Id": "x"}, timeout=30)
    assert sent.headers["X-Request-Id"] == "abc"
    assert upstream.seen[0].header_values("X-Request-Id") == ["abc"]
    generated = made.headers["X-Request-Id"]
    assert len(generated) == 32 and upstream.seen[1].header_values("X-Request-Id") == [generated]
    assert own.headers["X-Request-Id"] == "upstream-7"
