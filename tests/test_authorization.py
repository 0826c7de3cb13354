"""Issue #6, parts 1 and 2: a cached blob only on positive evidence that the upstream would serve
this client this very blob, and blobs behind a compressing front end cached as their plain bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib

import pytest

from tests.stack.cache import assert_nothing_published, cached, put_in_cache
from tests.stack.fake_upstream import FakeUpstream, Reply, blob_headers
from tests.stack.images import pull, push, unique_tag
from tests.stack.procs import local_session, poll
from tests.stack.registry import Registry, S3Storage

REFUSAL = b'{"errors":[{"code":"DENIED","message":"no"}]}'


def _get(bloblo, path: str, **headers: str):
    with local_session() as session:
        return session.get(bloblo.url + path, headers=headers, allow_redirects=False, timeout=30)


def _is_presigned(response, bloblo) -> bool:
    return response.status_code == 307 and bloblo.bucket in response.headers.get("Location", "")


# --- only an answer that describes this blob authorizes ----------------------------------------


def _head_answers(status: int, headers: list[tuple[str, str]]):
    """An upstream whose front end answers every HEAD so, and every GET with a refusal."""

    def answer(seen):
        if seen.method == "HEAD":
            return Reply(status, headers)
        return Reply(401, [("Content-Type", "application/json"), ("X-Front-End", "1")], REFUSAL)

    return answer


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            lambda up, d: (302, [("Location", up.replace("http:", "https:"))]), id="302-https"
        ),
        pytest.param(
            lambda up, d: (307, [("Location", "https://sso.example/login")]), id="307-sso"
        ),
        pytest.param(lambda up, d: (301, [("Location", "/v2/")]), id="301"),
        pytest.param(lambda up, d: (200, []), id="200-without-digest"),
        pytest.param(lambda up, d: (200, blob_headers("sha256:" + "0" * 64, 5)), id="200-other"),
        pytest.param(lambda up, d: (200, blob_headers(d.upper(), 5)), id="200-digest-case"),
        pytest.param(
            lambda up, d: (200, blob_headers("md5:" + "0" * 32, 5)), id="200-unknown-algorithm"
        ),
        pytest.param(  # a canonical digest, but the object was not verified against it
            lambda up, d: (200, blob_headers("sha512:" + "0" * 128, 5)), id="200-sha512-unpaired"
        ),
        pytest.param(lambda up, d: (401, [("Www-Authenticate", 'Bearer realm="x"')]), id="401"),
        pytest.param(lambda up, d: (403, []), id="403"),
        pytest.param(lambda up, d: (404, []), id="404"),
        pytest.param(lambda up, d: (500, []), id="500"),
    ],
)
def test_a_cached_blob_needs_a_200_that_names_its_digest(head, s3, bucket, start_bloblo):
    digest = put_in_cache(s3, bucket, b"guarded" * 100)
    path = f"/v2/team/app/blobs/{digest}"
    with FakeUpstream(lambda seen: Reply()) as upstream:
        status, headers = head(upstream.url + path, digest)
        upstream.answer = _head_answers(status, headers)
        bloblo = start_bloblo(upstream.url)
        got = _get(bloblo, path)  # a client without credentials
    assert not _is_presigned(got, bloblo)
    assert (got.status_code, got.content, got.headers.get("X-Front-End")) == (401, REFUSAL, "1")


def test_a_head_redirected_within_the_upstream_is_followed_with_the_clients_credentials(
    s3, bucket, start_bloblo
):
    digest = put_in_cache(s3, bucket, b"moved" * 100)

    def answer(seen):
        if seen.method == "HEAD" and seen.target.startswith("/v2/"):
            return Reply(307, [("Location", f"/storage/{digest}?token=1")])  # relative
        if seen.method == "HEAD" and seen.header_values("Authorization") == ["Bearer alice"]:
            return Reply(200, blob_headers(digest, 500))
        return Reply(401, [("Content-Type", "application/json")], REFUSAL)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        path = f"/v2/team/app/blobs/{digest}"
        assert _is_presigned(_get(bloblo, path, Authorization="Bearer alice"), bloblo)
        followed = [s for s in upstream.seen if s.target == f"/storage/{digest}?token=1"]
        assert followed and followed[0].header_values("Authorization") == ["Bearer alice"]
        assert _get(bloblo, path).status_code == 401


def test_a_head_redirected_more_than_three_times_does_not_authorize(s3, bucket, start_bloblo):
    digest = put_in_cache(s3, bucket, b"loop" * 100)

    def answer(seen):
        if seen.method == "HEAD":
            hop = int(seen.target.rsplit("hop=", 1)[-1]) if "hop=" in seen.target else 0
            if hop == 4:
                return Reply(200, blob_headers(digest, 400))
            return Reply(302, [("Location", f"/v2/team/app/blobs/{digest}?hop={hop + 1}")])
        return Reply(404, [("Content-Type", "application/json")], REFUSAL)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        got = _get(bloblo, f"/v2/team/app/blobs/{digest}", Authorization="Bearer x")
        assert (got.status_code, got.content) == (404, REFUSAL)
        assert sum(seen.method == "HEAD" for seen in upstream.seen) == 4  # the first and 3 hops


def test_an_upstream_whose_heads_carry_no_digest_streams_uncached_and_says_so_once(
    s3, bucket, start_bloblo
):
    data = b"no digest here" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def answer(seen):
        headers = [("Content-Length", str(len(data))), ("Content-Type", "application/octet-stream")]
        return Reply(200, headers, b"" if seen.method == "HEAD" else data)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        for _ in range(3):
            got = _get(bloblo, f"/v2/team/app/blobs/{digest}", Authorization="Bearer x")
            assert (got.status_code, got.content) == (200, data)
    assert bloblo.log_text().count("without Docker-Content-Digest") == 1
    assert_nothing_published(s3, bucket)


def test_a_remembered_authorization_belongs_to_the_credentials_that_earned_it(
    s3, bucket, start_bloblo
):
    digest = put_in_cache(s3, bucket, b"cookie" * 100)

    def answer(seen):  # a front end that authorizes by session cookie
        if seen.header_values("Cookie") == ["session=good"]:
            return Reply(200, blob_headers(digest, 600))
        return Reply(401, [("Content-Type", "application/json")], REFUSAL)

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url, BLOBLO_AUTH_CACHE_TTL="30")
        path = f"/v2/team/app/blobs/{digest}"
        assert _get(bloblo, path).status_code == 401
        assert _is_presigned(_get(bloblo, path, Cookie="session=good"), bloblo)
        assert _get(bloblo, path).status_code == 401
        assert _get(bloblo, path, Cookie="session=other").status_code == 401
        assert _is_presigned(_get(bloblo, path, Cookie="session=good"), bloblo)
        heads = sum(seen.method == "HEAD" for seen in upstream.seen)
        assert heads == 4  # the second good cookie was remembered; anonymous never is


def test_a_registry_that_redirects_blobs_to_its_own_storage_is_passed_through(
    tmp_path, s3, bucket, start_bloblo, make_image
):
    image = make_image([3000])
    tag = unique_tag()
    storage = s3.create_bucket(f"registry-{bucket}")
    with Registry(tmp_path / "registry", s3=S3Storage(s3.endpoint_url, storage)) as registry:
        push(image, registry.host, "team/app", tag)
        bloblo = start_bloblo(registry)
        got = _get(bloblo, f"/v2/team/app/blobs/{image.layer_digests[0]}")
        assert got.status_code == 307 and f"/{storage}/" in got.headers["Location"]
        pulled = pull(bloblo.host, "team/app", tag, tmp_path / "out")
    assert pulled.layer_digests == image.layer_digests
    assert cached(s3, bucket, image.layer_digests[0]) is None  # already offloaded upstream


# --- blobs behind a compressing front end (part 2) ----------------------------------------------

ENCODERS = {"gzip": lambda data: gzip.compress(data, mtime=0), "deflate": zlib.compress}


def _compressing(data: bytes, always: str | None = None):
    """A front end that gzips or deflates blob GETs when the client accepts it (or always)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def answer(seen):
        if seen.method == "HEAD":
            return Reply(200, blob_headers(digest, len(data)))
        accepted = ",".join(seen.header_values("Accept-Encoding"))
        encoding = always or next((e for e in ENCODERS if e in accepted), None)
        if encoding is None:
            return Reply(200, blob_headers(digest, len(data)), data)
        body = ENCODERS[encoding](data)
        headers = [
            ("Content-Length", str(len(body))),
            ("Content-Encoding", encoding),
            ("Docker-Content-Digest", digest),
        ]
        return Reply(200, headers, body)

    return digest, answer


@pytest.mark.parametrize("accept", ["zstd;q=1.0, gzip;q=0.8, deflate;q=0.5", "deflate", "gzip, br"])
def test_a_blob_behind_a_compressing_front_end_is_fetched_plain_andcached(
    accept, s3, bucket, start_bloblo
):
    data = bytes(range(256)) * 4000
    digest, answer = _compressing(data)
    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        path = f"/v2/team/app/blobs/{digest}"
        got = local_session().get(
            bloblo.url + path, headers={"Accept-Encoding": accept}, stream=True, timeout=30
        )
        assert got.raw.read(decode_content=False) == data
        assert "Content-Encoding" not in got.headers
        blob_get = [s for s in upstream.seen if s.method == "GET"][0]
        assert blob_get.header_values("Accept-Encoding") == ["identity"]
        assert poll(lambda: cached(s3, bucket, digest) == data)
        assert _is_presigned(_get(bloblo, path), bloblo)


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_an_encoded_answer_despite_identity_is_passed_on_byte_for_byte_and_notcached(
    encoding, s3, bucket, start_bloblo
):
    data = b"layer bytes " * 50_000
    digest, answer = _compressing(data, always=encoding)
    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        got = local_session().get(
            f"{bloblo.url}/v2/team/app/blobs/{digest}", stream=True, timeout=30
        )
        assert got.status_code == 200
        assert got.headers["Content-Encoding"] == encoding
        assert got.raw.read(decode_content=False) == ENCODERS[encoding](data)
    assert_nothing_published(s3, bucket)
