"""Issue #6, parts 3 to 7: every URL the upstream hands out leads back through bloblo, behind a
TLS load balancer too; bloblo's limits never refuse what the registry accepts; hostile paths get
registry errors and reach nothing; a configuration cannot leak credentials."""

from __future__ import annotations

import hashlib
import json
import re
import socket

import pytest

from tests.stack.bloblo import try_start
from tests.stack.cache import put_in_cache
from tests.stack.fake_upstream import FakeUpstream, Reply, blob_headers
from tests.stack.images import push, unique_tag
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.regclient import MANIFEST_ACCEPT, RegistryClient

BALANCER = "127.0.0.2"  # a load balancer on another host, as far as bloblo can tell
STRANGER = "127.0.0.3"


def _raw(port: int, request: str, source: str = LOOPBACK) -> tuple[int, dict[str, str], bytes]:
    """Send request bytes as they are from source; (status, headers, body) of the answer."""
    with socket.create_connection((LOOPBACK, port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(request.encode("latin-1"))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def _request(method: str, target: str, host: str, *headers: str) -> str:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers, "Connection: close"]
    return "\r\n".join(lines) + "\r\n\r\n"


# --- part 3: every path, every URL ------------------------------------------------------------


def test_every_path_but_bloblos_own_reaches_the_upstream_as_sent(recording_upstream, start_bloblo):
    bloblo = start_bloblo(recording_upstream.url)
    targets = [
        ("GET", "/service/token?scope=repository:team/app:pull&service=harbor"),
        ("GET", "/artifacts-downloads/namespaces/p/downloads/AbC?x=1"),
        ("GET", "/v2"),
        ("GET", "/v2//team/app/tags/list"),
        ("OPTIONS", "/v2/"),
        ("DELETE", "/api/v2.0/projects/p"),
        ("GET", "/"),
    ]
    for method, target in targets:
        status, _, body = _raw(bloblo.port, _request(method, target, bloblo.host))
        assert (status, body) == (200, b"ok"), target
        assert recording_upstream.seen[-1].target == target
        assert recording_upstream.seen[-1].method == method
    seen = len(recording_upstream.seen)
    assert _raw(bloblo.port, _request("GET", "/healthz", bloblo.host))[0] == 200
    assert len(recording_upstream.seen) == seen


def test_the_request_target_reaches_the_registry_byte_for_byte(
    plain_registry, recording_upstream, start_bloblo
):
    odd_but_legal = [
        "/v2/team/app/tags/list?last=a%2fb&n=2",
        "/v2/team/app/tags/list?last=a|b&n=2",
        "/v2/team/app/tags/list?q=%7e%7E[x]{y}^`&n=1",
        "/v2/team/app/manifests/v%31?ns=docker.io&x=caf%c3%A9",
        "/v2/team/app/tags/list?a=b;c=d&e=%20%2B+",
    ]
    fake = start_bloblo(recording_upstream.url)
    real = start_bloblo(plain_registry)
    for target in odd_but_legal:
        _raw(fake.port, _request("GET", target, fake.host))
        assert recording_upstream.seen[-1].target == target
        _raw(real.port, _request("GET", target, real.host))
    logged = re.findall(r'http\.request\.uri="([^"]*)"', plain_registry.log_text())
    for target in odd_but_legal:
        assert target in logged, target


def test_upstream_urls_in_location_link_and_realm_lead_back_through_bloblo(start_bloblo):
    def answer(seen):
        up = upstream.url
        if seen.target.startswith("/service/token"):
            return Reply(200, [("Content-Type", "application/json")], b'{"token":"t"}')
        return Reply(
            401,
            [
                ("Www-Authenticate", f'Bearer realm="{up}/service/token",service="harbor"'),
                ("Location", f"{up}/v2/team/app/blobs/uploads/1?_state=a%2Fb"),
                ("Content-Location", f"{up}/v2/team/app/manifests/sha256:abc"),
                ("Link", f'<{up}/v2/_catalog?last=b&n=2>; rel="next", <https://x.example/y>'),
            ],
        )

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        with local_session() as session:
            got = session.get(f"{bloblo.url}/v2/team/app/tags/list", timeout=30)
            assert got.headers["Www-Authenticate"] == (
                f'Bearer realm="{bloblo.url}/service/token",service="harbor"'
            )
            assert got.headers["Location"] == (
                f"{bloblo.url}/v2/team/app/blobs/uploads/1?_state=a%2Fb"
            )
            assert got.headers["Content-Location"] == (
                f"{bloblo.url}/v2/team/app/manifests/sha256:abc"
            )
            assert got.headers["Link"] == (
                f'<{bloblo.url}/v2/_catalog?last=b&n=2>; rel="next", <https://x.example/y>'
            )
            token = session.get(f"{bloblo.url}/service/token?scope=x", timeout=30)
            assert token.json() == {"token": "t"}


def test_a_blob_redirected_to_a_relative_path_of_the_upstream_is_pulled_through_bloblo(
    start_bloblo,
):
    data = b"downloads" * 10_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def answer(seen):
        if seen.target.startswith("/artifacts-downloads/"):
            return Reply(200, [("Content-Length", str(len(data)))], data)
        if seen.method == "HEAD":
            return Reply(200, blob_headers(digest, len(data)))
        return Reply(302, [("Location", f"/artifacts-downloads/{digest[7:]}?sig=1")])

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        with local_session() as session:
            got = session.get(f"{bloblo.url}/v2/team/app/blobs/{digest}", timeout=30)
        assert (got.status_code, got.content) == (200, data)  # bloblo's fill follows it


# --- part 4: behind a TLS load balancer -------------------------------------------------------


def _balanced(method: str, target: str, host: str, client_ip: str) -> str:
    return _request(
        method,
        target,
        "bloblo.internal:7777",
        "X-Forwarded-Proto: https",
        f"X-Forwarded-Host: {host}",
        f"X-Forwarded-For: {client_ip}",
    )


def test_behind_a_trusted_balancer_the_registry_builds_https_urls_for_the_public_host(
    plain_registry, start_bloblo
):
    bloblo = start_bloblo(plain_registry)
    request = _balanced("POST", "/v2/team/app/blobs/uploads/", "registry.example", "203.0.113.9")
    status, headers, _ = _raw(bloblo.port, request, source=BALANCER)
    assert status == 202
    assert headers["Location"].startswith("https://registry.example/v2/team/app/blobs/uploads/")
    assert poll(lambda: '203.0.113.9 "POST /v2/team/app/blobs/uploads/"' in bloblo.log_text())


def test_forwarded_headers_are_kept_from_a_trusted_balancer_and_dropped_from_anyone_else(
    recording_upstream, start_bloblo
):
    bloblo = start_bloblo(recording_upstream.url, BLOBLO_TRUSTED_PROXIES=f"{BALANCER}/32")
    request = _balanced("GET", "/v2/", "registry.example", "203.0.113.9")

    _raw(bloblo.port, request, source=BALANCER)
    seen = recording_upstream.seen[-1]
    assert seen.header_values("X-Forwarded-Proto") == ["https"]
    assert seen.header_values("X-Forwarded-Host") == ["registry.example"]
    assert seen.header_values("X-Forwarded-For") == [f"203.0.113.9, {BALANCER}"]

    spoofed = request.replace("Connection: close", "Forwarded: for=1.2.3.4\r\nConnection: close")
    _raw(bloblo.port, spoofed, source=STRANGER)
    seen = recording_upstream.seen[-1]
    assert seen.header_values("X-Forwarded-Proto") == ["http"]
    assert seen.header_values("X-Forwarded-Host") == ["bloblo.internal:7777"]
    assert seen.header_values("X-Forwarded-For") == [STRANGER]
    assert seen.header_values("Forwarded") == []
    assert poll(lambda: f'{STRANGER} "GET /v2/"' in bloblo.log_text())  # logged after the answer
    assert '203.0.113.9 "GET /v2/"' in bloblo.log_text()


def test_the_client_behind_a_balancer_is_what_stream_networks_match(s3, bucket, start_bloblo):
    data = b"streamed" * 1000
    digest = put_in_cache(s3, bucket, data)
    with FakeUpstream(lambda seen: Reply(200, blob_headers(digest, len(data)))) as upstream:
        bloblo = start_bloblo(upstream.url, BLOBLO_STREAM_NETWORKS="10.0.0.0/8")
        path = f"/v2/team/app/blobs/{digest}"
        inside = _balanced("GET", path, "registry.example", "10.1.2.3")
        outside = _balanced("GET", path, "registry.example", "192.0.2.1")
        assert _raw(bloblo.port, inside, source=BALANCER)[::2] == (200, data)
        assert _raw(bloblo.port, outside, source=BALANCER)[0] == 307


# --- part 5: bloblo's limits are at least the registry's -------------------------------------


def test_a_12_kb_bearer_token_and_a_long_request_line_pass(
    token_registry, token_issuer, alice, make_image, recording_upstream, start_bloblo
):
    tag = unique_tag()
    push(make_image([1000]), token_registry.host, "team/app", tag, alice)
    claims = {f"claim{i}": "x" * 100 for i in range(110)}
    token = token_issuer.mint(
        "alice",
        [{"type": "repository", "name": "team/app", "actions": ["pull"]}],
        extra_claims=claims,
    )
    assert len(token) > 12_000
    bloblo = start_bloblo(token_registry)
    as_alice = RegistryClient(bloblo.url, bearer=token)
    manifest = as_alice.request(
        "GET", f"/v2/team/app/manifests/{tag}", headers={"Accept": ",".join(MANIFEST_ACCEPT)}
    )
    assert manifest.status_code == 200

    fake = start_bloblo(recording_upstream.url)
    field = "x" * (64 * 1024 - 100)
    target = "/v2/team/app/tags/list?last=" + "a" * (8190 - 100)
    request = _request("GET", target, fake.host, f"X-Big: {field}")
    assert _raw(fake.port, request)[0] == 200
    assert recording_upstream.seen[-1].header_values("X-Big") == [field]
    assert recording_upstream.seen[-1].target == target


# --- part 6: hostile paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/v2/../admin/", "NAME_INVALID"),
        ("/v2/%2e%2E/admin/", "NAME_INVALID"),
        ("/v2/team/app/./manifests/latest", "NAME_INVALID"),
        ("/v2/team/.%2e/other/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
        ("/v2/team%2Fapp/manifests/latest", "NAME_INVALID"),
        ("/v2/team/app/blobs/sha256:" + "a" * 60 + "%2fabc", "DIGEST_INVALID"),
        ("/service/../../etc/passwd", "PATH_INVALID"),
        ("/static/%2E%2E/secret?x=1", "PATH_INVALID"),
        ("/v2/team/app/blobs/sha256:" + "a" * 64 + "#/../../admin", "NAME_INVALID"),
        # Absolute-form (issue #13, item 5): only origin-form is checked, so none is served.
        ("http://registry.example/v2/team%2Fapp/manifests/latest", "PATH_INVALID"),
        ("http://registry.example/v2/team/app/blobs/sha256:" + "a" * 64 + "%3F", "PATH_INVALID"),
        ("http://registry.example/v2/", "PATH_INVALID"),
    ],
)
def test_hostile_paths_get_a_registry_error_and_reach_nothing(
    target, code, recording_upstream, start_bloblo
):
    bloblo = start_bloblo(recording_upstream.url)
    for method in ("GET", "HEAD", "PUT"):
        status, headers, body = _raw(bloblo.port, _request(method, target, bloblo.host))
        assert status == 400
        assert headers["Content-Type"].startswith("application/json")
        if method != "HEAD":
            assert json.loads(body)["errors"][0]["code"] == code
            assert "?" not in json.loads(body)["errors"][0]["detail"]["path"]
    assert recording_upstream.seen == []


def test_paths_flask_would_redirect_get_the_registrys_answer(plain_registry, start_bloblo):
    bloblo = start_bloblo(plain_registry)
    for method, target in [("GET", "/v2"), ("GET", "/v2//team/app/tags/list"), ("OPTIONS", "/v2/")]:
        direct = _raw(plain_registry.port, _request(method, target, plain_registry.host))
        proxied = _raw(bloblo.port, _request(method, target, bloblo.host))
        assert proxied[0] == direct[0], target
        assert proxied[2] == direct[2], target


# --- part 7: a configuration that cannot leak -------------------------------------------------


def test_an_upstream_url_with_credentials_is_refused_without_repeating_them(tmp_path):
    result = try_start(tmp_path, "http://deploy:s3cr3t-value@127.0.0.1:1", {})
    assert result.returncode != 0
    assert "BLOBLO_UPSTREAM_URL" in result.stderr and "credentials" in result.stderr
    assert "s3cr3t-value" not in result.stderr + result.stdout
