"""Issue #3: blob downloads come from S3 after the first pull, and only to clients the upstream
would serve; the cache holds nothing but verified blobs."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest
import requests

from tests.stack.cache import (
    assert_nothing_published,
    blob_key,
    bucket_keys,
    cached,
    put_in_cache,
)
from tests.stack.fake_upstream import FakeUpstream, Reply, blob_headers, digest_in
from tests.stack.images import assert_same_image, pull, push, push_big_blob, unique_tag
from tests.stack.procs import LOOPBACK, local_session, poll
from tests.stack.regclient import RegistryClient, reading_half_way
from tests.stack.s3 import S3Server
from tests.stack.throttle import Throttle

MIB = 1024 * 1024


def _blob_get_statuses(bloblo, digests) -> dict[str, list[int]]:
    """The statuses bloblo's access log shows for GETs of each blob."""
    log = bloblo.log_text()
    return {
        d: [int(s) for s in re.findall(rf'"GET /v2/\S+/blobs/{d}" (\d+)', log)] for d in digests
    }


def _image_blobs(image) -> list[str]:
    return [image.config_digest, *image.layer_digests]


def _big_blob_behind_bloblo(registry, start_bloblo, tmp_path, size: int, **env):
    """A fresh blob of size random bytes in registry's team/app, and bloblo in front of it."""
    client = RegistryClient(registry.url)
    blob = push_big_blob(client, "team/app", unique_tag(), size, tmp_path)
    return blob, start_bloblo(registry, **env)


# --- hit and miss -----------------------------------------------------------------------------


def test_first_pull_fills_the_bucket_and_the_second_is_served_from_s3(
    token_registry, alice, s3, bucket, start_bloblo, make_image, tmp_path
):
    image = make_image([400_000, 3 * MIB])
    tag = unique_tag()
    push(image, token_registry.host, "team/app", tag, alice)
    bloblo = start_bloblo(token_registry, BLOBLO_UPLOAD_HOLD_SECONDS="10")  # the default

    assert_same_image(pull(bloblo.host, "team/app", tag, tmp_path / "cold", alice), image)
    for digest in _image_blobs(image):
        assert poll(lambda d=digest: cached(s3, bucket, d)) == image.blob_bytes(digest)
    assert all(
        statuses == [200] for statuses in _blob_get_statuses(bloblo, _image_blobs(image)).values()
    )

    assert_same_image(pull(bloblo.host, "team/app", tag, tmp_path / "warm", alice), image)
    for digest, statuses in _blob_get_statuses(bloblo, _image_blobs(image)).items():
        assert statuses == [200, 307], digest


def test_docker_pulls_fresh_layers_from_s3(
    basic_registry, alice, s3, bucket, dockerd, start_bloblo, make_image, tmp_path
):
    image = make_image([500_000, 900_000])
    tag = unique_tag()
    push(image, basic_registry.host, "team/app", tag, alice)
    bloblo = start_bloblo(basic_registry)
    pull(bloblo.host, "team/app", tag, tmp_path / "warm-up", alice)  # fills the cache
    for digest in image.layer_digests:  # uploads wait a moment after a pull
        assert poll(lambda d=digest: cached(s3, bucket, d), timeout=30)

    dockerd.login(bloblo.host, *alice)
    dockerd.pull(f"{bloblo.host}/team/app:{tag}")

    inspected = dockerd.image_inspect(f"{bloblo.host}/team/app:{tag}")
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]
    for digest, statuses in _blob_get_statuses(bloblo, image.layer_digests).items():
        assert statuses[-1] == 307, digest


def test_the_redirect_is_a_presigned_get_on_the_s3_endpoint(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    data = b"presigned" * 1000
    digest = put_in_cache(s3, bucket, data)
    _push_raw_blob(plain_registry, data, tmp_path)
    bloblo = start_bloblo(plain_registry)

    answer = local_session().get(
        f"{bloblo.url}/v2/team/app/blobs/{digest}", allow_redirects=False, timeout=30
    )
    assert answer.status_code == 307 and answer.content == b""
    assert answer.headers["Docker-Content-Digest"] == digest
    location = answer.headers["Location"]
    assert location.startswith(f"{s3.endpoint_url}/{bucket}/{blob_key(digest)}?")
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=1200" in location
    assert local_session().get(location, timeout=30).content == data


def test_s3_refuses_a_tampered_or_expired_presigned_url(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    if not s3.validates_presigned_urls:
        pytest.skip(f"{s3.kind} does not check presigned URLs; only LocalStack can show this")
    data = b"expiring" * 1000
    digest = put_in_cache(s3, bucket, data)
    _push_raw_blob(plain_registry, data, tmp_path)
    bloblo = start_bloblo(plain_registry, BLOBLO_PRESIGN_EXPIRES="2")
    session = local_session()
    location = session.get(
        f"{bloblo.url}/v2/team/app/blobs/{digest}", allow_redirects=False, timeout=30
    ).headers["Location"]
    assert session.get(location, timeout=30).content == data
    tampered = re.sub(
        r"X-Amz-Signature=([0-9a-f])",
        lambda m: "X-Amz-Signature=" + ("0" if m.group(1) != "0" else "1"),
        location,
    )
    assert session.get(tampered, timeout=30).status_code == 403
    other_key = location.replace(blob_key(digest), blob_key("sha256:" + "0" * 64))
    assert session.get(other_key, timeout=30).status_code == 403
    # The same URL, unchanged and good a moment ago, stops working once its 2 s are up.
    assert poll(lambda: session.get(location, timeout=30).status_code == 403, timeout=10)


def _push_raw_blob(registry, data: bytes, tmp_path) -> str:
    """Push data as a blob of team/app straight to the registry; return its digest."""
    path = tmp_path / f"blob-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    return RegistryClient(registry.url).push_blob("team/app", path)


# --- authorization, every time ----------------------------------------------------------------


def test_a_cached_blob_is_never_redirected_for_a_client_the_upstream_refuses(
    token_registry, token_issuer, alice, bob, start_bloblo, make_image, tmp_path
):
    image = make_image([700_000])
    tag = unique_tag()
    push(image, token_registry.host, "team/app", tag, alice)
    bob_image = make_image([1000])
    push(bob_image, token_registry.host, "other/thing", tag, bob)
    bloblo = start_bloblo(token_registry)
    pull(bloblo.host, "team/app", tag, tmp_path / "fill", alice)
    layer = image.layer_digests[0]
    as_alice = RegistryClient(bloblo.url, creds=alice)
    assert poll(lambda: as_alice.request("GET", f"/v2/team/app/blobs/{layer}").status_code == 307)

    bob_token = token_issuer.mint(
        "bob", [{"type": "repository", "name": "other/thing", "actions": ["pull"]}]
    )
    attempts = {
        "anonymous": (f"/v2/team/app/blobs/{layer}", {}),
        "wrong password": (
            f"/v2/team/app/blobs/{layer}",
            {"Authorization": "Basic YWxpY2U6d3Jvbmc="},
        ),
        "token for another repository": (
            f"/v2/team/app/blobs/{layer}",
            {"Authorization": f"Bearer {bob_token}"},
        ),
        "a readable repository without the blob": (
            f"/v2/other/thing/blobs/{layer}",
            {"Authorization": f"Bearer {bob_token}"},
        ),
    }
    session = local_session()
    for what, (path, headers) in attempts.items():
        answer = session.get(bloblo.url + path, headers=headers, allow_redirects=False, timeout=30)
        assert answer.status_code in (400, 401, 403, 404), what
        assert "Location" not in answer.headers, what


def test_authorization_is_asked_on_every_get_unless_a_ttl_is_set(s3, bucket, start_bloblo):
    data = b"ttl" * 1000
    digest = put_in_cache(s3, bucket, data)
    with FakeUpstream(lambda seen: Reply(200, blob_headers(digest, len(data)))) as upstream:
        path = f"/v2/team/app/blobs/{digest}"
        session = local_session()
        alice = {"Authorization": "Bearer alice"}
        default = start_bloblo(upstream.url)
        for _ in range(3):
            got = session.get(default.url + path, headers=alice, allow_redirects=False)
            assert got.status_code == 307
        assert sum(seen.method == "HEAD" for seen in upstream.seen) == 3

        remembering = start_bloblo(upstream.url, BLOBLO_AUTH_CACHE_TTL="30")
        upstream.seen.clear()
        for _ in range(3):
            got = session.get(remembering.url + path, headers=alice, allow_redirects=False)
            assert got.status_code == 307
        assert sum(seen.method == "HEAD" for seen in upstream.seen) == 1
        other = session.get(
            remembering.url + path, headers={"Authorization": "Bearer x"}, allow_redirects=False
        )
        assert other.status_code == 307
        assert sum(seen.method == "HEAD" for seen in upstream.seen) == 2  # other credentials


def test_upstream_connections_are_reused_across_requests(s3, bucket, start_bloblo):
    data = b"reuse" * 1000
    cached = put_in_cache(s3, bucket, data)
    missing = "sha256:" + hashlib.sha256(b"not cached").hexdigest()

    def answer(seen):
        if "/blobs/" not in seen.target:
            return Reply(200, [("Content-Length", "2")], b"{}")
        body = b"not cached" if missing in seen.target else data
        headers = blob_headers(digest_in(seen.target), len(body))
        return Reply(200, headers, b"" if seen.method == "HEAD" else body)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        with local_session() as session:
            for path in ["/v2/", f"/v2/a/blobs/{cached}", f"/v2/a/blobs/{missing}"] * 5:
                assert session.get(bloblo.url + path, allow_redirects=False).status_code in (
                    200,
                    307,
                )
    # 5 GETs of /v2/, 5 HEADs of the cached blob, HEAD + GET of the other, then 4 HEADs: it is
    # cached after its first GET.
    assert len(upstream.seen) == 16
    assert len({seen.peer for seen in upstream.seen}) == 1


@pytest.mark.parametrize("status", [301, 308, 401, 403, 404, 500])
def test_only_200_or_a_temporary_redirect_authorizes(status, s3, bucket, start_bloblo):
    digest = put_in_cache(s3, bucket, b"guarded" * 100)
    refusal = b'{"errors":[{"code":"DENIED","message":"no"}]}'

    def answer(seen):
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(refusal))),
            ("Www-Authenticate", 'Bearer realm="x"'),
            ("Location", "/elsewhere"),
        ]
        return Reply(status, headers, refusal)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        got = local_session().get(
            f"{bloblo.url}/v2/team/app/blobs/{digest}", allow_redirects=False, timeout=30
        )
    assert got.status_code == status
    assert got.content == refusal
    assert got.headers["Www-Authenticate"] == 'Bearer realm="x"'
    assert got.headers["Location"] == "/elsewhere"  # the upstream's, not a presigned URL


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Team/App/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
        ("/v2/team//app/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
        ("/v2/other/../team/app/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
        ("/v2/team/app/blobs/sha256:" + "a" * 10, "DIGEST_INVALID"),
        ("/v2/team/app/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
    ],
)
def test_malformed_names_and_digests_never_reach_the_upstream(path, code, start_bloblo):
    with FakeUpstream(lambda seen: Reply(200)) as upstream:
        bloblo = start_bloblo(upstream.url)
        with socket.create_connection((LOOPBACK, bloblo.port)) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
    assert raw.startswith(b"HTTP/1.1 400")
    assert f'"code": "{code}"'.encode() in raw
    assert upstream.seen == []


# --- only verified blobs are published ----------------------------------------------------------


@pytest.mark.parametrize("lie", ["wrong bytes", "fewer bytes than announced"])
def test_an_upstream_that_lies_publishes_nothing_and_the_client_sees_an_error(
    lie, s3, bucket, start_bloblo
):
    real = b"r" * (3 * MIB)
    digest = "sha256:" + hashlib.sha256(real).hexdigest()
    sent = b"w" * len(real) if lie == "wrong bytes" else real[: len(real) // 2]

    def answer(seen):
        return Reply(200, blob_headers(digest, len(real)), [sent])

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        received = b""
        with (
            pytest.raises(requests.exceptions.ChunkedEncodingError),
            local_session().get(
                f"{bloblo.url}/v2/team/app/blobs/{digest}", stream=True, timeout=30
            ) as response,
        ):
            for chunk in response.iter_content(MIB):
                received += chunk
        assert len(received) < len(real)
        assert poll(
            lambda: (
                f"fill of {digest}: digest_mismatch" in bloblo.log_text()
                or f"fill of {digest}: aborted" in bloblo.log_text()
            )
        )
    assert_nothing_published(s3, bucket)


def test_a_client_that_leaves_half_way_does_not_stop_the_fill(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob, bloblo = _big_blob_behind_bloblo(plain_registry, start_bloblo, tmp_path, 48 * MIB)
    path = f"/v2/team/app/blobs/{blob.digest}"
    with reading_half_way(LOOPBACK, bloblo.port, path, at_least=20 * MIB):
        pass  # then hang up
    assert poll(lambda: bucket_keys(s3, bucket)) == [blob_key(blob.digest)]
    with local_session() as session:
        again = session.get(bloblo.url + path, allow_redirects=False, timeout=30)
    assert again.status_code == 307


def test_a_worker_killed_mid_upload_publishes_nothing(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob, bloblo = _big_blob_behind_bloblo(plain_registry, start_bloblo, tmp_path, 48 * MIB)
    (worker,) = bloblo.worker_pids()
    path = f"/v2/team/app/blobs/{blob.digest}"
    with reading_half_way(LOOPBACK, bloblo.port, path, at_least=20 * MIB):
        psutil.Process(worker).kill()
    assert poll(lambda: bloblo.worker_pids() and bloblo.worker_pids() != [worker])
    assert bucket_keys(s3, bucket) == []  # an unfinished multipart upload is no object
    # The blob is still served, and cached, by the worker gunicorn started in its place.
    assert _sha256_of(local_session(), f"{bloblo.url}/v2/team/app/blobs/{blob.digest}") == (
        blob.digest
    )
    assert poll(lambda: bucket_keys(s3, bucket)) == [blob_key(blob.digest)]


@pytest.mark.slow
def test_ten_concurrent_cold_pulls_make_one_upload_and_all_get_the_blob(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob, bloblo = _big_blob_behind_bloblo(plain_registry, start_bloblo, tmp_path, 24 * MIB)
    start, results = threading.Barrier(10), []

    def fetch():
        session = local_session()
        start.wait()
        with session.get(
            f"{bloblo.url}/v2/team/app/blobs/{blob.digest}", stream=True, timeout=120
        ) as response:
            hasher = hashlib.sha256()
            for chunk in response.iter_content(MIB):
                hasher.update(chunk)
            results.append((response.status_code, f"sha256:{hasher.hexdigest()}"))

    threads = [threading.Thread(target=fetch) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [(200, blob.digest)] * 10
    assert poll(lambda: f"published {blob.digest}" in bloblo.log_text())
    assert bloblo.log_text().count(f"published {blob.digest}") == 1
    assert bucket_keys(s3, bucket) == [blob_key(blob.digest)]


@pytest.mark.slow
def test_a_blob_of_many_parts_round_trips_with_bounded_memory(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    blob, bloblo = _big_blob_behind_bloblo(plain_registry, start_bloblo, tmp_path, 200 * MIB)
    session = local_session()
    session.get(f"{bloblo.url}/v2/", timeout=30)
    (worker,) = bloblo.worker_pids()
    before = psutil.Process(worker).memory_info().rss
    peak, done = [before], threading.Event()
    sampler = threading.Thread(
        target=lambda: [
            peak.append(psutil.Process(worker).memory_info().rss)
            for _ in iter(lambda: done.wait(0.02), True)
        ]
    )
    sampler.start()
    try:
        cold = _sha256_of(session, f"{bloblo.url}/v2/team/app/blobs/{blob.digest}")
        assert poll(lambda: bucket_keys(s3, bucket), timeout=60) == [blob_key(blob.digest)]
    finally:
        done.set()
        sampler.join()
    assert cold == blob.digest
    growth = max(peak) - before
    assert growth < 96 * MIB, f"worker RSS grew by {growth / MIB:.1f} MiB"
    warm = session.get(f"{bloblo.url}/v2/team/app/blobs/{blob.digest}", allow_redirects=False)
    assert warm.status_code == 307
    assert _sha256_of(session, warm.headers["Location"]) == blob.digest


def _sha256_of(session: requests.Session, url: str) -> str:
    hasher = hashlib.sha256()
    with session.get(url, stream=True, timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_content(MIB):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"


# --- S3 never breaks a pull -----------------------------------------------------------------


def test_pulls_succeed_while_s3_is_down(
    plain_registry, make_image, start_bloblo, tmp_path_factory, tmp_path
):
    own_s3 = S3Server(tmp_path_factory.mktemp("s3-to-stop"))
    try:
        own_s3.create_bucket("doomed")
        image, tag = make_image([300_000, 600_000]), unique_tag()
        push(image, plain_registry.host, "team/app", tag)
        bloblo = start_bloblo(
            plain_registry, bucket_name="doomed", BLOBLO_S3_ENDPOINT_URL=own_s3.endpoint_url
        )
        pull(bloblo.host, "team/app", tag, tmp_path / "fill")
        layer_url = f"{bloblo.url}/v2/team/app/blobs/{image.layer_digests[0]}"
        session = local_session()
        assert poll(lambda: session.get(layer_url, allow_redirects=False).status_code == 307)
    finally:
        own_s3.stop()

    # Within a few seconds bloblo stops sending clients to the dead S3 ...
    started = time.monotonic()
    assert poll(
        lambda: session.get(layer_url, allow_redirects=False).status_code == 200, timeout=10
    )
    assert time.monotonic() - started < 5
    # ... and whole pulls, warm and cold, are served from upstream.
    assert_same_image(pull(bloblo.host, "team/app", tag, tmp_path / "warm"), image)
    fresh, fresh_tag = make_image([400_000]), unique_tag()
    push(fresh, plain_registry.host, "team/app", fresh_tag)
    assert_same_image(pull(bloblo.host, "team/app", fresh_tag, tmp_path / "cold"), fresh)
    assert "S3 bucket doomed failed" in bloblo.log_text()


def test_a_slow_s3_does_not_slow_the_client_and_still_gets_the_blob(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    with Throttle(s3.port, bytes_per_second=32 * MIB) as slow_s3:  # 6 s for this blob
        blob, bloblo = _big_blob_behind_bloblo(
            plain_registry,
            start_bloblo,
            tmp_path,
            192 * MIB,
            BLOBLO_S3_ENDPOINT_URL=slow_s3.url,
        )
        url = f"{bloblo.url}/v2/team/app/blobs/{blob.digest}"
        assert _sha256_of(local_session(), url) == blob.digest
        # The client has every byte while most of the upload is still to come: it was not
        # held to S3's pace (held, it would have waited for all but the ~40 MiB bloblo keeps
        # in memory, 80 % of the blob) ...
        assert slow_s3.sent < blob.size / 2
        assert f"published {blob.digest}" not in bloblo.log_text()
        # ... and the upload, fed from the spool, completes behind it.
        assert poll(lambda: f"published {blob.digest}" in bloblo.log_text(), timeout=60)
    assert cached(s3, bucket, blob.digest) == blob.path.read_bytes()


def test_a_graceful_stop_lets_fills_that_no_client_waits_for_complete(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    with Throttle(s3.port, bytes_per_second=8 * MIB) as slow_s3:  # 4 s for this blob
        blob, bloblo = _big_blob_behind_bloblo(
            plain_registry,
            start_bloblo,
            tmp_path,
            32 * MIB,
            BLOBLO_S3_ENDPOINT_URL=slow_s3.url,
        )
        with local_session() as session:
            url = f"{bloblo.url}/v2/team/app/blobs/{blob.digest}"
            assert _sha256_of(session, url) == blob.digest
        assert f"published {blob.digest}" not in bloblo.log_text()
        bloblo.process.stop(timeout=60)  # SIGTERM: gunicorn's graceful stop
    assert "waiting up to 20s for 1 fills" in bloblo.log_text()
    assert f"published {blob.digest}" in bloblo.log_text()
    assert bucket_keys(s3, bucket) == [blob_key(blob.digest)]


# --- HEAD, Range, and clients that cannot follow redirects ----------------------------------


def test_head_is_answered_from_the_upstream_even_for_a_cached_blob(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    data = b"head" * 5000
    _push_raw_blob(plain_registry, data, tmp_path)
    digest = put_in_cache(s3, bucket, data)
    bloblo = start_bloblo(plain_registry)
    head = local_session().head(f"{bloblo.url}/v2/team/app/blobs/{digest}", timeout=30)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest


def test_ranges_go_to_s3_on_a_hit_and_start_a_fill_on_a_miss(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    data = bytes(range(256)) * 4096  # 1 MiB
    _push_raw_blob(plain_registry, data, tmp_path)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    bloblo = start_bloblo(plain_registry)
    session, url = local_session(), f"{bloblo.url}/v2/team/app/blobs/{digest}"

    miss = session.get(url, headers={"Range": "bytes=1000-"}, timeout=30)
    assert (miss.status_code, miss.content) == (206, data[1000:])
    assert miss.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert poll(lambda: bucket_keys(s3, bucket)) == [blob_key(digest)]  # the fill was whole
    hit = session.get(url, headers={"Range": "bytes=10-99"}, allow_redirects=False, timeout=30)
    assert hit.status_code == 307
    followed = session.get(hit.headers["Location"], headers={"Range": "bytes=10-99"}, timeout=30)
    assert (followed.status_code, followed.content) == (206, data[10:100])


def test_clients_that_cannot_follow_redirects_get_the_bytes_from_s3(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    data = b"old-client" * 10_000
    _push_raw_blob(plain_registry, data, tmp_path)
    digest = put_in_cache(s3, bucket, data)
    bloblo = start_bloblo(plain_registry, BLOBLO_STREAM_USER_AGENTS="^ancient-client/")
    url, session = f"{bloblo.url}/v2/team/app/blobs/{digest}", local_session()

    old = session.get(url, headers={"User-Agent": "ancient-client/0.9"}, allow_redirects=False)
    assert (old.status_code, old.content) == (200, data)
    assert old.headers["Docker-Content-Digest"] == digest
    part = session.get(url, headers={"User-Agent": "ancient-client/0.9", "Range": "bytes=0-9"})
    assert (part.status_code, part.content) == (206, data[:10])
    modern = session.get(url, headers={"User-Agent": "docker/27"}, allow_redirects=False)
    assert modern.status_code == 307


def test_the_public_endpoint_is_what_redirects_point_at(
    plain_registry, s3, bucket, start_bloblo, tmp_path
):
    data = b"public" * 100
    _push_raw_blob(plain_registry, data, tmp_path)
    digest = put_in_cache(s3, bucket, data)
    public = urlunsplit(urlsplit(s3.endpoint_url)._replace(netloc=f"localhost:{s3.port}"))
    bloblo = start_bloblo(plain_registry, BLOBLO_S3_PUBLIC_ENDPOINT_URL=public)
    answer = local_session().get(
        f"{bloblo.url}/v2/team/app/blobs/{digest}", allow_redirects=False, timeout=30
    )
    assert answer.headers["Location"].startswith(f"{public}/{bucket}/")
    assert local_session().get(answer.headers["Location"], timeout=30).content == data
