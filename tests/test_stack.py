"""Smoke tests of the test stack itself, without bloblo: each fixture against the real tools."""

from __future__ import annotations

import psutil
import pytest

from tests.stack import s3 as s3_module
from tests.stack.images import (
    assert_same_image,
    pull,
    push,
    push_big_blob,
    skopeo_copy,
    unique_tag,
)
from tests.stack.procs import CommandError, Process, local_session, poll
from tests.stack.regclient import RegistryClient
from tests.stack.registry import PullThrough, Registry, S3Storage
from tests.stack.s3 import S3Server


def test_skopeo_push_then_pull_gives_back_the_same_image(any_registry, make_image, tmp_path):
    registry, creds = any_registry
    image = make_image([3000, 70000])
    tag = unique_tag()
    push(image, registry.host, "team/app", tag, creds=creds)
    assert_same_image(pull(registry.host, "team/app", tag, tmp_path / "out", creds), image)


def test_basic_registry_refuses_a_wrong_password(basic_registry, alice):
    client = RegistryClient(basic_registry.url, creds=(alice[0], "wrong"))
    assert client.request("GET", "/v2/").status_code == 401


def test_token_registry_refuses_bob_on_team_app(token_registry, alice, bob, make_image, tmp_path):
    image = make_image([1000])
    tag = unique_tag()
    push(image, token_registry.host, "team/app", tag, creds=alice)
    as_bob = RegistryClient(token_registry.url, creds=bob)
    assert as_bob.get_manifest("team/app", tag).status_code == 401
    with pytest.raises(CommandError):
        pull(token_registry.host, "team/app", tag, tmp_path / "out", creds=bob)
    as_alice = RegistryClient(token_registry.url, creds=alice)
    assert as_alice.get_manifest("team/app", tag).status_code == 200


def test_token_for_another_repository_is_refused(token_registry, token_issuer, alice, make_image):
    image = make_image([1000])
    push(image, token_registry.host, "team/app", unique_tag(), creds=alice)
    blob = f"/v2/team/app/blobs/{image.layer_digests[0]}"

    def head_with(access):
        token = token_issuer.mint("alice", access)
        return RegistryClient(token_registry.url, bearer=token).request("HEAD", blob)

    other = head_with([{"type": "repository", "name": "shared/base", "actions": ["pull"]}])
    assert other.status_code == 401
    assert "insufficient_scope" in other.headers["WWW-Authenticate"]
    right = head_with([{"type": "repository", "name": "team/app", "actions": ["pull"]}])
    assert right.status_code == 200


def test_token_issuer_checks_passwords_and_grants(token_issuer, alice):
    query = {"service": token_issuer.service, "scope": "repository:team/app:pull,push,delete"}
    with local_session() as session:
        wrong = session.get(token_issuer.realm, params=query, auth=(alice[0], "x"))
        good = session.get(token_issuer.realm, params=query, auth=alice)
    assert wrong.status_code == 401
    assert good.status_code == 200
    assert set(good.json()) >= {"token", "access_token", "expires_in", "issued_at"}
    assert token_issuer.grant("alice", [query["scope"]]) == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]}
    ]
    assert token_issuer.grant(None, [query["scope"]]) == []


def test_big_blob_push_streams_through_the_http_api(token_registry, alice, tmp_path):
    client = RegistryClient(token_registry.url, creds=alice)
    blob = push_big_blob(client, "shared/base", unique_tag(), 3 * 1024 * 1024 + 7, tmp_path)
    head = client.request("HEAD", f"/v2/shared/base/blobs/{blob.digest}")
    assert head.status_code == 200
    assert int(head.headers["Content-Length"]) == blob.size
    assert client.get_manifest("shared/base", blob.manifest_digest).status_code == 200


def test_s3_refuses_a_tampered_presigned_url(s3, bucket):
    if not s3.validates_presigned_urls:
        pytest.skip(f"{s3.kind} accepts any presigned URL")
    client = s3.client()
    client.put_object(Bucket=bucket, Key="blob", Body=b"payload")
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "blob"}, ExpiresIn=60
    )
    with local_session() as session:
        good = session.get(url)
        assert (good.status_code, good.content) == (200, b"payload")
        assert session.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=99")).status_code == 403
        assert session.get(url.replace("/blob?", "/blob2?")).status_code == 403


def test_registry_on_s3_redirects_blob_downloads(tmp_path, s3, bucket, make_image):
    image = make_image([2000])
    digest = image.layer_digests[0]
    with Registry(tmp_path / "registry", s3=S3Storage(s3.endpoint_url, bucket)) as registry:
        push(image, registry.host, "team/app", "v1")
        client = RegistryClient(registry.url)
        get, head = (
            client.request(method, f"/v2/team/app/blobs/{digest}") for method in ("GET", "HEAD")
        )
    assert (get.status_code, head.status_code) == (307, 307)
    assert get.headers["Location"].startswith(f"{s3.endpoint_url}/{bucket}/")
    with local_session() as session:  # each URL is presigned for its own method
        assert session.get(get.headers["Location"]).content == image.blob_bytes(digest)
        assert session.head(head.headers["Location"]).status_code == 200


def test_pull_through_registry_serves_the_token_registry(
    tmp_path, token_registry, alice, make_image
):
    image = make_image([1500, 2500])
    tag = unique_tag()
    push(image, token_registry.host, "team/app", tag, creds=alice)
    upstream = PullThrough(token_registry.url, *alice)
    with Registry(tmp_path / "registry", proxy=upstream) as mirror:
        assert_same_image(pull(mirror.host, "team/app", tag, tmp_path / "out"), image)


def test_dockerd_logs_in_and_pulls_from_the_basic_registry(
    dockerd, basic_registry, alice, make_image
):
    image = make_image([5000, 9000])
    tag = unique_tag()
    push(image, basic_registry.host, "team/app", tag, creds=alice)
    ref = f"{basic_registry.host}/team/app:{tag}"
    dockerd.login(basic_registry.host, *alice)
    dockerd.pull(ref)
    inspected = dockerd.image_inspect(ref)
    assert inspected["Id"] == image.config_digest
    assert inspected["RootFS"]["Layers"] == [layer.diff_id for layer in image.layers]
    assert f"{basic_registry.host}/team/app@{image.manifest_digest}" in inspected["RepoDigests"]


def test_skopeo_copy_reports_failures(plain_registry, tmp_path):
    with pytest.raises(CommandError, match="manifest unknown"):
        skopeo_copy(f"docker://{plain_registry.host}/no/such:tag", f"oci:{tmp_path}:x")


def test_process_stop_kills_what_ignores_sigterm(tmp_path):
    script = "trap '' TERM; sleep 300 & wait"
    with Process(["sh", "-c", script], tmp_path / "sh.log") as proc:
        proc.wait_until(lambda: len(psutil.Process(proc.pid).children()) == 1, "forked")
        child = psutil.Process(proc.pid).children()[0]
        assert proc.stop(timeout=0.5) == -9
    assert poll(lambda: not _alive(child), timeout=5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_without_localstack_s3_falls_back_to_moto(tmp_path, monkeypatch):
    monkeypatch.setattr(s3_module, "LOCALSTACK_PYTHON", tmp_path / "no-python")
    with S3Server(tmp_path / "s3") as server:
        assert (server.kind, server.validates_presigned_urls) == ("moto", False)
        server.create_bucket("fallback")
        server.client().put_object(Bucket="fallback", Key="k", Body=b"v")
        assert server.client().get_object(Bucket="fallback", Key="k")["Body"].read() == b"v"
