"""Issue #14 §3, hostile input: a client gets a presigned URL only for the digest its HEAD
authorized, and never steers a redirect to a host of its choosing; CR, LF and NUL in what
bloblo forwards or echoes never make a header line (or a log line) of their own; requests
beyond the stated limits or with an absurd Content-Length get a registry JSON error and the
worker answers the next request; credentials and presigned URLs never reach the logs or
/metrics."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.stack.bloblo import BlobloServer
from tests.stack.cache import blob_key, cached, put_in_cache
from tests.stack.fake_upstream import FakeUpstream, Reply, blob_headers
from tests.stack.images import pull, push, unique_tag
from tests.stack.procs import LOOPBACK, local_session, poll, stop_all
from tests.stack.regclient import RegistryClient

BALANCER = "127.0.0.2"  # the one trusted load balancer; 127.0.0.1, the tests' client, is not
REFUSAL = b'{"errors":[{"code":"DENIED","message":"no"}]}'
OK = Reply(200, [("Content-Type", "text/plain")], b"ok")
# What a hostile value tries to slip in as a header line of its own.
INJECTED = "X-Injected"


@dataclass
class Answer:
    """An HTTP answer as a lenient client reads it: a bare CR or LF ends a header line."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        """Every value of header `name`."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def error_code(self) -> str:
        """The code of the registry JSON error this answer carries."""
        assert self.values("Content-Type") == ["application/json"], self
        assert self.values("Docker-Distribution-API-Version") == ["registry/2.0"], self
        return json.loads(self.body)["errors"][0]["code"]


def exchange(port: int, request: bytes, source: str = LOOPBACK) -> Answer:
    """Send request bytes as they are, from source, and read the answer to its end."""
    with socket.create_connection((LOOPBACK, port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = re.split(r"\r\n|\r|\n", head.decode("latin-1"))
    headers = [tuple(line.split(":", 1)) for line in lines]
    return Answer(int(status_line.split()[1]), [(n, v.strip()) for n, v in headers], body)


def request(method: str, target: str, *lines: str, host: str = "bloblo.test") -> bytes:
    """A request with these header lines (as given, control characters and all)."""
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}", *lines, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def hostile_line_in(log: str) -> bool:
    """Whether any line of the log starts with what a hostile value tried to inject."""
    return any(line.startswith(INJECTED) for line in re.split(r"\r\n|\r|\n", log))


# --- the stack, shared by the tests of this module ---------------------------------------------


@pytest.fixture(scope="module")
def shared_bucket(s3) -> str:
    """One bucket for the bloblos of this module."""
    return s3.create_bucket(f"hostile-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def serve(tmp_path_factory, s3, shared_bucket):
    """Factory: serve(upstream_url, **env) starts a bloblo for the whole module, caching in
    shared_bucket, uploading at once."""
    servers: list[BlobloServer] = []

    def start(upstream_url: str, **env: str) -> BlobloServer:
        server = BlobloServer(
            tmp_path_factory.mktemp("bloblo"),
            upstream_url=upstream_url,
            s3_endpoint_url=s3.endpoint_url,
            bucket=shared_bucket,
            env={"BLOBLO_UPLOAD_HOLD_SECONDS": "0", **env},
        )
        servers.append(server)
        return server

    yield start
    stop_all(servers)


@pytest.fixture(scope="module")
def scripted_upstream():
    """A fake upstream for the module; `upstream` gives each test a fresh script."""
    with FakeUpstream(lambda seen: OK) as fake:
        yield fake


@pytest.fixture
def upstream(scripted_upstream) -> FakeUpstream:
    """The module's fake upstream, answering 200 "ok" until the test scripts it, nothing seen."""
    scripted_upstream.answer = lambda seen: OK
    scripted_upstream.seen.clear()
    return scripted_upstream


@pytest.fixture(scope="module")
def public_endpoint(s3) -> str:
    """The S3 endpoint as clients reach it: another name for the same server."""
    return f"http://localhost:{s3.port}"


@pytest.fixture(scope="module")
def front(serve, scripted_upstream, public_endpoint) -> BlobloServer:
    """bloblo before the fake upstream, text logs; only BALANCER is a trusted proxy."""
    return serve(
        scripted_upstream.url,
        BLOBLO_TRUSTED_PROXIES=f"{BALANCER}/32",
        BLOBLO_S3_PUBLIC_ENDPOINT_URL=public_endpoint,
    )


@pytest.fixture(scope="module")
def aws_secret() -> str:
    """The S3 secret key of the bloblos whose logs are searched for it (LocalStack checks no
    header signature; it checks presigned URLs only with the key "test", so these bloblos'
    redirects are not followed)."""
    return f"hostile-aws-secret-{uuid.uuid4().hex}"


def _most_verbose(log_format: str, aws_secret: str) -> dict[str, str]:
    return {
        "BLOBLO_LOG_FORMAT": log_format,
        "GUNICORN_CMD_ARGS": "--log-level debug",
        "AWS_SECRET_ACCESS_KEY": aws_secret,
    }


@pytest.fixture(scope="module")
def token_front(serve, token_registry, aws_secret) -> BlobloServer:
    """bloblo before the token registry, remembering authorizations (BLOBLO_AUTH_CACHE_TTL),
    logging all it can, as JSON."""
    return serve(
        token_registry.url, BLOBLO_AUTH_CACHE_TTL="30", **_most_verbose("json", aws_secret)
    )


def _pull_token(token_issuer, user: str, repository: str) -> str:
    return token_issuer.mint(
        user, [{"type": "repository", "name": repository, "actions": ["pull"]}]
    )


# --- 1. a presigned URL only for the digest the HEAD authorized, only at S3 ---------------------


def test_a_digest_spelled_another_way_is_redirected_only_for_clients_the_registry_serves(
    token_front, token_registry, token_issuer, alice, s3, shared_bucket, tmp_path
):
    data = b"spelled " + uuid.uuid4().bytes * 100
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    digest = RegistryClient(token_registry.url, creds=alice).push_blob("team/app", blob)
    assert put_in_cache(s3, shared_bucket, data) == digest
    hex_ = digest.split(":", 1)[1]
    spellings = [
        digest,
        f"sha256%3A{hex_}",
        f"sha256%3a{hex_}",
        f"%73ha256:{hex_}",
        f"sha256:%{ord(hex_[0]):02x}{hex_[1:]}",
    ]
    alice_token = _pull_token(token_issuer, "alice", "team/app")
    bob_token = _pull_token(token_issuer, "bob", "other/thing")
    alice_everywhere = token_issuer.mint(
        "alice",
        [
            {"type": "repository", "name": name, "actions": ["pull"]}
            for name in ("team/app", "shared/base", "other/thing")
        ],
    )

    def get(repository: str, spelled: str, token: str) -> Answer:
        path = f"/v2/{repository}/blobs/{spelled}"
        return exchange(token_front.port, request("GET", path, f"Authorization: Bearer {token}"))

    for spelled in spellings:
        # The registry reads every spelling as the same blob, and answers alice's HEAD with it.
        got = get("team/app", spelled, alice_token)
        assert got.status == 307, spelled
        assert urlsplit(got.values("Location")[0]).path == f"/{shared_bucket}/{blob_key(digest)}"
        # Anyone else gets the registry's refusal, whatever alice's remembered authorization.
        for repository, token, status in [
            ("team/app", bob_token, 401),  # a token for another repository
            ("other/thing", bob_token, 404),  # his repository, which lacks the blob
            ("other/thing", alice_token, 401),  # alice's token, through a repository it lacks
            ("shared/base", alice_everywhere, 404),  # readable, but the blob is not there
        ]:
            got = get(repository, spelled, token)
            assert (got.status, got.values("Location")) == (status, []), (repository, spelled)

    for spelled in [f"sha256:{hex_.upper()}", f"SHA256:{hex_}", f"sha256:{hex_[:-1]}%00"]:
        got = get("team/app", spelled, alice_token)
        assert (got.status, got.error_code, got.values("Location")) == (400, "DIGEST_INVALID", [])


def test_the_redirect_points_at_the_s3_endpoint_whatever_the_client_says_its_host_is(
    front, upstream, s3, shared_bucket, public_endpoint
):
    data = b"where to " + uuid.uuid4().bytes * 100
    digest = put_in_cache(s3, shared_bucket, data)
    upstream.answer = lambda seen: Reply(200, blob_headers(digest, len(data)))
    steering = [
        "X-Forwarded-Host: evil.example",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Port: 8443",
        "X-Forwarded-Prefix: /evil",
        "X-Forwarded-Server: evil.example",
        "Forwarded: for=203.0.113.1;host=evil.example;proto=https",
        "X-Original-URL: http://evil.example/x",
        "X-Host: evil.example",
    ]
    path = f"/v2/team/app/blobs/{digest}"
    for source in (LOOPBACK, BALANCER):  # an untrusted client, and the trusted balancer
        for host in ("evil.example", "evil.example:443", front.host):
            got = exchange(front.port, request("GET", path, *steering, host=host), source=source)
            assert got.status == 307, (source, host)
            location = got.values("Location")[0]
            assert location.startswith(f"{public_endpoint}/{shared_bucket}/{blob_key(digest)}?")
            assert "evil" not in location
    with local_session() as session:  # signed for that host
        assert session.get(location, timeout=30).content == data


@pytest.mark.parametrize("shape", ["absolute", "scheme-relative", "userinfo"])
def test_an_upstream_redirect_to_another_origin_is_never_followed_nor_made_a_cache_redirect(
    shape, front, upstream, s3, shared_bucket
):
    data = b"elsewhere " + uuid.uuid4().bytes * 100
    digest = put_in_cache(s3, shared_bucket, data)
    missing = "sha256:" + uuid.uuid4().hex * 2  # a blob the bucket lacks: its GET starts a fill
    with FakeUpstream(lambda seen: OK) as elsewhere:
        port, up_port = urlsplit(elsewhere.url).port, urlsplit(upstream.url).port
        location = {
            "absolute": f"{elsewhere.url}/storage/x",
            "scheme-relative": f"//{LOOPBACK}:{port}/storage/x",
            "userinfo": f"http://{LOOPBACK}:{up_port}@{LOOPBACK}:{port}/storage/x",
        }[shape]

        def answer(seen):
            if seen.method == "HEAD" and digest in seen.target:
                return Reply(307, [("Location", location)])  # the HEAD of a cached blob
            if seen.method == "HEAD":
                return Reply(200, blob_headers(missing, len(data)))
            if digest in seen.target:
                return Reply(401, [("Content-Type", "application/json")], REFUSAL)
            return Reply(302, [("Location", location)])  # the GET of the missing blob

        upstream.answer = answer
        credentials = "Authorization: Bearer hostile-credential"
        cached_blob = exchange(
            front.port, request("GET", f"/v2/team/app/blobs/{digest}", credentials)
        )
        assert (cached_blob.status, cached_blob.body) == (401, REFUSAL)  # the registry's answer
        missing_blob = exchange(
            front.port, request("GET", f"/v2/team/app/blobs/{missing}", credentials)
        )
        assert (missing_blob.status, missing_blob.values("Location")) == (302, [location])
        assert elsewhere.seen == []
    assert cached(s3, shared_bucket, missing) is None


# --- 2. CR, LF and NUL; limits; absurd Content-Length ----------------------------------------


def test_cr_lf_and_nul_in_a_path_reach_the_registry_percent_encoded_or_get_a_registry_error(
    front, upstream
):
    encoded = "%0d%0aX-Injected:%201"
    for target in [
        f"/v2/team/app/tags/list?n=1{encoded}",
        f"/v2/team{encoded}/app/manifests/latest",
        f"/service/token{encoded}?scope=x",
        "/v2/team/app/tags/list%00",
    ]:
        got = exchange(front.port, request("GET", target))
        assert (got.status, got.body, got.values(INJECTED)) == (200, b"ok", []), target
        seen = upstream.seen[-1]
        assert (seen.target, seen.header_values(INJECTED)) == (target, []), target
    forwarded = len(upstream.seen)

    digest = "sha256:" + "a" * 64
    for target, code in [
        (f"/v2/team{encoded}/app/blobs/{digest}", "NAME_INVALID"),
        (f"/v2/team%00app/blobs/{digest}", "NAME_INVALID"),
        (f"/v2/team/app/blobs/{digest}{encoded}", "DIGEST_INVALID"),
    ]:
        assert exchange(front.port, request("GET", target)).error_code == code, target
    for raw_target in ["/v2/a\x00b", "/v2/a\rX-Injected: 1"]:
        got = exchange(front.port, request("GET", raw_target))
        assert (got.status, got.error_code) == (400, "REQUEST_INVALID"), raw_target
    assert len(upstream.seen) == forwarded
    assert poll(lambda: f"team{encoded}/app/manifests/latest" in front.log_text())  # as sent
    assert not hostile_line_in(front.log_text())


def test_cr_lf_and_nul_in_client_header_values_get_a_registry_error_and_reach_nothing(
    front, upstream
):
    for lines in [
        ["X-A: a\rX-Injected: 1"],
        ["X-A: a\x00X-Injected: 1"],
        ["X-A: a\nX-Injected: 1"],
        ["X-A: a\r\n X-Injected: 1"],  # obsolete line folding
        ["Authorization: Bearer t\rX-Injected: 1"],
        ["Authorization Bearer t"],  # no colon: not a header
    ]:
        got = exchange(front.port, request("GET", "/v2/", *lines))
        assert (got.status, got.error_code, got.values(INJECTED)) == (400, "REQUEST_INVALID", [])
        assert exchange(front.port, request("GET", "/v2/")).status == 200  # the worker answers
    got = exchange(front.port, request("GET", "/v2/", host="h\rX-Injected: 1"))
    assert (got.status, got.error_code) == (400, "REQUEST_INVALID")
    assert [seen.header_values(INJECTED) for seen in upstream.seen] == [[]] * 6

    # The request ID is echoed back: as sent, one line.
    request_id = "a%0d%0aX-Injected:%201"
    got = exchange(front.port, request("GET", "/v2/", f"X-Request-Id: {request_id}"))
    assert (got.values("X-Request-Id"), got.values(INJECTED)) == ([request_id], [])
    assert upstream.seen[-1].header_values("X-Request-Id") == [request_id]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a\rX-Injected: 1", id="bare-CR"),
        pytest.param("a\x00X-Injected: 1", id="NUL"),
        pytest.param("a\x7fX-Injected: 1", id="DEL"),
        pytest.param("a\x1bX-Injected: 1", id="ESC"),
        pytest.param("a\r\n X-Injected: 1", id="obsolete-folding"),
    ],
)
def test_control_characters_in_an_upstream_header_value_pass_as_spaces_never_as_a_line(
    value, front, upstream
):
    def answer(seen):
        moved = f"{upstream.url}/v2/team/app/blobs/uploads/1?_state={value}"
        return Reply(202, [("X-Odd", value), ("Location", moved), ("Content-Length", "0")])

    upstream.answer = answer
    got = exchange(front.port, request("POST", "/v2/team/app/blobs/uploads/"))
    assert got.status == 202
    assert got.values("X-Odd") == ["a X-Injected: 1"]  # RFC 9110 §5.5: each replaced with SP
    assert got.values("Location") == [  # moved to bloblo, its spaces encoded (Werkzeug)
        "http://bloblo.test/v2/team/app/blobs/uploads/1?_state=a%20X-Injected:%201"
    ]
    assert got.values(INJECTED) == []
    assert "Traceback" not in front.log_text()


def test_headers_beyond_the_stated_bounds_get_a_registry_error_and_the_worker_answers_the_next(
    front, upstream, monkeypatch
):
    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)  # the fake upstream's own bound
    field = "X-Big: " + "x" * (64 * 1024 - len("X-Big: \r\n"))  # 64 KiB with its CRLF
    line = "GET /v2/?q={} HTTP/1.1"
    line = line.format("a" * (8190 - len(line) + 2))  # 8190 bytes without its CRLF
    fields = [f"X-{i}: {i}" for i in range(100 - 2)]  # with Host and Connection: 100
    within = [
        request("GET", "/v2/", field),
        (line + "\r\nHost: h\r\nConnection: close\r\n\r\n").encode(),
        request("GET", "/v2/", *fields),
    ]
    beyond = [
        (request("GET", "/v2/", field + "x"), 431),
        ((line.replace("?q=", "?q=a") + "\r\nHost: h\r\n\r\n").encode(), 414),
        (request("GET", "/v2/", *fields, "X-One-Too-Many: 1"), 431),
    ]
    for sent in within:
        assert exchange(front.port, sent).status == 200
    assert len(upstream.seen) == len(within)
    for sent, status in beyond:
        got = exchange(front.port, sent)
        assert (got.status, got.error_code) == (status, "REQUEST_TOO_LARGE")
        assert exchange(front.port, request("GET", "/v2/")).status == 200
    assert len(upstream.seen) == len(within) + len(beyond)  # only the requests right after


@pytest.mark.parametrize(
    ("lengths", "code"),
    [
        pytest.param(["9" * 30], "SIZE_INVALID", id="beyond-int64"),
        pytest.param([str(2**63)], "SIZE_INVALID", id="2^63"),
        pytest.param(["-1"], "REQUEST_INVALID", id="negative"),
        pytest.param(["ten"], "REQUEST_INVALID", id="not-a-number"),
        pytest.param(["0x10"], "REQUEST_INVALID", id="hex"),
        pytest.param(["1e3"], "REQUEST_INVALID", id="exponent"),
        pytest.param(["\xb2"], "REQUEST_INVALID", id="superscript-two"),
        pytest.param(["5, 6"], "REQUEST_INVALID", id="a-list"),
        pytest.param(["5", "6"], "REQUEST_INVALID", id="two-values"),
        pytest.param(["5", "5"], "REQUEST_INVALID", id="twice"),
    ],
)
def test_an_absurd_content_length_gets_a_registry_error_and_the_worker_answers_the_next(
    lengths, code, front, upstream
):
    lines = [f"Content-Length: {length}" for length in lengths]
    for method, target in [
        ("PATCH", f"/v2/team/app/blobs/uploads/{uuid.uuid4()}?_state=signed"),  # a blob upload
        ("PUT", "/v2/team/app/manifests/latest"),
        ("GET", f"/v2/team/app/blobs/sha256:{'b' * 64}"),
        ("GET", "/livez"),  # bloblo's own
    ]:
        got = exchange(front.port, request(method, target, *lines) + b"hello")
        assert (got.status, got.error_code) == (400, code), (method, target)
        assert exchange(front.port, request("GET", "/v2/")).status == 200
    assert [seen.target for seen in upstream.seen] == ["/v2/"] * 4


def test_content_length_with_chunked_gets_a_registry_error(front, upstream):
    lines = ["Content-Length: 5", "Transfer-Encoding: chunked"]
    got = exchange(front.port, request("PATCH", "/v2/team/app/blobs/uploads/1", *lines))
    assert (got.status, got.error_code) == (400, "REQUEST_INVALID")
    assert upstream.seen == []


# --- 3. credentials and presigned URLs never in the logs or metrics -------------------------


def test_credentials_and_presigned_urls_never_reach_the_logs_or_metrics(
    basic_registry,
    token_front,
    token_issuer,
    alice,
    aws_secret,
    start_bloblo,
    make_image,
    s3,
    shared_bucket,
    monkeypatch,
    tmp_path,
):
    minted: list[str] = []  # every token the issuer hands out, to skopeo too
    mint = token_issuer.mint
    monkeypatch.setattr(
        token_issuer, "mint", lambda *a, **k: minted.append(mint(*a, **k)) or minted[-1]
    )
    basic_front = start_bloblo(
        basic_registry, bucket_name=shared_bucket, **_most_verbose("text", aws_secret)
    )
    wrong = ("alice", f"wrong-{uuid.uuid4().hex}")
    secrets = [aws_secret, alice[1], wrong[1], *(_basic(creds) for creds in (alice, wrong))]
    for bloblo, creds in [(basic_front, alice), (token_front, alice)]:
        secrets += _every_kind_of_request(
            bloblo, creds, wrong, make_image, s3, shared_bucket, tmp_path
        )
    secrets += minted
    assert len(minted) >= 3  # skopeo's and the test client's

    for bloblo in (basic_front, token_front):
        log, metrics = bloblo.log_text(), _metrics_text(bloblo)
        assert "[DEBUG]" in log or '"level": "DEBUG"' in log  # the most verbose logging
        for secret in secrets:
            assert secret not in log, secret
            assert secret not in metrics, secret
        for marker in ("X-Amz-Signature", "X-Amz-Credential", "Signature=", "_state", "token="):
            assert marker not in log and marker not in metrics, marker


def _basic(creds: tuple[str, str]) -> str:
    return base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _every_kind_of_request(bloblo, creds, wrong, make_image, s3, bucket, tmp_path) -> list[str]:
    """Drive bloblo through a failed login, a push (skopeo), an upload by hand, a cold pull
    (skopeo), a warm redirected pull and tokens in query strings; return the secrets it saw
    beyond the passwords and tokens."""
    seen: list[str] = []
    with local_session() as session:
        refused = session.get(f"{bloblo.url}/v2/", auth=wrong, timeout=30)
        assert refused.status_code == 401
        forged = session.get(
            f"{bloblo.url}/v2/", headers={"Authorization": "Bearer forged.token.x"}, timeout=30
        )
        assert forged.status_code == 401
    seen.append("forged.token.x")

    image = make_image([3000])
    tag = unique_tag()
    push(image, bloblo.host, "team/app", tag, creds)
    client = RegistryClient(bloblo.url, creds=creds)
    started = client.request("POST", "/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["Location"]
    seen.append(urlsplit(location).query)  # the signed _state
    data = uuid.uuid4().bytes * 10
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    done = client.request("PUT", f"{location}&digest={digest}", data=data)
    assert done.status_code == 201

    pull(bloblo.host, "team/app", tag, tmp_path / f"cold-{bloblo.port}", creds)
    layer = image.layer_digests[0]
    assert poll(lambda: cached(s3, bucket, layer))
    warm = client.request("GET", f"/v2/team/app/blobs/{layer}")
    assert warm.status_code == 307
    presigned = urlsplit(warm.headers["Location"]).query
    signature = re.search(r"X-Amz-Signature=(\w+)", presigned).group(1)
    seen += [presigned, signature]

    query_token = f"query-token-{uuid.uuid4().hex}"
    for path in (
        f"/v2/team/app/tags/list?access_token={query_token}",
        f"/v2/team/app/blobs/{layer}?token={query_token}",
    ):
        client.request("GET", path)
    exchange(bloblo.port, request("GET", f"/v2/?access_token={query_token}\x00"))
    exchange(bloblo.port, request("GET", "/v2/", f"Authorization Bearer {query_token}"))
    seen.append(query_token)
    client.close()
    return seen


def _metrics_text(bloblo) -> str:
    with local_session() as session:
        answer = session.get(f"{bloblo.url}/metrics", timeout=30)
    assert answer.status_code == 200 and "bloblo_blob_requests_total" in answer.text
    return answer.text
