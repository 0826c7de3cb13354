"""Issue #2: clients push and pull through bloblo exactly as if they spoke to the upstream."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading

import psutil
import pytest
import requests

from tests.stack.bloblo import try_start
from tests.stack.fake_upstream import FakeUpstream, Reply
from tests.stack.images import assert_same_image, pull, push, push_big_blob, unique_tag
from tests.stack.procs import LOOPBACK, CommandError, free_port, local_session, poll
from tests.stack.regclient import RegistryClient, reading_half_way, sha256_file

MIB = 1024 * 1024


# --- real registries, real clients -------------------------------------------------------------


def test_skopeo_push_and_pull_through_bloblo_match_the_upstream(
    any_registry, start_bloblo, make_image, tmp_path
):
    registry, creds = any_registry
    bloblo = start_bloblo(registry)
    image = make_image([300_000, 2 * MIB])
    tag = unique_tag()

    push(image, bloblo.host, "team/app", tag, creds)  # skopeo streams blobs with PATCH

    assert_same_image(_pull_direct(registry, tag, tmp_path / "direct", creds), image)
    assert_same_image(pull(bloblo.host, "team/app", tag, tmp_path / "proxied", creds), image)


def _pull_direct(registry, tag: str, directory, creds):
    """Pull straight from the registry, bloblo nowhere in the path. Once (2026-11-29, in a
    fresh clone's CI run) skopeo's token request to the test's own issuer got a 404 here; the
    cause was not found (the issuer answers 404 only for another path). That error is tried
    again, once; nothing else is."""
    try:
        return pull(registry.host, "team/app", tag, directory, creds)
    except CommandError as exc:
        if "Requesting bearer token: invalid status code from registry 404" not in str(exc):
            raise
        return pull(registry.host, "team/app", tag, directory, creds)


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_monolithic_and_chunked_uploads_through_bloblo(
    auth, request, alice, start_bloblo, tmp_path
):
    registry = request.getfixturevalue(f"{auth}_registry")
    bloblo = start_bloblo(registry)
    client = RegistryClient(bloblo.url, creds=alice)
    monolithic = tmp_path / "monolithic"
    monolithic.write_bytes(b"m" * 3_000_000 + tmp_path.name.encode())
    assert client.push_blob("team/app", monolithic) == sha256_file(monolithic)

    data = b"c" * 2_500_000 + tmp_path.name.encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = client.request("POST", "/v2/team/app/blobs/uploads/")
    assert start.status_code == 202
    location = start.headers["Location"]
    assert location.startswith(bloblo.url)  # the session continues through bloblo
    first = client.request(
        "PATCH",
        location,
        data=data[:1_000_000],
        headers={"Content-Type": "application/octet-stream", "Content-Range": "0-999999"},
    )
    assert first.status_code == 202, first.text
    rest = iter([data[1_000_000:2_000_000], data[2_000_000:]])  # a generator: sent chunked
    second = client.request("PATCH", first.headers["Location"], data=rest)
    assert second.status_code == 202, second.text
    done = client.request("PUT", second.headers["Location"] + f"&digest={digest}")
    assert done.status_code == 201, done.text

    direct = RegistryClient(registry.url, creds=alice)
    for want in (monolithic.read_bytes(), data):
        blob = direct.request(
            "GET", f"/v2/team/app/blobs/sha256:{hashlib.sha256(want).hexdigest()}"
        )
        assert blob.status_code == 200 and blob.content == want


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_docker_login_and_pull_through_bloblo(
    auth, request, alice, dockerd, start_bloblo, make_image
):
    registry = request.getfixturevalue(f"{auth}_registry")
    bloblo = start_bloblo(registry)
    image = make_image([200_000, 600_000])
    tag = unique_tag()
    push(image, registry.host, "team/app", tag, alice)

    dockerd.login(bloblo.host, *alice)
    dockerd.pull(f"{bloblo.host}/team/app:{tag}")

    inspected = dockerd.image_inspect(f"{bloblo.host}/team/app:{tag}")
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]


# --- refusals are the upstream's own ------------------------------------------------------------


def _refusal(response: requests.Response) -> tuple:
    return (
        response.status_code,
        response.headers.get("WWW-Authenticate"),
        response.headers.get("Content-Type"),
        response.content,
    )


def _ask_both(registry, bloblo, path: str, **kwargs) -> tuple[tuple, tuple]:
    session = local_session()
    direct = session.get(registry.url + path, allow_redirects=False, timeout=30, **kwargs)
    proxied = session.get(bloblo.url + path, allow_redirects=False, timeout=30, **kwargs)
    return _refusal(direct), _refusal(proxied)


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_no_or_wrong_credentials_get_exactly_the_upstreams_401(auth, request, start_bloblo):
    registry = request.getfixturevalue(f"{auth}_registry")
    bloblo = start_bloblo(registry)
    for path in ("/v2/", "/v2/team/app/manifests/latest", "/v2/team/app/tags/list"):
        direct, proxied = _ask_both(registry, bloblo, path)
        assert direct[0] == 401 and direct[1]
        assert proxied == direct
        wrong = {"Authorization": "Basic YWxpY2U6bm9wZQ==", "Accept": "application/json"}
        direct, proxied = _ask_both(registry, bloblo, path, headers=wrong)
        assert direct[0] == 401
        assert proxied == direct


def test_a_token_for_another_repository_gets_the_upstreams_refusal(
    token_registry, token_issuer, alice, make_image, start_bloblo
):
    image = make_image([5000])
    tag = unique_tag()
    push(image, token_registry.host, "team/app", tag, alice)
    bloblo = start_bloblo(token_registry)
    other = token_issuer.mint(
        "bob", [{"type": "repository", "name": "other/thing", "actions": ["pull"]}]
    )
    headers = {"Authorization": f"Bearer {other}"}
    for path in (f"/v2/team/app/manifests/{tag}", f"/v2/team/app/blobs/{image.layer_digests[0]}"):
        direct, proxied = _ask_both(token_registry, bloblo, path, headers=headers)
        assert direct[0] == 401 and "insufficient_scope" in direct[1]
        assert proxied == direct


# --- the HTTP contract, checked where a real registry cannot misbehave on cue ---------------


def test_request_line_headers_and_body_reach_the_upstream_as_sent(recording_upstream, start_bloblo):
    bloblo = start_bloblo(recording_upstream.url)
    target = "/v2/library/app/manifests/latest?ns=docker.io&x=a%2Fb%3D&_state=AbC-_%3D%3D"
    with socket.create_connection((LOOPBACK, bloblo.port)) as sock:
        sock.sendall(
            (
                f"GET {target} HTTP/1.1\r\nHost: {bloblo.host}\r\n"
                "Authorization: Bearer secret.token.value\r\n"
                "Accept: application/vnd.oci.image.manifest.v1+json\r\n"
                "Accept: application/vnd.docker.distribution.manifest.v2+json\r\n"
                "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                "Proxy-Authorization: Basic Zm9vOmJhcg==\r\nUser-Agent: test-client/1.0\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    seen = recording_upstream.seen[-1]
    assert seen.target == target
    assert seen.header_values("Authorization") == ["Bearer secret.token.value"]
    accepted = ", ".join(seen.header_values("Accept"))
    assert "application/vnd.oci.image.manifest.v1+json" in accepted
    assert "application/vnd.docker.distribution.manifest.v2+json" in accepted
    for hop in ("X-Hop", "Keep-Alive", "Proxy-Authorization"):
        assert seen.header_values(hop) == []
    assert seen.header_values("X-Forwarded-Host") == [bloblo.host]
    assert seen.header_values("X-Forwarded-Proto") == ["http"]
    assert seen.header_values("X-Forwarded-For") == [LOOPBACK]
    assert seen.header_values("Host") == [recording_upstream.url.removeprefix("http://")]


def test_chunked_request_body_is_streamed_upstream(recording_upstream, start_bloblo):
    bloblo = start_bloblo(recording_upstream.url)
    parts = [b"a" * 100_000, b"b" * 70_000, b"c"]
    response = local_session().patch(
        f"{bloblo.url}/v2/app/blobs/uploads/abc", data=iter(parts), timeout=30
    )
    assert response.status_code == 200
    assert recording_upstream.seen[-1].body == b"".join(parts)


def test_upstream_answers_pass_back_untouched_and_redirects_are_not_followed(start_bloblo):
    body = gzip.compress(b'{"hello": "world"}' * 100)

    def answer(seen):
        if seen.target.endswith("/redirect"):
            return Reply(302, [("Location", "http://elsewhere.invalid/x")])
        if seen.target.endswith("/upload"):
            return Reply(
                202,
                [
                    ("Location", f"{upstream.url}/v2/app/blobs/uploads/1?_state=s"),
                    ("Content-Length", "0"),
                ],
            )
        return Reply(
            200,
            [
                ("Content-Encoding", "gzip"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Www-Authenticate", 'Bearer realm="a"'),
                ("Www-Authenticate", 'Basic realm="b"'),
                ("X-Custom", "kept"),
            ],
            body,
        )

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url)
        session = local_session()
        gz = session.get(f"{bloblo.url}/v2/app/manifests/x", stream=True, timeout=30)
        assert gz.raw.read(decode_content=False) == body
        assert gz.headers["Content-Encoding"] == "gzip"
        assert gz.headers["Content-Length"] == str(len(body))
        assert gz.raw.headers.getlist("Www-Authenticate") == ['Bearer realm="a"', 'Basic realm="b"']
        assert gz.headers["X-Custom"] == "kept"

        moved = session.get(f"{bloblo.url}/v2/app/redirect", allow_redirects=False, timeout=30)
        assert (moved.status_code, moved.headers["Location"]) == (302, "http://elsewhere.invalid/x")
        assert sum(s.target.endswith("/redirect") for s in upstream.seen) == 1

        started = session.post(f"{bloblo.url}/v2/app/upload", timeout=30)
        assert started.headers["Location"] == f"{bloblo.url}/v2/app/blobs/uploads/1?_state=s"


def test_preserve_host_sends_the_clients_host_and_leaves_location_alone(start_bloblo):
    def answer(seen):
        host = dict((n.lower(), v) for n, v in seen.headers)["host"]
        return Reply(
            202, [("Location", f"http://{host}/v2/app/blobs/uploads/1"), ("Content-Length", "0")]
        )

    with FakeUpstream(answer) as upstream:
        bloblo = start_bloblo(upstream.url, BLOBLO_PRESERVE_HOST="true")
        started = local_session().post(f"{bloblo.url}/v2/app/blobs/uploads/", timeout=30)
        assert upstream.seen[-1].header_values("Host") == [bloblo.host]
        assert started.headers["Location"] == f"{bloblo.url}/v2/app/blobs/uploads/1"


# --- failures are answered in the registry's JSON format ------------------------------------


def _json_error(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()["errors"][0]["code"]


def test_unreachable_upstream_is_a_502_in_json_and_only_the_log_names_it(start_bloblo):
    dead = f"http://{LOOPBACK}:{free_port()}"
    bloblo = start_bloblo(dead)
    response = local_session().get(f"{bloblo.url}/v2/", timeout=30)
    assert response.status_code == 502
    assert _json_error(response) == "UNAVAILABLE"
    assert dead not in response.text  # the log names the upstream, a client's answer never does
    assert poll(lambda: f"upstream {dead} unreachable" in bloblo.log_text())


def test_an_upstream_that_does_not_answer_is_a_504_in_json(start_bloblo):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        upstream = f"http://{LOOPBACK}:{silent.getsockname()[1]}"
        bloblo = start_bloblo(upstream, BLOBLO_UPSTREAM_READ_TIMEOUT="1")
        response = local_session().get(f"{bloblo.url}/v2/", timeout=30)
    assert response.status_code == 504
    assert _json_error(response) == "UNAVAILABLE"
    assert poll(lambda: f"upstream {upstream} timed out" in bloblo.log_text())


def test_a_bad_configuration_stops_startup_naming_the_variable(tmp_path):
    result = try_start(tmp_path, "http://127.0.0.1:1", {"BLOBLO_PRESERVE_HOST": "maybe"})
    assert result.returncode != 0
    assert "BLOBLO_PRESERVE_HOST" in result.stderr and "Traceback" not in result.stderr


# --- streaming: bounded memory, no leaks -----------------------------------------------------


def _upstream_connections(bloblo, port: int) -> list:
    conns = []
    for pid in bloblo.worker_pids():
        conns += [
            c
            for c in psutil.Process(pid).net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        ]
    return conns


def test_a_client_that_disconnects_mid_blob_leaves_no_upstream_connection(
    plain_registry, start_bloblo, tmp_path
):
    blob = push_big_blob(
        RegistryClient(plain_registry.url), "team/app", unique_tag(), 64 * MIB, tmp_path
    )
    bloblo = start_bloblo(plain_registry, BLOBLO_MAX_FILLS="0")  # streamed, not filled
    path = f"/v2/team/app/blobs/{blob.digest}"
    with reading_half_way(LOOPBACK, bloblo.port, path, at_least=4 * MIB):
        assert _upstream_connections(bloblo, plain_registry.port)  # the transfer is under way
    assert poll(lambda: not _upstream_connections(bloblo, plain_registry.port))


@pytest.mark.slow
def test_a_1_gib_blob_streams_through_with_bounded_worker_memory(
    plain_registry, start_bloblo, tmp_path
):
    blob = push_big_blob(
        RegistryClient(plain_registry.url), "team/app", unique_tag(), 1024 * MIB, tmp_path
    )
    bloblo = start_bloblo(plain_registry, BLOBLO_MAX_FILLS="0")  # the proxy path alone
    session = local_session()
    session.get(f"{bloblo.url}/v2/", timeout=30)  # warm the worker up
    (worker,) = bloblo.worker_pids()
    before = psutil.Process(worker).memory_info().rss
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak.append(psutil.Process(worker).memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        hasher, size = hashlib.sha256(), 0
        with session.get(
            f"{bloblo.url}/v2/team/app/blobs/{blob.digest}", stream=True, timeout=120
        ) as response:
            assert response.status_code == 200
            for chunk in response.iter_content(MIB):
                hasher.update(chunk)
                size += len(chunk)
    finally:
        done.set()
        sampler.join()
    assert (size, f"sha256:{hasher.hexdigest()}") == (blob.size, blob.digest)
    growth = max(peak) - before
    assert growth < 64 * MIB, f"worker RSS grew by {growth / MIB:.1f} MiB"
