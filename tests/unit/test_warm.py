"""The pure logic of `bloblo warm`: references, platforms, manifests, docker's config.json,
challenges and the summary line."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from bloblo.credentials import Credentials, CredentialsError, lookup, parse_challenge
from bloblo.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ManifestError,
    Platform,
    Ref,
    check_digest,
    parse_manifest,
    parse_platform,
    parse_ref,
)
from bloblo.names import parse_digest
from bloblo.warm import Summary

UPSTREAM = "registry.example.com:5000"
D1, D2, D3 = (f"sha256:{c * 64}" for c in "abc")


@pytest.mark.parametrize(
    ("text", "name", "reference"),
    [
        ("team/app:1.0", "team/app", "1.0"),
        ("team/app", "team/app", "latest"),
        (f"team/app@{D1}", "team/app", D1),
        (f"team/app:1.0@{D1}", "team/app", D1),
        (f"{UPSTREAM}/team/app:v2", "team/app", "v2"),
        ("app:A_b-1.2", "app", "A_b-1.2"),
    ],
)
def test_references_name_a_repository_and_a_tag_or_digest(text, name, reference):
    assert parse_ref(text, UPSTREAM) == Ref(name, reference)


@pytest.mark.parametrize(
    "text",
    [
        "other.example.com/team/app:1",
        "localhost:5000/team/app:1",
        "Team/app:1",
        "team/app:-bad",
        "team/app:" + "x" * 129,
        "team/app@sha256:abc",
        "team/app@md5:" + "a" * 32,
        "",
    ],
)
def test_references_warm_cannot_use_are_refused(text):
    with pytest.raises(ManifestError):
        parse_ref(text, UPSTREAM)


def test_a_reference_prints_as_docker_writes_it():
    assert str(Ref("team/app", "1.0")) == "team/app:1.0"
    assert str(Ref("team/app", D1)) == f"team/app@{D1}"
    assert Ref("team/app", D1).digest == parse_digest(D1)
    assert Ref("team/app", "1.0").digest is None


def test_platforms_are_os_arch_and_an_optional_variant():
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform("linux", "arm64").matches(
        {"os": "linux", "architecture": "arm64", "variant": "v8"}
    )
    assert not Platform("linux", "arm64", "v7").matches(
        {"os": "linux", "architecture": "arm64", "variant": "v8"}
    )
    assert Platform("linux", "amd64").matches(None)  # an entry without a platform is kept
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(ManifestError):
            parse_platform(bad)


def _image(media_type=OCI_MANIFEST, foreign=False) -> bytes:
    layer = {"mediaType": "x", "digest": D3, "size": 30}
    if foreign:
        layer["urls"] = ["https://example.com/layer"]
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": "c", "digest": D1, "size": 10},
            "layers": [{"mediaType": "x", "digest": D2, "size": 20}, layer],
        }
    ).encode()


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_an_image_manifest_lists_its_config_and_layers(media_type):
    parsed = parse_manifest(_image(media_type), media_type, "team/app")
    assert [(str(b.digest), b.size, b.name) for b in parsed.blobs] == [
        (D1, 10, "team/app"),
        (D2, 20, "team/app"),
        (D3, 30, "team/app"),
    ]
    assert parsed.children == ()


def test_foreign_layers_are_skipped_and_named():
    parsed = parse_manifest(_image(foreign=True), OCI_MANIFEST, "team/app")
    assert [str(b.digest) for b in parsed.blobs] == [D1, D2]
    assert [str(d) for d in parsed.foreign] == [D3]


def test_the_media_type_comes_from_the_body_when_the_header_says_plain_json():
    assert len(parse_manifest(_image(), "application/json", "a").blobs) == 3


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_an_index_lists_its_manifests_filtered_by_platform(media_type):
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {"digest": D1, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": D2, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": D3, "size": 1},
        ],
    }
    body = json.dumps(index).encode()
    every = parse_manifest(body, media_type, "team/app")
    assert every.children == tuple(Ref("team/app", d) for d in (D1, D2, D3))
    amd64 = parse_manifest(body, media_type, "team/app", (Platform("linux", "amd64"),))
    assert amd64.children == (Ref("team/app", D1), Ref("team/app", D3))


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b'{"schemaVersion": 1, "fsLayers": []}', "application/json", "schema 1"),
        (b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
        (b'{"schemaVersion": 2}', "application/vnd.example+json", "unsupported"),
        (b"<html>", "text/html", "not JSON"),
        (b"[]", OCI_MANIFEST, "not a JSON object"),
        (b'{"schemaVersion": 2, "layers": []}', OCI_MANIFEST, "malformed"),
        (_image().replace(b'"size": 10', b'"size": -1'), OCI_MANIFEST, "malformed"),
    ],
)
def test_manifests_warm_cannot_read_are_refused_with_a_reason(body, content_type, says):
    with pytest.raises(ManifestError, match=says):
        parse_manifest(body, content_type, "team/app")


@pytest.mark.parametrize(
    ("document", "platforms"),
    [
        ({"mediaType": OCI_MANIFEST, "config": {"digest": D1, "size": 1}, "layers": ["x"]}, ()),
        ({"mediaType": OCI_MANIFEST, "config": {"digest": D1, "size": 1}, "layers": {"a": 1}}, ()),
        ({"mediaType": OCI_MANIFEST, "config": "x", "layers": []}, ()),
        ({"mediaType": OCI_MANIFEST, "config": {"digest": D1, "size": True}, "layers": []}, ()),
        ({"mediaType": OCI_INDEX, "manifests": ["x"]}, ("linux/amd64",)),
        ({"mediaType": OCI_INDEX, "manifests": 3}, ()),
        ({"mediaType": OCI_INDEX, "manifests": [{"digest": D1, "platform": "linux"}]}, ("a/b",)),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_manifest_error(document, platforms):
    body = json.dumps({"schemaVersion": 2, **document}).encode()
    with pytest.raises(ManifestError, match="malformed"):
        parse_manifest(body, None, "team/app", tuple(map(parse_platform, platforms)))


def test_a_platform_no_index_entry_matches_is_an_error_naming_those_it_has():
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"digest": D1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": D2, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        ],
    }
    with pytest.raises(ManifestError, match=r"linux/amd46 .*linux/amd64, linux/arm64/v8"):
        parse_manifest(json.dumps(index).encode(), OCI_INDEX, "a", (parse_platform("linux/amd46"),))


def test_a_manifest_fetched_by_digest_must_hash_to_it():
    body = _image()
    check_digest(body, parse_digest("sha256:" + hashlib.sha256(body).hexdigest()))
    with pytest.raises(ManifestError, match="hashes to"):
        check_digest(body + b" ", parse_digest("sha256:" + hashlib.sha256(body).hexdigest()))


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "key", [UPSTREAM, f"http://{UPSTREAM}", f"https://{UPSTREAM}/v2/", UPSTREAM.upper()]
)
def test_docker_login_credentials_are_found_under_the_upstreams_host(key):
    config = {"auths": {"https://index.docker.io/v1/": {"auth": _auth("hub", "x")}}}
    config["auths"][key] = {"auth": _auth("alice", "pa:ss")}
    assert lookup(config, UPSTREAM) == Credentials("alice", "pa:ss")


def test_no_entry_for_the_upstream_means_anonymous():
    config = {"auths": {"https://index.docker.io/v1/": {"auth": _auth("hub", "x")}}}
    assert lookup(config, UPSTREAM) is None
    assert lookup({"credsStore": "desktop", "auths": {}}, UPSTREAM) is None
    assert lookup({}, UPSTREAM) is None


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"credHelpers": {UPSTREAM: "ecr-login"}}, "credential helper"),
        ({"credsStore": "pass", "auths": {UPSTREAM: {}}}, "credential store"),
        ({"auths": {UPSTREAM: {"identitytoken": "t"}}}, "identity token"),
        ({"auths": {UPSTREAM: {"auth": "bm9jb2xvbg=="}}}, "not base64 user:password"),
        ({"auths": {UPSTREAM: {"auth": "!!!"}}}, "not base64 user:password"),
    ],
)
def test_credentials_warm_cannot_use_are_an_error_naming_the_way_out(config, says):
    with pytest.raises(CredentialsError, match=says) as raised:
        lookup(config, UPSTREAM)
    assert "--password-stdin" in str(raised.value) or "base64" in str(raised.value)


@pytest.mark.parametrize(
    "config", [[], {"auths": [1]}, {"auths": {UPSTREAM: "x"}}, {"credHelpers": 1}]
)
def test_a_docker_config_of_the_wrong_shape_is_a_credentials_error(config):
    with pytest.raises(CredentialsError):
        lookup(config, UPSTREAM)


def test_a_bearer_challenge_gives_realm_service_and_scope():
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry",'
        'scope="repository:team/app:pull,push",error="insufficient_scope"'
    )
    scheme, params = parse_challenge(header)
    assert scheme == "bearer"
    assert params["realm"] == "https://auth.example.com/token"
    assert params["scope"] == "repository:team/app:pull,push"
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_the_summary_line_counts_every_blob():
    summary = Summary(copied=3, cached=2, failed=1, bytes_copied=1234)
    assert summary.line == "6 blobs: 3 copied, 2 already cached, 1 failed; 1234 bytes copied"
